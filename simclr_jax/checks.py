"""The config checks that several modes share, by section, each failing in one sentence.

Each mode owns its `check_config` (trainer, study/sweep, predict, audit) and
builds it from these: the workdir, the mode, the input (data set) fields, the
split fields, the training fields and the Grad-CAM fields. `run.run` calls the
mode's `check_config` once, before any work starts. A field that a mode's config
does not have is skipped (the predict and audit configs are small). Every
failure is an `errors.UserError` naming the flag, what was expected and an
example, e.g.

  --config.train.batch_size=0 must be a positive multiple of the 1 device(s); set e.g.
  --config.train.batch_size=32.
"""

import importlib.util
import os
import zipfile


from simclr_jax.data import arrays as arrays_lib
from simclr_jax import config_fields as fields
from simclr_jax import errors
from simclr_jax.explain import gradcam
from simclr_jax.model import heads
from simclr_jax.model import resnet
from simclr_jax.train import workdirs
from simclr_jax.model import sam
from simclr_jax.data import splits as splits_lib
from simclr_jax.data import batches
from simclr_jax.data import subjects
from simclr_jax.data.datasets import DATASET_NAMES
from simclr_jax.data.datasets import nifti_folder
from simclr_jax.data.datasets import synthetic_mri

# A ResNet's stem (stride-2 convolution, stride-2 max pooling) and its stages 2-4
# (stride 2 each) downsample 32x: a smaller image leaves the last stage less than
# one input pixel per cell.
MIN_IMAGE_SIZE = 32
SELECTION_METRICS = ('balanced_accuracy', 'accuracy', 'macro_f1')
SELECTION_SPLITS = ('val', 'test')
SUBJECT_ID_SOURCES = ('auto', 'dataset', 'recovered')
DTYPES = ('float32', 'bfloat16', 'auto')  # auto: bfloat16 on GPU/TPU, float32 on CPU.
CHANNELS = (1, 3)

# ----------------------------------------------------------------------------- paths


def _check_workdir_url(workdir):
  """A URL workdir: a scheme every writer knows, a bucket, and orbax's GCS client."""
  scheme, _, rest = workdir.partition('://')
  if scheme not in workdirs.URL_SCHEMES:
    raise errors.UserError(
        f'--workdir={workdir}: {scheme}:// is not a filesystem this tool writes to; use a '
        'local directory or a Cloud Storage URL, gs://BUCKET/PATH.')
  if not rest.split('/', 1)[0]:
    raise errors.UserError(f'--workdir={workdir} names no bucket; use {scheme}://BUCKET/PATH.')
  if scheme == 'gs':
    try:
      found = importlib.util.find_spec('google.cloud.storage') is not None
    except ImportError:
      found = False
    if not found:
      raise errors.UserError(
          f'--workdir={workdir} needs the google-cloud-storage package (orbax deletes '
          'old checkpoints in a bucket through it): pip install google-cloud-storage, '
          'then run the same command again.')


def check_workdir(workdir):
  """Rejects a --workdir that is a file or cannot be created; creates nothing."""
  workdir = str(workdir)
  if workdirs.is_url(workdir):
    _check_workdir_url(workdir)
    return  # A bucket: its permissions show on the first write.
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UserError(f'--workdir={workdir} is a file, not a directory; point '
                           '--workdir at a new or existing directory.')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise errors.UserError(f'--workdir={workdir} cannot be created: {existing} is a '
                           'file; point --workdir elsewhere.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise errors.UserError(f'--workdir={workdir} cannot be written: {existing} is not '
                           'writable by you; point --workdir at a directory you can '
                           'write to.')


