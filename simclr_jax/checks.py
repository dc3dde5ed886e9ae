"""Every config value checked before any work starts, in one sentence naming the fix.

`check_config(config)` is the one check of a config, dispatched on its mode:

- pretrain, finetune, baseline (`check_train_config`): input, split, model,
  optimisation, evaluation and checkpoint fields; finetune's pretrain run.
- sweep: the training fields its runs share, then the sweep's own fields.
- predict: the Grad-CAM fields, the inputs and the run to classify with.
- audit: input, split and audit fields.

`run.run` calls it before dispatching, so no mode starts work on a config it
cannot finish; each mode's own entry (`tasks.check_config`,
`sweep_plan.check_sweep_config`, `predict.check_config`, `audit.check_config`)
delegates here, so calling a mode directly checks the same. A field that a
mode's config does not have is skipped (the predict and audit configs are
small). Every failure is an `errors.UserError` naming the flag, what was
expected and an example, e.g.

  --config.batch_size=0 must be a positive multiple of the 1 device(s); set e.g.
  --config.batch_size=32.
"""

import importlib.util
import math
import numbers
import os
import re
import zipfile

import jax

from simclr_jax import data as data_lib
from simclr_jax import errors
from simclr_jax import gradcam
from simclr_jax import models
from simclr_jax import neighbours
from simclr_jax import runs
from simclr_jax import sam
from simclr_jax import splits as splits_lib
from simclr_jax import state as state_lib
from simclr_jax.datasets import DATASET_NAMES
from simclr_jax.datasets import nifti_folder
from simclr_jax.datasets import synthetic_mri

MODES = ('pretrain', 'finetune', 'baseline', 'predict', 'sweep', 'audit')
# A ResNet's stem (stride-2 convolution, stride-2 max pooling) and its stages 2-4
# (stride 2 each) downsample 32x: a smaller image leaves the last stage less than
# one input pixel per cell.
MIN_IMAGE_SIZE = 32
SELECTION_METRICS = ('balanced_accuracy', 'accuracy', 'macro_f1')
SELECTION_SPLITS = ('val', 'test')
SUBJECT_ID_SOURCES = ('auto', 'dataset', 'recovered')
DTYPES = ('float32', 'bfloat16')
CHANNELS = (1, 3)
CAM_LAYER = re.compile(r'stage[1-4]')
TEST_SPLIT = 'test_split'  # predict: classify the run's own test split.

_MISSING = object()


# ----------------------------------------------------------------------------- helpers


def _get(config, name):
  """config.a.b for name 'a.b', or _MISSING where the config lacks the field."""
  value = config
  for part in name.split('.'):
    getter = getattr(value, 'get', None)
    if getter is None:
      return _MISSING
    value = getter(part, _MISSING)
    if value is _MISSING:
      return _MISSING
  return value


def _show(value):
  """A value as written on the command line."""
  if isinstance(value, (tuple, list)):
    text = repr(tuple(value))
    quote = '"' if "'" in text else "'"
    return quote + text + quote
  return str(value)


def _fail(name, value, expected, example=None):
  fix = f'; set e.g. --config.{name}={_show(example)}' if example is not None else ''
  raise errors.UserError(f'--config.{name}={_show(value)} {expected}{fix}.')


def _is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _int(config, name, low=1, example=None, optional=False):
  """An integer field >= low (None too if optional)."""
  value = _get(config, name)
  if value is _MISSING or (optional and value is None):
    return
  if not _is_int(value) or value < low:
    what = {0: 'a whole number >= 0', 1: 'a positive whole number'}.get(
        low, f'a whole number >= {low}')
    _fail(name, value, f'must be {what}' + (' (or None)' if optional else ''),
          example if example is not None else max(low, 1))


