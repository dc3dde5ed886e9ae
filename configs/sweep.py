r"""The label-fraction study: SimCLR fine-tuning vs supervised baseline vs raw-pixel 1-NN.

Pretrains once per protocol (honest and reference), then fine-tunes and trains the
baseline at 1, 10, 20, 50 and 100 % of the labels over seeds; see simclr_jax/sweep.py.
Running the same command again skips finished runs and resumes unfinished ones.

Presets (`:preset=NAME`):
  runlocal (default): the embedded synthetic data, a quarter-width ResNet-18 at 32 px,
    two seeds; the whole sweep, both protocols, meant to take minutes on a 2-core CPU:
      python main.py --config=configs/sweep.py:preset=runlocal --workdir=runs/sweep_local
  cpu: the Kaggle data, the same model at 32 px, a few hundred steps per run, three
    seeds up to 20 % of the labels (honest protocol), one seed for the reference
    protocol; sized for about an hour of a shared 2-core CPU, both protocols:
      python main.py --config=configs/sweep.py:preset=cpu \
        --config.dataset_path=/path/to/alzheimer-mri-dataset.zip --workdir=runs/sweep_cpu
  full: the reference's settings (ResNet-50, 128 px, 3 channels, batch 32, flatten
    head, ASAM rho 2, 100 epochs, validation every epoch) for a GPU or TPU:
      python main.py --config=configs/sweep.py:preset=full \
        --config.dataset_path=/path/to/alzheimer-mri-dataset.zip --workdir=runs/sweep_full
Writes results.md, results.csv, sweep.json, label_fraction_curve.png,
confusion_matrices.png and gradcam_grid.png to the workdir.
"""

from ml_collections import config_dict

from configs import default

PRESETS = ('runlocal', 'cpu', 'full')


def runlocal(config):
  """Embedded synthetic data, a tiny ResNet-18 at 32 px: minutes on a CPU.

  A run's fixed cost (tracing, data loading, checkpoints) outweighs its steps here,
  so the demo runs two seeds rather than three, and lets each run take a few hundred
  steps.
  """
  config.dataset = 'synthetic_mri'
  config.image_size = 32
  config.channels = 1
  config.model = 'resnet18'
  config.width = 0.25
  config.encoder_output = 'avgpool'
  config.projection_dims = (64, 32)
  config.projection_dropout = 0.0
  config.head_dropout = 0.0
  config.batch_size = 32
  config.eval_batch_size = 256
  config.seeds = (0, 1)
  config.pretrain_num_epochs = 4
  config.num_epochs = 20
  config.max_steps_per_run = 300
  # A few hundred steps from scratch need a larger step than the reference's 1e-4.
  config.finetune_optimizer.learning_rate = 1e-3
  config.evals_per_run = 4
  config.knn_k = (1, 10)
  config.log_every_steps = 20
  config.checkpoint_every_steps = 1000
  config.num_summary_images = 0
  config.cam_layer = 'stage2'  # 4 x 4 at 32 px (stage4 is 1 x 1).
  return config


def cpu(config):
  """The Kaggle data at 32 px with a quarter-width ResNet-18: about an hour on 2 CPU cores.

  Measured on a shared 2-core machine: 64 px cost 2.1x the time of 32 px for the same
  test scores (a baseline on all labels, 572 steps: 49.2 % vs 48.1 % accuracy, 28.5 %
  vs 29.2 % balanced accuracy), so the budget goes to steps rather than pixels.
  """
  config.dataset = 'alzheimer_mri'
  config.image_size = 32
  config.channels = 1
  config.model = 'resnet18'
  config.width = 0.25
  config.encoder_output = 'avgpool'
  config.projection_dims = (128, 64)
  config.projection_dropout = 0.0
  config.head_dropout = 0.0
  config.batch_size = 32
  config.eval_batch_size = 256
  config.pretrain_num_epochs = 2
  config.num_epochs = 25
  config.max_steps_per_run = 250
  config.finetune_optimizer.learning_rate = 1e-3
  config.evals_per_run = 5
  config.knn_k = (1, 10)
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.num_summary_images = 0
  config.cam_layer = 'stage2'
  return config


def full(config):
  """The reference's settings (the default config) for a GPU or TPU."""
  config.dataset = 'alzheimer_mri'
  config.pretrain_num_epochs = 100
  config.num_epochs = 100
  return config


def get_config(arg=None):
  """Sweep config; arg: 'preset=runlocal|cpu|full' (default runlocal)."""
  args = default.parse_arg(arg, preset='runlocal')
  if args.preset not in PRESETS:
    raise ValueError(f'Unknown preset {args.preset!r}; use configs/sweep.py:preset=NAME '
                     f'with NAME one of {PRESETS}.')
  config = default.get_config()
  config.mode = 'sweep'

  # ---------------------------------------------------------------- Sweep.
  config.protocols = ('honest', 'reference')  # honest (subject split, val selection) | reference (the reference's choices).
  config.fractions = (0.01, 0.1, 0.2, 0.5, 1.0)  # Label fractions, nested subsets of the train split.
  config.seeds = (0, 1, 2)  # Seeds of the honest protocol (label subset, init and data order together).
  config.multi_seed_max_fraction = 0.2  # Larger fractions run with the first seed only.
  config.reference_seeds = (0,)  # Seeds of the reference protocol.
  config.pretrain_num_epochs = 100  # SimCLR pretraining epochs (num_epochs is for finetune/baseline).
  config.max_steps_per_run = config_dict.placeholder(int)  # Cap: a run's epochs are cut to about this many steps (None: no cap).
  config.evals_per_run = config_dict.placeholder(int)  # Validations per run (None: every eval_every_epochs).
  config.floor_image_size = 64  # Raw-pixel 1-NN floor: pixels area-downsampled to this side (None: stored size).
  config.cam_method = 'gradcam'  # gradcam_grid.png: gradcam | gradcam++ | hirescam.
  config.cam_layer = 'stage4'  # gradcam_grid.png: the explained stage, stage4 (the last) .. stage1.

  config = {'runlocal': runlocal, 'cpu': cpu, 'full': full}[args.preset](config)
  return config