def _check_dataset(config):
  """dataset names a data set; dataset_path, when given, exists and suits it."""
  name = fields.get(config, 'data.name')
  if name is fields.MISSING:
    return
  family, _, variant = str(name).partition('/')
  known = name in DATASET_NAMES or (
      family == 'synthetic_mri' and variant in synthetic_mri.SyntheticMri.builder_configs)
  if not known:
    configs = ', '.join(f'synthetic_mri/{c}'
                        for c in synthetic_mri.SyntheticMri.builder_configs)
    raise errors.UserError(
        f'Unknown data set {name!r}; set --config.data.name to one of '
        f'{", ".join(n for n in DATASET_NAMES if "/" not in n)} (or {configs}).')
  path = fields.get(config, 'data.path')
  folders = ('image_folder', 'nifti_folder')
  what = {'alzheimer_mri': 'the Kaggle zip or its extracted Dataset/ folder',
          'image_folder': 'a folder with one subfolder of images per class',
          'nifti_folder': 'a folder with one subfolder of NIfTI or Analyze volumes per '
                          'class'}.get(name, 'an existing path, or leave it unset '
                                             '(synthetic_mri reads no files)')
  if path is fields.MISSING or path is None or path == '':
    if name in folders and path is not fields.MISSING:
      raise errors.UserError(f'The {name} data set needs data.path, {what}; set '
                             '--config.data.path.')
    return
  if '://' in str(path):
    return
  local = os.path.expanduser(str(path))
  if not os.path.exists(local):
    raise errors.MissingPathError(
        f'--config.data.path={path} does not exist; point it at {what}.')
  if name in folders and not os.path.isdir(local):
    raise errors.UserError(f'--config.data.path={path} is a file; the {name} data set '
                           f'reads {what}.')
  if name == 'alzheimer_mri' and os.path.isfile(local) and not zipfile.is_zipfile(local):
    raise errors.UserError(
        f'--config.data.path={path} is not a readable zip file (damaged or '
        f'incomplete?); download the Kaggle zip again, or point it at {what}.')


def check_input_fields(config, min_image_size):
  """The data set fields (configs/default.py's add_input_fields)."""
  _check_dataset(config)
  data_dir = fields.get(config, 'data.dir')
  if (data_dir not in (fields.MISSING, None) and '://' not in str(data_dir)
      and os.path.isfile(os.path.expanduser(str(data_dir)))):
    raise errors.UserError(f'--config.data.dir={data_dir} is a file; point it at a '
                           'directory for the TFDS data sets (or leave it unset).')
  image_size = fields.get(config, 'data.image_size')
  if min_image_size == 1:
    fields.integer(config, 'data.image_size', example=64)
  elif image_size is not fields.MISSING and (not fields.is_int(image_size)
                                       or image_size < min_image_size):
    fields.fail('data.image_size', image_size,
                f'is too small for a ResNet: its stem and 4 stages downsample {MIN_IMAGE_SIZE}x, '
                f'so image_size must be a whole number >= {MIN_IMAGE_SIZE}', 64)
  fields.boolean(config, 'data.skip_unreadable')
  if fields.get(config, 'data.nifti.slice_selection') is not fields.MISSING:
    fields.choice(config, 'data.nifti.slice_selection', nifti_folder.SLICE_SELECTIONS)
    fields.integer(config, 'data.nifti.num_slices', example=32)
    fields.integer(config, 'data.nifti.slice_step', example=1)
    fields.real(config, 'data.nifti.min_mask_fraction', 0, 1, low_open=True, example=0.5,
                meaning=', a share of the largest slice\'s brain area')
  fields.choice(config, 'data.subject_ids', SUBJECT_ID_SOURCES)
  fields.real(config, 'data.grouping.threshold', -1, 1, low_open=True, example=0.98,
              meaning=', a correlation')
  fields.integer(config, 'data.grouping.k', example=10)
  fields.integer(config, 'data.grouping.size', example=64)


