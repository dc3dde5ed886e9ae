"""Default configuration of the training modes: the reference study's settings.

The training mode files (pretrain.py, finetune.py, baseline.py) and sweep.py
start from `get_config()` and override a few fields; audit.py takes only the
input and split sections (`add_input_fields`, `add_split_fields`), predict.py
only `base_config()`, so that each config holds the fields its mode reads.
Config arguments follow big_vision: `configs/pretrain.py:runlocal` shrinks
everything for a CPU demo, `configs/finetune.py:label_fraction=0.1` sets a
field, and any field can be overridden with `--config.field=value`.
"""

import ml_collections
from ml_collections import config_dict

from simclr_jax import errors


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


def add_input_fields(config):
  """The data set a mode reads, and how its subjects are known."""
  config.dataset = 'alzheimer_mri'  # alzheimer_mri | synthetic_mri | image_folder | nifti_folder.
  config.data_dir = config_dict.placeholder(str)  # TFDS data dir (None: ~/tensorflow_datasets).
  config.dataset_path = config_dict.placeholder(str)  # Kaggle zip, its Dataset/ folder, or an image_folder / nifti_folder root.
  config.image_size = 128  # Images are resized to image_size x image_size.
  config.skip_unreadable = False  # image_folder / nifti_folder: skip unreadable files with a warning instead of failing.
  config.nifti_slice_selection = 'central'  # nifti_folder: central (num_slices around the middle) | every (slice_step) | mask (brain area).
  config.nifti_num_slices = 32  # nifti_folder central: axial slices per volume (the Kaggle set has 32).
  config.nifti_slice_step = 1  # nifti_folder every: step between kept slices.
  config.nifti_min_mask_fraction = 0.5  # nifti_folder mask: smallest brain area kept, as a share of the largest slice's.
  config.subject_ids = 'auto'  # auto | dataset (the builder's ids) | recovered (near-duplicate chains); auto: dataset for synthetic_mri and nifti_folder.
  config.subject_grouping_threshold = 0.98  # recovered: correlation of 64 px pixels that links two slices.
  config.subject_grouping_k = 10  # recovered: a link needs each slice among the other's k nearest.
  config.subject_grouping_size = 64  # recovered: side of the downsampled images compared.
  return config


def add_split_fields(config):
  """How the data set is split into train, val and test."""
  config.split_scheme = 'subject'  # subject (honest, default) | slice (the reference's leaky split).
  config.split_seed = 0  # Seed of the train/val/test split.
  config.test_fraction = 0.2  # Share of each class's subjects (or slices) in test.
  config.val_fraction = 0.1  # Share of each class's train subjects (or slices) held out for model selection.
  config.num_folds = config_dict.placeholder(int)  # K-fold cross-validation over subjects (stratified, grouped): None for one split by test_fraction.
  config.fold = 0  # With num_folds: the fold whose subjects are the test split, 0 .. num_folds - 1.
  return config


