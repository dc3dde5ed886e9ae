"""Default configuration of the training modes, in sections: the reference study's settings.

Sections (each a nested ConfigDict, as big_vision's `config.input`, `config.model`):
`data` (the data set and its subjects), `split` (train / val / test), `labels` (the
label task and the labeled subset), `augment` (views and labeled-image
augmentation), `model`, `train` (run length, batch, logging, checkpoints),
`pretrain` (SimCLR: projection head, optimizer with SAM/ASAM, NT-Xent, positive pairs),
`supervised` (finetune and baseline: head and optimizer), `finetune` (the
pretraining run it starts from), `eval` (model selection and monitors).

The training mode files (pretrain.py, finetune.py, baseline.py) and sweep.py
start from `get_config()` and override a few fields; audit.py takes only the
`data` and `split` sections, predict.py only `base_config()`, so that each config
holds the sections its mode reads. Config arguments follow big_vision:
`configs/pretrain.py:runlocal` shrinks everything for a CPU demo,
`configs/finetune.py:label_fraction=0.1` sets a field, and any field can be
overridden with `--config.section.field=value` (e.g. `--config.model.name=resnet18`).
"""

import json
import os

import ml_collections
from ml_collections import config_dict

from simclr_jax import errors

# Where each field of the flat config (before the sections) went: the one-line
# error for an old `--config.field` flag names its new place.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'flat_names.json')) as f:
  FLAT_NAMES = json.load(f)


def parse_arg(arg, **defaults):
  """Parses 'runlocal,key=value,...' into a ConfigDict with typed defaults.

  Args:
    arg: the string after ':' in `--config=configs/x.py:arg`, or None.
    **defaults: known keys and their default values; values in `arg` are cast
      to the type of the default.

  Returns:
    A ConfigDict with every key of `defaults`.
  """
  result = ml_collections.ConfigDict(defaults)
  for token in (arg or '').split(','):
    token = token.strip()
    if not token:
      continue
    key, sep, value = token.partition('=')
    if key not in defaults:
      raise errors.UserError(
          f'Unknown config argument {key!r}; known arguments are '
          f'{sorted(defaults)}.')
    default = defaults[key]
    if not sep:  # A bare word is a boolean switch such as 'runlocal'.
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ('1', 'true', 'yes')
    elif default is None:
      result[key] = value
    else:
      result[key] = type(default)(value)
  return result


def base_config(mode):
  """The fields every mode has."""
  config = ml_collections.ConfigDict()
  config.mode = mode  # One of: pretrain, finetune, baseline, predict, sweep, audit.
  config.seed = 0  # Seed of initialisation, augmentation and data order.
  return config


def data_section():
  """The data set a mode reads, and how its subjects are known."""
  data = ml_collections.ConfigDict()
  data.name = 'alzheimer_mri'  # alzheimer_mri | synthetic_mri | image_folder | nifti_folder.
  data.dir = config_dict.placeholder(str)  # TFDS data dir (None: ~/tensorflow_datasets).
  data.path = config_dict.placeholder(str)  # Kaggle zip or its Dataset/ folder, or an image_folder / nifti_folder root.
  data.image_size = 128  # Images are resized to image_size x image_size.
  data.channels = 3  # 1, or 3 by repeating the gray channel (the reference used 3).
  data.skip_unreadable = False  # image_folder / nifti_folder: skip unreadable files with a warning.
  data.on_device = 'auto'  # uint8 data set on the devices, batches gathered there: auto (under 2 GiB) | True | False.
  data.subject_ids = 'auto'  # auto | dataset (the builder's ids) | recovered (near-duplicate chains).
  data.grouping = ml_collections.ConfigDict()  # subject_ids=recovered: near-duplicate chains.
  data.grouping.threshold = 0.98  # Correlation of downsampled pixels that links two slices.
  data.grouping.k = 10  # A link needs each slice among the other's k nearest.
  data.grouping.size = 64  # Side of the downsampled images compared.
  data.nifti = ml_collections.ConfigDict()  # nifti_folder: which axial slices of a volume.
  data.nifti.slice_selection = 'central'  # central (num_slices around the middle) | every (slice_step) | mask.
  data.nifti.num_slices = 32  # central: slices per volume (the Kaggle set has 32).
  data.nifti.slice_step = 1  # every: step between kept slices.
  data.nifti.min_mask_fraction = 0.5  # mask: smallest brain area kept, a share of the largest slice's.
  return data