def check_split_fields(config):
  """configs/default.py's add_split_fields."""
  fields.choice(config, 'split.scheme', splits_lib.SPLIT_SCHEMES,
                'set --config.split.scheme to subject (honest) or slice (the reference\'s '
                'leaky split)')
  fields.seeds(config, 'split.seed')
  for name in ('split.test_fraction', 'split.val_fraction'):
    fields.real(config, name, 0, 1, high_open=True,
                example=0.1 if name == 'split.val_fraction' else 0.2,
                meaning=', a share of each class\'s subjects')
  # K-fold splits, where a config has them; the upper bound (subjects per class)
  # needs the data and is checked by splits.py.
  fields.integer(config, 'split.num_folds', low=2, example=5, optional=True)
  num_folds, fold = fields.get(config, 'split.num_folds'), fields.get(config, 'split.fold')
  if fold is not fields.MISSING and fold is not None:
    fields.integer(config, 'split.fold', low=0, example=0)
    if fields.is_int(num_folds) and fold >= num_folds:
      fields.fail('split.fold', fold,
                  f'is not one of the {num_folds} folds 0 .. {num_folds - 1}', 0)


# ----------------------------------------------------------------------------- modes


def check_mode(config, modes):
  mode = fields.get(config, 'mode')
  if mode not in modes:
    raise errors.UserError(f'Unknown mode {mode!r}; set --config.mode to one of '
                           f'{sorted(modes)} (or pick a file in configs/).')
  return mode


def check_training_fields(config):
  """The fields that pretrain, finetune and baseline runs (and the sweep's) read."""
  fields.seeds(config, 'seed')
  check_input_fields(config, MIN_IMAGE_SIZE)
  channels = fields.get(config, 'data.channels')
  if channels is not fields.MISSING and channels not in CHANNELS:
    fields.fail('data.channels', channels,
                'must be 1 (gray) or 3 (gray repeated, as the reference)', 1)
  check_split_fields(config)
  check_label_budget(config)
  fields.seeds(config, 'labels.seed')
  fields.boolean(config, 'split.include_test_in_pretrain', 'augment.labeled', 'augment.flip',
                 'augment.blur', 'pretrain.joint_views', 'pretrain.temperature_schedule',
                 'finetune.linear_probe')
  fields.choice(config, 'data.on_device', ('auto', True, False, 'True', 'False', 'true', 'false'),
                'set --config.data.on_device to auto, True or False')

  fields.range_pair(config, 'augment.crop_scale', 1.0, (0.5, 1.0),
                    'the share of the image area a crop keeps')
  fields.range_pair(config, 'augment.crop_ratio', None, (1.0, 1.0),
                    'the aspect ratio range of a crop')
  for name, example in (('augment.rotation_degrees', 10.0), ('augment.brightness', 0.1),
                        ('augment.contrast', 0.1)):
    fields.real(config, name, 0, example=example)

  fields.choice(config, 'model.name', sorted(resnet.STAGE_SIZES))
  fields.real(config, 'model.width', 0, low_open=True, example=1.0,
              meaning=' (the multiplier of every stage\'s filters)')
  fields.choice(config, 'model.encoder_output', heads.ENCODER_OUTPUTS)
  fields.integers(config, 'pretrain.projection_dims', (256, 128),
                  meaning=' (hidden sizes, then the output size)')
  for name in ('pretrain.projection_dropout', 'supervised.head_dropout'):
    fields.real(config, name, 0, 1, high_open=True, example=0.5, meaning=', a dropout rate')
  fields.choice(config, 'model.dtype', DTYPES)
  fields.choice(config, 'labels.task', arrays_lib.TASKS)
  fields.choice(config, 'labels.class_weights', ('none', 'balanced'))

  fields.integer(config, 'train.num_epochs', example=10)
  fields.integer(config, 'train.steps_per_dispatch', low=0, example=0)
  fields.device_batch(config, 'train.batch_size', 32)
  fields.device_batch(config, 'eval.batch_size', 128)
  fields.real(config, 'pretrain.optimizer.learning_rate', 0, low_open=True, example=0.01)
  fields.real(config, 'pretrain.optimizer.momentum', 0, 1, high_open=True, example=0.9)
  fields.real(config, 'pretrain.optimizer.weight_decay', 0, example=0.0)
  fields.real(config, 'pretrain.optimizer.warmup_fraction', 0, 1, high_open=True, example=0.3,
              meaning=', the share of steps rising to the peak learning rate')
  for name in ('pretrain.sam', 'supervised.sam'):
    fields.choice(config, name, sam.MODES)
  for section in ('pretrain', 'supervised'):
    fields.real(config, f'{section}.sam_rho', 0, example=2.0)
    fields.real(config, f'{section}.sam_eta', 0, example=0.0)
  fields.real(config, 'pretrain.temperature', 0, low_open=True, example=0.5)
  steps = fields.get(config, 'pretrain.temperature_steps')
  if steps is not fields.MISSING and not (
      isinstance(steps, (tuple, list)) and all(
          isinstance(s, (tuple, list)) and len(s) == 2 and fields.is_real(s[0])
          and fields.is_real(s[1]) and s[1] > 0 for s in steps)):
    fields.fail('pretrain.temperature_steps', steps, 'must be a tuple of (epoch-loss threshold, '
                'temperature) pairs with positive temperatures',
                ((3.0, 0.3), (2.0, 0.1), (1.0, 0.05)))
  fields.choice(config, 'pretrain.positive_pairs', batches.POSITIVE_PAIRS,
                'set --config.pretrain.positive_pairs to image (two views of one image) or '
                'subject (of one subject\'s nearby slices)')
  fields.integer(config, 'pretrain.positive_max_slice_distance', low=0, example=2)
  if fields.get(config, 'mode') in ('pretrain', 'sweep') and fields.get(
      config, 'pretrain.positive_pairs') == 'subject':
    subjects.check_subject_pairs(config)
  fields.real(config, 'supervised.optimizer.learning_rate', 0, low_open=True, example=1e-4)
  fields.real(config, 'supervised.optimizer.weight_decay', 0, example=1e-8)

  fields.choice(config, 'eval.selection_metric', SELECTION_METRICS)
  fields.choice(config, 'eval.selection_split', SELECTION_SPLITS,
                'set --config.eval.selection_split to val (or test only to reproduce the '
                'reference protocol)')
  fields.integer(config, 'eval.every_epochs', example=1)
  fields.integer(config, 'eval.precise_bn_batches', example=8, optional=True)
  fields.integers(config, 'eval.knn_k', (1, 10), meaning=' (the k of the kNN monitor)')
  fields.integer(config, 'train.log_every_steps', example=10)
  fields.integer(config, 'train.checkpoint_every_steps', example=200, optional=True)
  fields.real(config, 'train.checkpoint_every_minutes', 0, low_open=True, example=10.0,
              optional=True)
  fields.integer(config, 'train.keep_checkpoints', example=2)
  fields.integer(config, 'train.num_summary_images', low=0, example=8)