def get_config(arg=None):
  """Returns the default (reference-study) configuration of the training modes."""
  del arg
  config = base_config('pretrain')

  # ---------------------------------------------------------------- Input.
  add_input_fields(config)
  config.channels = 3  # 1, or 3 by repeating the gray channel (the reference used 3).
  add_split_fields(config)
  config.task = 'four_class'  # Label task: four_class (the four stages) | binary (binary_negative_class vs every other class: CDR 0 vs CDR > 0).
  config.binary_negative_class = 'Non_Demented'  # binary: the class that is label 0; the others become 'Demented'.
  config.label_fraction = 1.0  # Share of the labeled train split used by finetune/baseline, in (0, 1].
  config.label_seed = 0  # Seed of the nested, stratified label subsets.
  config.include_test_in_pretrain = False  # The reference's transductive setting: pretrain on test images too.
  config.data_on_device = 'auto'  # Keep the uint8 data set on the devices and gather batches there: auto (if under 2 GiB) | True | False (gather on the host).

  # SimCLR view augmentation (pretraining) and training augmentation (finetune/baseline).
  config.augment = ml_collections.ConfigDict()
  config.augment.crop_scale = (0.5, 1.0)  # RandomResizedCrop area range (reference: (0.5, 1)).
  config.augment.crop_ratio = (1.0, 1.0)  # RandomResizedCrop aspect-ratio range (reference: (1, 1)).
  config.augment.flip = False  # Random horizontal flip.
  config.augment.rotation_degrees = 0.0  # Maximum absolute random rotation.
  config.augment.brightness = 0.0  # Maximum brightness jitter (added, images in [0, 1]).
  config.augment.contrast = 0.0  # Maximum contrast jitter (factor in [1 - c, 1 + c]).
  config.augment.blur = False  # Random Gaussian blur.
  config.train_augment = True  # finetune/baseline: apply the crop augmentation to labeled images.

  # ---------------------------------------------------------------- Model.
  config.model = 'resnet50'  # resnet18 | resnet34 | resnet50.
  config.width = 1.0  # Width multiplier of every ResNet stage (1.0: 64 filters in the stem).
  config.encoder_output = 'flatten'  # flatten (the reference: 2048 x 4 x 4 map) | avgpool (standard SimCLR).
  config.projection_dims = (256, 128)  # Projection head: hidden sizes then output size.
  config.projection_dropout = 0.5  # Dropout before each projection Dense (the reference: 0.5).
  config.head_dropout = 0.5  # Dropout before the classification Dense (the reference: 0.5).
  config.num_classes = 4  # Output classes of the classifier (set from the data set).
  config.dtype = 'float32'  # Compute dtype: float32 | bfloat16 (parameters and BatchNorm stay float32).

  # ---------------------------------------------------------------- Optimisation.
  config.num_epochs = 100  # Passes over the (labeled) train split.
  config.batch_size = 32  # Global batch size (images, not views), divisible by the device count; fewer images than this: one batch of all of them.
  config.steps_per_dispatch = 0  # Train steps per dispatch to the devices (lax.scan); 0: the platform's default (1 on CPU, 16 on GPU/TPU).
  # Pretraining: SGD + momentum inside SAM/ASAM with a one-cycle cosine schedule.
  config.pretrain_optimizer = ml_collections.ConfigDict()
  config.pretrain_optimizer.learning_rate = 1e-2  # Peak learning rate of the one-cycle schedule.
  config.pretrain_optimizer.momentum = 0.9  # SGD momentum.
  config.pretrain_optimizer.weight_decay = 0.0  # Decoupled weight decay (the reference: none).
  config.pretrain_optimizer.warmup_fraction = 0.3  # One-cycle: share of steps spent rising to the peak.
  config.sam = 'asam'  # none | sam | asam.
  config.sam_rho = 2.0  # SAM neighbourhood radius (the reference: ASAM with rho 2).
  config.sam_eta = 0.0  # ASAM offset: |w| + eta scales the perturbation (0: davda54/sam, as the reference; 0.01: the ASAM paper's code).
  config.joint_views = True  # Both views in one forward pass (BatchNorm over 2N views, as SimCLR); False: the reference's two calls.
  config.temperature = 0.5  # NT-Xent temperature.
  config.temperature_schedule = False  # The reference's step-down (0.5 -> 0.3 -> 0.1 -> 0.05 as the loss falls).
  config.temperature_steps = ((3.0, 0.3), (2.0, 0.1), (1.0, 0.05))  # (epoch-loss threshold, temperature) pairs.
  # Fine-tuning and the supervised baseline: AdamW with a constant learning rate.
  config.finetune_optimizer = ml_collections.ConfigDict()
  config.finetune_optimizer.learning_rate = 1e-4  # AdamW learning rate (the reference: 1e-4).
  config.finetune_optimizer.weight_decay = 1e-8  # AdamW weight decay (the reference: 1e-8).
  config.pretrained_workdir = config_dict.placeholder(str)  # finetune: workdir of a pretrain run.
  config.linear_probe = False  # finetune: freeze the encoder and train only the head.
  config.finetune_sam = 'none'  # finetune/baseline: none | sam | asam (the reference: none).
  # finetune/baseline cross entropy: none (the reference) | balanced (each class weighs n / (K * n_class) of the labeled images).
  # balanced chosen on validation: 62.2 vs 48.4 % validation balanced accuracy (cpu preset baseline, honest fold 0, all labels; docs/results/README.md).
  config.class_weights = 'balanced'

  # ---------------------------------------------------------------- Evaluation, logging, checkpoints.
  config.selection_metric = 'balanced_accuracy'  # Validation metric that picks the best checkpoint.
  config.selection_split = 'val'  # Split that picks the best checkpoint: val (honest) | test (the reference's protocol only).
  config.eval_every_epochs = 1  # Validation (and kNN monitor) period in epochs.
  config.eval_batch_size = 128  # Global batch size of evaluation.
  config.precise_bn_batches = config_dict.placeholder(int)  # Before each evaluation, recompute BatchNorm statistics over this many batches of unaugmented train images (None: running averages, as the reference).
  config.knn_k = (1, 10, 50, 100)  # k of the pretraining kNN monitor.
  config.log_every_steps = 10  # Training metrics period in steps.
  config.checkpoint_every_steps = 200  # Checkpoint period in steps (and at the end; the best checkpoint is saved whenever the selection metric improves).
  config.keep_checkpoints = 2  # Latest checkpoints kept besides the best one.
  config.num_summary_images = 8  # Augmented views written to TensorBoard once.

  return config