def _real(config, name, low=None, high=None, *, low_open=False, high_open=False,
          example=None, meaning='', optional=False):
  """A finite number field in the interval given by its bounds."""
  value = _get(config, name)
  if value is _MISSING or (optional and value is None):
    return
  ok = _is_real(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if ok:
    return
  if low == 0 and high is None:
    what = 'a positive number' if low_open else 'a number >= 0'
  elif high is None:
    what = f'a number {">" if low_open else ">="} {low:g}'
  else:
    what = (f'in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}')
  _fail(name, value, f'must be {what}{meaning}' + (' (or None)' if optional else ''),
        example)


def _choice(config, name, choices, fix=None):
  value = _get(config, name)
  if value is _MISSING or value in choices:
    return
  fix = fix or f'set --config.{name} to one of {", ".join(map(str, choices))}'
  raise errors.UserError(f'Unknown {name} {value!r}; {fix}.')


def _bool(config, *names):
  for name in names:
    value = _get(config, name)
    if value is not _MISSING and not isinstance(value, bool):
      _fail(name, value, 'must be True or False', True)


def _ints(config, name, example, low=1, meaning=''):
  """A non-empty tuple of whole numbers >= low."""
  value = _get(config, name)
  if value is _MISSING:
    return
  if (not isinstance(value, (tuple, list)) or not value
      or not all(_is_int(v) and v >= low for v in value)):
    what = 'positive whole numbers' if low == 1 else f'whole numbers >= {low}'
    _fail(name, value, f'must be a non-empty tuple of {what}{meaning}', example)


def _range_pair(config, name, high, example, meaning):
  """A (low, high) pair with 0 < low <= high (<= `high` unless None)."""
  value = _get(config, name)
  if value is _MISSING:
    return
  ok = (isinstance(value, (tuple, list)) and len(value) == 2
        and all(_is_real(v) for v in value) and 0 < value[0] <= value[1]
        and (high is None or value[1] <= high))
  if not ok:
    bound = f' <= {high:g}' if high is not None else ''
    _fail(name, value, f'must be a pair (low, high) with 0 < low <= high{bound}, '
          f'{meaning}', example)


def _device_batch(config, name, example):
  """A global batch: positive and split evenly over every device."""
  value = _get(config, name)
  if value is _MISSING:
    return
  devices = jax.device_count()
  if not _is_int(value) or value < 1 or value % devices:
    example = devices * max(1, round(example / devices))
    _fail(name, value, f'must be a positive multiple of the {devices} device(s)', example)


def _seed(config, *names):
  for name in names:
    _int(config, name, low=0, example=0)


# ----------------------------------------------------------------------------- paths


def _check_workdir_url(workdir):
  """A URL workdir: a scheme every writer knows, a bucket, and orbax's GCS client."""
  scheme, _, rest = workdir.partition('://')
  if scheme not in runs.URL_SCHEMES:
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
  if runs.is_url(workdir):
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
  name = _get(config, 'dataset')
  if name is _MISSING:
    return
  family, _, variant = str(name).partition('/')
  known = name in DATASET_NAMES or (
      family == 'synthetic_mri' and variant in synthetic_mri.SyntheticMri.builder_configs)
  if not known:
    configs = ', '.join(f'synthetic_mri/{c}'
                        for c in synthetic_mri.SyntheticMri.builder_configs)
    raise errors.UserError(
        f'Unknown data set {name!r}; set --config.dataset to one of '
        f'{", ".join(n for n in DATASET_NAMES if "/" not in n)} (or {configs}).')
  path = _get(config, 'dataset_path')
  folders = ('image_folder', 'nifti_folder')
  what = {'alzheimer_mri': 'the Kaggle zip or its extracted Dataset/ folder',
          'image_folder': 'a folder with one subfolder of images per class',
          'nifti_folder': 'a folder with one subfolder of NIfTI or Analyze volumes per '
                          'class'}.get(name, 'an existing path, or leave it unset '
                                             '(synthetic_mri reads no files)')
  if path is _MISSING or path is None or path == '':
    if name in folders and path is not _MISSING:
      raise errors.UserError(f'The {name} data set needs dataset_path, {what}; set '
                             '--config.dataset_path.')
    return
  if '://' in str(path):
    return
  local = os.path.expanduser(str(path))
  if not os.path.exists(local):
    raise errors.MissingPathError(
        f'--config.dataset_path={path} does not exist; point it at {what}.')
  if name in folders and not os.path.isdir(local):
    raise errors.UserError(f'--config.dataset_path={path} is a file; the {name} data set '
                           f'reads {what}.')
  if name == 'alzheimer_mri' and os.path.isfile(local) and not zipfile.is_zipfile(local):
    raise errors.UserError(
        f'--config.dataset_path={path} is not a readable zip file (damaged or '
        f'incomplete?); download the Kaggle zip again, or point it at {what}.')


def _check_input_fields(config, min_image_size):
  """The data set fields (configs/default.py's add_input_fields)."""
  _check_dataset(config)
  data_dir = _get(config, 'data_dir')
  if (data_dir not in (_MISSING, None) and '://' not in str(data_dir)
      and os.path.isfile(os.path.expanduser(str(data_dir)))):
    raise errors.UserError(f'--config.data_dir={data_dir} is a file; point it at a '
                           'directory for the TFDS data sets (or leave it unset).')
  image_size = _get(config, 'image_size')
  if min_image_size == 1:
    _int(config, 'image_size', example=64)
  elif image_size is not _MISSING and (not _is_int(image_size)
                                       or image_size < min_image_size):
    _fail('image_size', image_size,
          f'is too small for a ResNet: its stem and 4 stages downsample {MIN_IMAGE_SIZE}x, '
          f'so image_size must be a whole number >= {MIN_IMAGE_SIZE}', 64)
  _bool(config, 'skip_unreadable')
  if _get(config, 'nifti_slice_selection') is not _MISSING:
    _choice(config, 'nifti_slice_selection', nifti_folder.SLICE_SELECTIONS)
    _int(config, 'nifti_num_slices', example=32)
    _int(config, 'nifti_slice_step', example=1)
    _real(config, 'nifti_min_mask_fraction', 0, 1, low_open=True, example=0.5,
          meaning=', a share of the largest slice\'s brain area')
  _choice(config, 'subject_ids', SUBJECT_ID_SOURCES)
  _real(config, 'subject_grouping_threshold', -1, 1, low_open=True, example=0.98,
        meaning=', a correlation')
  _int(config, 'subject_grouping_k', example=10)
  _int(config, 'subject_grouping_size', example=64)


def _check_split_fields(config):
  """configs/default.py's add_split_fields."""
  _choice(config, 'split_scheme', splits_lib.SPLIT_SCHEMES,
          'set --config.split_scheme to subject (honest) or slice (the reference\'s '
          'leaky split)')
  _seed(config, 'split_seed')
  for name in ('test_fraction', 'val_fraction'):
    _real(config, name, 0, 1, high_open=True, example=0.1 if name == 'val_fraction' else 0.2,
          meaning=', a share of each class\'s subjects')
  # K-fold splits, where a config has them; the upper bound (subjects per class)
  # needs the data and is checked by splits.py.
  _int(config, 'num_folds', low=2, example=5, optional=True)
  num_folds, fold = _get(config, 'num_folds'), _get(config, 'fold')
  if fold is not _MISSING and fold is not None:
    _int(config, 'fold', low=0, example=0)
    if _is_int(num_folds) and fold >= num_folds:
      _fail('fold', fold, f'is not one of the {num_folds} folds 0 .. {num_folds - 1}', 0)


# ----------------------------------------------------------------------------- modes


def _check_mode(config, modes):
  mode = _get(config, 'mode')
  if mode not in modes:
    raise errors.UserError(f'Unknown mode {mode!r}; set --config.mode to one of '
                           f'{sorted(modes)} (or pick a file in configs/).')
  return mode


def _check_training_fields(config):
  """The fields that pretrain, finetune and baseline runs (and the sweep's) read."""
  _seed(config, 'seed')
  _check_input_fields(config, MIN_IMAGE_SIZE)
  channels = _get(config, 'channels')
  if channels is not _MISSING and channels not in CHANNELS:
    _fail('channels', channels, 'must be 1 (gray) or 3 (gray repeated, as the reference)', 1)
  _check_split_fields(config)
  _real(config, 'label_fraction', 0, 1, low_open=True, example=0.1,
        meaning=', the share of the labeled train split used')
  _seed(config, 'label_seed')
  _bool(config, 'include_test_in_pretrain', 'train_augment', 'augment.flip',
        'augment.blur', 'joint_views', 'temperature_schedule', 'linear_probe')
  _int(config, 'prefetch', low=0, example=2)
  _choice(config, 'data_on_device', ('auto', True, False, 'True', 'False', 'true', 'false'),
          'set --config.data_on_device to auto, True or False')

  _range_pair(config, 'augment.crop_scale', 1.0, (0.5, 1.0),
              'the share of the image area a crop keeps')
  _range_pair(config, 'augment.crop_ratio', None, (1.0, 1.0),
              'the aspect ratio range of a crop')
  for name, example in (('augment.rotation_degrees', 10.0), ('augment.brightness', 0.1),
                        ('augment.contrast', 0.1)):
    _real(config, name, 0, example=example)

  _choice(config, 'model', sorted(models.STAGE_SIZES))
  _real(config, 'width', 0, low_open=True, example=1.0,
        meaning=' (the multiplier of every stage\'s filters)')
  _choice(config, 'encoder_output', models.ENCODER_OUTPUTS)
  _ints(config, 'projection_dims', (256, 128), meaning=' (hidden sizes, then the output size)')
  for name in ('projection_dropout', 'head_dropout'):
    _real(config, name, 0, 1, high_open=True, example=0.5, meaning=', a dropout rate')
  _choice(config, 'dtype', DTYPES)
  _choice(config, 'task', data_lib.TASKS)
  _choice(config, 'class_weights', ('none', 'balanced'))

  _int(config, 'num_epochs', example=10)
  _int(config, 'steps_per_dispatch', low=0, example=0)
  _device_batch(config, 'batch_size', 32)
  _device_batch(config, 'eval_batch_size', 128)
  _real(config, 'pretrain_optimizer.learning_rate', 0, low_open=True, example=0.01)
  _real(config, 'pretrain_optimizer.momentum', 0, 1, high_open=True, example=0.9)
  _real(config, 'pretrain_optimizer.weight_decay', 0, example=0.0)
  _real(config, 'pretrain_optimizer.warmup_fraction', 0, 1, high_open=True, example=0.3,
        meaning=', the share of steps rising to the peak learning rate')
  for name in ('sam', 'finetune_sam'):
    _choice(config, name, sam.MODES)
  _real(config, 'sam_rho', 0, example=2.0)
  _real(config, 'sam_eta', 0, example=0.0)
  _real(config, 'temperature', 0, low_open=True, example=0.5)
  steps = _get(config, 'temperature_steps')
  if steps is not _MISSING and not (
      isinstance(steps, (tuple, list)) and all(
          isinstance(s, (tuple, list)) and len(s) == 2 and _is_real(s[0]) and _is_real(s[1])
          and s[1] > 0 for s in steps)):
    _fail('temperature_steps', steps, 'must be a tuple of (epoch-loss threshold, '
          'temperature) pairs with positive temperatures',
          ((3.0, 0.3), (2.0, 0.1), (1.0, 0.05)))
  _real(config, 'finetune_optimizer.learning_rate', 0, low_open=True, example=1e-4)
  _real(config, 'finetune_optimizer.weight_decay', 0, example=1e-8)

  _choice(config, 'selection_metric', SELECTION_METRICS)
  _choice(config, 'selection_split', SELECTION_SPLITS,
          'set --config.selection_split to val (or test only to reproduce the '
          'reference protocol)')
  _int(config, 'eval_every_epochs', example=1)
  _int(config, 'precise_bn_batches', example=8, optional=True)
  _ints(config, 'knn_k', (1, 10), meaning=' (the k of the kNN monitor)')
  _int(config, 'log_every_steps', example=10)
  _int(config, 'checkpoint_every_steps', example=200)
  _int(config, 'keep_checkpoints', example=2)
  _int(config, 'num_summary_images', low=0, example=8)


def check_train_config(config):
  """A pretrain, finetune or baseline config (tasks.check_config)."""
  mode = _check_mode(config, state_lib.TRAIN_MODES)
  _check_training_fields(config)
  if mode == 'finetune':
    runs.pretrained_config(config)  # The pretrain run exists and has the same architecture.


def check_sweep_config(config):
  """A sweep config: its runs' training fields, then the sweep's own."""
  from simclr_jax import sweep_plan  # pylint: disable=g-import-not-at-top
  _check_mode(config, ('sweep',))
  _check_training_fields(config)
  protocols = _get(config, 'protocols')
  unknown = [p for p in protocols if p not in sweep_plan.PROTOCOLS]
  if unknown or not protocols:
    raise errors.UserError(
        f'Unknown protocols {unknown or "(none)"}; set --config.protocols to some of '
        f'{tuple(sweep_plan.PROTOCOLS)}, e.g. "(\'honest\',)".')
  fractions = config.fractions
  if not fractions or any(not _is_real(f) or not 0.0 < f <= 1.0 for f in fractions):
    raise errors.UserError(f'Label fractions must be in (0, 1], got {fractions}; set '
                           '--config.fractions to e.g. "(0.01, 0.1, 1.0)".')
  if not config.seeds or not config.reference_seeds:
    raise errors.UserError('The sweep needs at least one seed; set --config.seeds and '
                           '--config.reference_seeds to e.g. "(0,)".')
  for name in ('seeds', 'reference_seeds'):
    _ints(config, name, (0,), low=0, meaning=' (seeds)')
  _real(config, 'multi_seed_max_fraction', 0, 1, example=0.2,
        meaning=', the largest label fraction run with every seed')
  _int(config, 'pretrain_num_epochs', example=100)
  _int(config, 'max_steps_per_run', example=600, optional=True)
  _int(config, 'reference_num_epochs', example=100, optional=True)
  _int(config, 'evals_per_run', example=5, optional=True)
  _int(config, 'floor_image_size', example=64, optional=True)
  _int(config, 'bootstrap_samples', low=100, example=2000)
  tasks = _get(config, 'tasks')
  if tasks is not _MISSING and (not tasks or any(t not in data_lib.TASKS for t in tasks)):
    raise errors.UserError(f'Unknown tasks {tasks}; set --config.tasks to some of '
                           f'{data_lib.TASKS}, e.g. "(\'four_class\', \'binary\')".')
  _check_cam_fields(config)


def _check_cam_fields(config):
  _choice(config, 'cam_method', gradcam.CAM_METHODS)
  _choice(config, 'cam_layer', ('stage1', 'stage2', 'stage3', 'stage4'),
          'set --config.cam_layer to one of stage1, stage2, stage3, stage4 (the last '
          'convolutional stage)')


def check_predict_config(config):
  """A predict config: Grad-CAM fields, then the inputs, then the run to classify with."""
  from simclr_jax import predict  # pylint: disable=g-import-not-at-top
  _check_mode(config, ('predict',))
  _seed(config, 'seed')
  _check_cam_fields(config)
  _int(config, 'batch_size', example=32)
  _bool(config, 'evaluate_cam')
  fractions = _get(config, 'deletion_fractions')
  if fractions is not _MISSING and not (
      isinstance(fractions, (tuple, list)) and fractions
      and all(_is_real(f) and 0.0 < f < 1.0 for f in fractions)):
    _fail('deletion_fractions', fractions, 'must be a non-empty tuple of shares in (0, 1)',
          (0.05, 0.1, 0.2))
  inputs = _get(config, 'inputs')
  if inputs != TEST_SPLIT:
    predict.find_inputs(None if inputs is _MISSING else inputs)
  workdir = _get(config, 'checkpoint_workdir')
  predict.check_run(None if workdir is _MISSING else workdir)


def check_audit_config(config):
  """An audit config: input and split fields, then the audit's own."""
  _check_mode(config, ('audit',))
  _seed(config, 'seed')
  _check_input_fields(config, 1)
  _check_split_fields(config)
  _choice(config, 'audit_metric', neighbours.METRICS)
  for name in ('audit_threshold', 'audit_default_threshold', 'grouping_threshold'):
    value = _get(config, name)
    if value is not _MISSING and value is not None and not (
        _is_real(value) and -1.0 < value <= 1.0):
      raise errors.UserError(
          f'--config.{name}={value} is outside (-1, 1], the range of a '
          f'{config.audit_metric} similarity; set a value such as 0.98.')
  for name in ('audit_image_size', 'audit_chunk_size', 'grouping_k'):
    _int(config, name, example={'audit_image_size': 64, 'audit_chunk_size': 1024,
                                'grouping_k': 10}[name])
  _int(config, 'audit_num_pairs_shown', low=0, example=6)
  _int(config, 'grouping_max_size', low=2, example=64, optional=True)


_CHECKS = {
    'pretrain': check_train_config,
    'finetune': check_train_config,
    'baseline': check_train_config,
    'sweep': check_sweep_config,
    'predict': check_predict_config,
    'audit': check_audit_config,
}


def check_config(config):
  """Checks every field of `config` for its mode; raises errors.UserError naming the fix."""
  _check_mode(config, MODES)
  _CHECKS[config.mode](config)