def check_label_budget(config):
  """labels.unit, and the one of labels.fraction / labels.subjects that it reads."""
  fields.choice(config, 'labels.unit', splits_lib.LABEL_UNITS,
                'set --config.labels.unit to slice (a share of the slices) or subject (k people '
                'with all their slices)')
  fields.real(config, 'labels.fraction', 0, 1, low_open=True, example=0.1,
              meaning=', the share of the labeled train split used')
  fields.integer(config, 'labels.subjects', low=0, example=8, optional=True)
  unit, subjects = fields.get(config, 'labels.unit'), fields.get(config, 'labels.subjects')
  fraction = fields.get(config, 'labels.fraction')
  if unit == 'slice' and subjects not in (fields.MISSING, None, 0):
    raise errors.UserError(
        f'--config.labels.subjects={subjects} is read only with --config.labels.unit=subject; '
        'add --config.labels.unit=subject (or leave labels.subjects at 0).')
  if unit == 'subject' and fraction not in (fields.MISSING, 1.0):
    raise errors.UserError(
        f'--config.labels.fraction={fraction} is read only with --config.labels.unit=slice; '
        'set --config.labels.unit=slice (or leave labels.fraction at 1.0).')


def check_cam_fields(config):
  fields.choice(config, 'cam.method', gradcam.CAM_METHODS)
  fields.choice(config, 'cam.layer', ('stage1', 'stage2', 'stage3', 'stage4'),
                'set --config.cam.layer to one of stage1, stage2, stage3, stage4 (the last '
                'convolutional stage)')
