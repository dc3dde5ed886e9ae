r"""The label-fraction study: SimCLR fine-tuning vs supervised baseline vs raw-pixel 1-NN.

Pretrains once per protocol (honest and reference), then fine-tunes and trains the
baseline at 1, 10, 20, 50 and 100 % of the labels over seeds; see simclr_jax/sweep.py.
Running the same command again skips finished runs and resumes unfinished ones.

Presets (`:preset=NAME`):
  runlocal (default): the embedded synthetic data, a quarter-width ResNet-18 at 32 px,
    one seed; the whole sweep, both protocols, meant to take minutes on a 2-core CPU:
      python main.py --config=configs/sweep.py:preset=runlocal --workdir=runs/sweep_local
  cpu: the Kaggle data, the same model at 64 px, about 600 steps per run, three
    seeds up to 20 % of the labels (honest protocol), one seed for the reference
    protocol; sized for about 1.5 hours of a quiet 2-core CPU, both protocols:
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
from configs import pretrain

from simclr_jax import errors

PRESETS = ('runlocal', 'cpu', 'full')


def _small(config):
  """What the CPU presets share: pretrain.py's runlocal model, sweep-sized runs."""
  config = pretrain.runlocal(config)
  config.eval_batch_size = 256
  # A few hundred steps from scratch need a larger step than the reference's 1e-4.
  config.finetune_optimizer.learning_rate = 1e-3
  config.knn_k = (1, 10)
  config.checkpoint_every_steps = 1000
  config.num_summary_images = 0
  return config


def runlocal(config):
  """Embedded synthetic data, a tiny ResNet-18 at 32 px: minutes on a CPU.

  Every code path of the study on a small scale: both protocols, both label tasks,
  2 cross-validation folds, 10 and 100 % of the labels, one seed, about 200 steps
  per run; add folds, fractions or seeds with e.g. `--config.num_folds=5`.
  """
  config = _small(config)
  config.image_size = 32
  config.seeds = (0,)
  config.num_folds = 2
  config.fractions = (0.1, 1.0)
  config.bootstrap_samples = 500
  config.pretrain_num_epochs = 3
  config.num_epochs = 15
  config.max_steps_per_run = 200
  config.evals_per_run = 3
  config.log_every_steps = 20
  config.cam_layer = 'stage2'  # 4 x 4 at 32 px (stage4 is 1 x 1).
  return config


def cpu(config):
  """The Kaggle data at 64 px with a quarter-width ResNet-18: about 1.5 h on 2 CPU cores.

  Sized on this project's 2-core machine (docs/results/README.md): a run is about 600
  steps (5 epochs at 100 % labels, 300 at 1 %), about where a baseline on all labels
  stopped improving on the validation subjects; half width costs 4x the time per step;
  crop scale (0.8, 1) with flips scored the same as the reference's (0.5, 1) crops, which
  are kept. The learning rate is 10x the reference's because the runs are 30x shorter.
  """
  config = _small(config)
  config.dataset = 'alzheimer_mri'
  config.projection_dims = (128, 64)
  config.pretrain_num_epochs = 6
  config.num_epochs = 300
  config.max_steps_per_run = 600
  config.evals_per_run = 6
  config.log_every_steps = 50
  # Running averages: recomputed statistics changed nothing here (validation balanced
  # accuracy 46.3 vs 46.4 % for a baseline on all labels, 1,144 steps).
  config.precise_bn_batches = None
  config.cam_layer = 'stage3'  # 4 x 4 at 64 px.
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
    raise errors.UserError(f'Unknown preset {args.preset!r}; use configs/sweep.py:preset=NAME '
                           f'with NAME one of {PRESETS}.')
  config = default.get_config()
  config.mode = 'sweep'

  # ---------------------------------------------------------------- Sweep.
  config.protocols = ('honest', 'reference')  # honest (subject K-fold cross-validation) | reference (the reference's choices).
  config.tasks = ('four_class', 'binary')  # Label tasks of the fine-tuning and baseline runs (a pretraining serves both).
  config.num_folds = 5  # honest: folds of the subject-grouped, stratified cross-validation.
  config.fractions = (0.01, 0.1, 0.2, 0.5, 1.0)  # Label fractions, nested subsets of the train split.
  config.seeds = (0,)  # Seeds of the honest protocol (label subset, init and data order together), in every fold.
  config.multi_seed_max_fraction = 0.2  # Larger fractions run with the first seed only.
  config.reference_seeds = (0,)  # Seeds of the reference protocol.
  config.pretrain_num_epochs = 100  # SimCLR pretraining epochs (num_epochs is for finetune/baseline).
  config.max_steps_per_run = config_dict.placeholder(int)  # Cap: a run's epochs are cut to about this many steps (None: no cap).
  config.evals_per_run = config_dict.placeholder(int)  # Validations per run (None: every eval_every_epochs).
  config.floor_image_size = 64  # Raw-pixel 1-NN floor: pixels area-downsampled to this side (None: stored size).
  config.cam_method = 'gradcam'  # gradcam_grid.png: gradcam | gradcam++ | hirescam.
  config.cam_layer = 'stage4'  # gradcam_grid.png: the explained stage, stage4 (the last) .. stage1.
  config.bootstrap_samples = 2000  # Resamples of subjects behind each 95 % confidence interval.

  config = {'runlocal': runlocal, 'cpu': cpu, 'full': full}[args.preset](config)
  return config