def split_section():
  """How the data set is split into train, val and test."""
  split = ml_collections.ConfigDict()
  split.scheme = 'subject'  # subject (honest, default) | slice (the reference's leaky split).
  split.seed = 0  # Seed of the train/val/test split.
  split.test_fraction = 0.2  # Share of each class's subjects (or slices) in test.
  split.val_fraction = 0.1  # Share of each class's train subjects (or slices) held out for model selection.
  split.num_folds = config_dict.placeholder(int)  # K-fold cross-validation over subjects; None: one split by test_fraction.
  split.fold = 0  # With num_folds: the fold whose subjects are the test split, 0 .. num_folds - 1.
  split.include_test_in_pretrain = False  # The reference's transductive setting: pretrain on test images too.
  return split


def cam_section():
  """The Grad-CAM of predict's overlays and of the sweep's gradcam_grid.png."""
  cam = ml_collections.ConfigDict()
  cam.method = 'gradcam'  # gradcam | gradcam++ | hirescam.
  cam.layer = 'stage4'  # Explained stage: stage4 (the last convolutional one) .. stage1.
  return cam


def get_config(arg=None):
  """Returns the default (reference-study) configuration of the training modes."""
  del arg
  config = base_config('pretrain')

  # ---------------------------------------------------------------- Input.
  config.data = data_section()
  config.split = split_section()
  config.labels = ml_collections.ConfigDict()
  config.labels.task = 'four_class'  # four_class (the four stages) | binary (binary_negative_class vs the rest: CDR 0 vs CDR > 0) | three_class (CDR 0 / 0.5 / >= 1: Mild and Moderate merged).
  config.labels.binary_negative_class = 'Non_Demented'  # binary: the class that is label 0; the others become 'Demented'.
  config.labels.unit = 'slice'  # What finetune/baseline label: slice (labels.fraction of each class's train slices) | subject (labels.subjects people, all their slices).
  config.labels.fraction = 1.0  # unit=slice: share of each class's train slices labeled, in (0, 1].
  config.labels.subjects = 0  # unit=subject: train subjects labeled, stratified by class (0: all of them).
  config.labels.seed = 0  # Seed of the nested, stratified label subsets (slices or subjects).
  # Cross entropy: none (the reference) | balanced (class k weighs n / (K * n_k) of the labeled images).
  # balanced chosen on validation: 62.2 vs 48.4 % validation balanced accuracy (docs/results/README.md).
  config.labels.class_weights = 'balanced'

  # SimCLR view augmentation (pretraining) and labeled-image augmentation (finetune/baseline).
  config.augment = ml_collections.ConfigDict()
  config.augment.crop_scale = (0.5, 1.0)  # RandomResizedCrop area range (reference: (0.5, 1)).
  config.augment.crop_ratio = (1.0, 1.0)  # RandomResizedCrop aspect-ratio range (reference: (1, 1)).
  config.augment.flip = False  # Random horizontal flip.
  config.augment.rotation_degrees = 0.0  # Maximum absolute random rotation.
  config.augment.brightness = 0.0  # Maximum brightness jitter (added, images in [0, 1]).
  config.augment.contrast = 0.0  # Maximum contrast jitter (factor in [1 - c, 1 + c]).
  config.augment.blur = False  # Random Gaussian blur.
  config.augment.labeled = True  # finetune/baseline: apply the crop augmentation to labeled images.

  # ---------------------------------------------------------------- Model.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet50'  # resnet18 | resnet34 | resnet50.
  config.model.width = 1.0  # Width multiplier of every ResNet stage (1.0: 64 filters in the stem).
  config.model.encoder_output = 'flatten'  # flatten (the reference: 2048 x 4 x 4 map) | avgpool (standard SimCLR).
  config.model.dtype = 'float32'  # Compute dtype: float32 | bfloat16 | auto (bfloat16 on GPU/TPU); parameters and BatchNorm stay float32.
  config.model.num_classes = 4  # Output classes of the classifier (set from the data set).

  # ---------------------------------------------------------------- Training runs.
  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 100  # Passes over the (labeled) train split.
  config.train.batch_size = 32  # Global batch (images, not views), divisible by the device count.
  config.train.steps_per_dispatch = 0  # Train steps per dispatch (lax.scan); 0: the platform's default (1 on CPU, 16 on GPU/TPU).
  config.train.log_every_steps = 10  # Training metrics period in steps.
  config.train.checkpoint_every_steps = config_dict.placeholder(int)  # Checkpoint period in steps (None: by time only).
  config.train.checkpoint_every_minutes = 10.0  # Checkpoint period in minutes, checked at summaries (None: by steps only); always at the end, the best whenever it improves.
  config.train.keep_checkpoints = 2  # Latest checkpoints kept besides the best one.
  config.train.num_summary_images = 8  # Augmented views written to TensorBoard once.

  # ---------------------------------------------------------------- SimCLR pretraining.
  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.projection_dims = (256, 128)  # Projection head: hidden sizes then output size.
  config.pretrain.projection_dropout = 0.5  # Dropout before each projection Dense (the reference: 0.5).
  # SGD + momentum inside SAM/ASAM with a one-cycle cosine schedule.
  config.pretrain.optimizer = ml_collections.ConfigDict()
  config.pretrain.optimizer.learning_rate = 1e-2  # Peak learning rate of the one-cycle schedule.
  config.pretrain.optimizer.momentum = 0.9  # SGD momentum.
  config.pretrain.optimizer.weight_decay = 0.0  # Decoupled weight decay (the reference: none).
  config.pretrain.optimizer.warmup_fraction = 0.3  # One-cycle: share of steps spent rising to the peak.
  config.pretrain.sam = 'asam'  # none | sam | asam.
  config.pretrain.sam_rho = 2.0  # SAM neighbourhood radius (the reference: ASAM with rho 2).
  config.pretrain.sam_eta = 0.0  # ASAM offset: |w| + eta scales the perturbation (0: davda54/sam, as the reference).
  config.pretrain.positive_pairs = 'image'  # image (SimCLR: two views of one image) | subject (MICLe, Azizi et al. 2021: view 2 from a random nearby slice of the same subject).
  config.pretrain.positive_max_slice_distance = 2  # subject: the partner's slice index differs by at most this (0: the image itself); needs stored subject ids and slice positions.
  config.pretrain.joint_views = True  # Both views in one pass (BatchNorm over 2N, as SimCLR); False: the reference's two calls.
  config.pretrain.temperature = 0.5  # NT-Xent temperature.
  config.pretrain.temperature_schedule = False  # The reference's step-down (0.5 -> 0.3 -> 0.1 -> 0.05 as the loss falls).
  config.pretrain.temperature_steps = ((3.0, 0.3), (2.0, 0.1), (1.0, 0.05))  # (epoch-loss threshold, temperature) pairs.

  # ---------------------------------------------------------------- Fine-tuning and the baseline.
  config.supervised = ml_collections.ConfigDict()
  config.supervised.head_dropout = 0.5  # Dropout before the classification Dense (the reference: 0.5).
  config.supervised.optimizer = ml_collections.ConfigDict()  # AdamW, constant learning rate.
  config.supervised.optimizer.learning_rate = 1e-4  # AdamW learning rate (the reference: 1e-4).
  config.supervised.optimizer.weight_decay = 1e-8  # AdamW weight decay (the reference: 1e-8).
  config.supervised.sam = 'none'  # none | sam | asam (the reference: none).
  config.supervised.sam_rho = 2.0  # SAM neighbourhood radius, where sam is on.
  config.supervised.sam_eta = 0.0  # ASAM offset, where sam is asam.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.pretrained_workdir = config_dict.placeholder(str)  # finetune: workdir of a pretrain run.
  config.finetune.linear_probe = False  # finetune: freeze the encoder and train only the head.

  # ---------------------------------------------------------------- Evaluation.
  config.eval = ml_collections.ConfigDict()
  config.eval.selection_metric = 'balanced_accuracy'  # Validation metric that picks the best checkpoint.
  config.eval.selection_split = 'val'  # Split that picks the best checkpoint: val (honest) | test (the reference protocol only).
  config.eval.every_epochs = 1  # Validation (and kNN monitor) period in epochs.
  config.eval.batch_size = 128  # Global batch size of evaluation.
  config.eval.precise_bn_batches = config_dict.placeholder(int)  # Recompute BatchNorm statistics over this many train batches before each evaluation (None: running averages).
  config.eval.knn_k = (1, 10, 50, 100)  # k of the pretraining kNN monitor.
  return config
