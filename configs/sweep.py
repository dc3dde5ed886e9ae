r"""The label-budget study: SimCLR fine-tuning vs supervised baseline vs raw-pixel 1-NN.

Pretrains once per protocol (`sweep.protocols`: by default honest and reference) and
fold, then fine-tunes and trains the baseline on nested label budgets over seeds, for
the binary task (CDR 0 vs > 0, the primary one) and the three_class task (CDR 0 / 0.5
/ >= 1): the honest protocol labels 4, 8, 16, 32 and all training subjects of each
fold (a clinic labels people, not slices), the reference protocol 1, 10, 20, 50 and
100 % of the train slices, as the reference did; see simclr_jax/study/sweep.py. The
protocols slice_split and slice_split_transductive, between them, add one of the
reference's choices at a time (results.md's inflation table; study/plan.PROTOCOLS):
`"--config.sweep.protocols=('honest', 'slice_split', 'slice_split_transductive',
'reference')"`, which the cpu preset sets.
Running the same command again skips finished runs and resumes unfinished ones.

Presets (`:preset=NAME`):
  runlocal (default): the embedded synthetic data, a quarter-width ResNet-18 at 32 px,
    one seed; the whole sweep, both protocols, meant to take minutes on a 2-core CPU:
      python main.py --config=configs/sweep.py:preset=runlocal --workdir=runs/sweep_local
  cpu: the Kaggle data, the same model at 64 px, about 600 steps per run (the
    reference protocol: 25 epochs), 3 seeds at the few-label budgets, 5 folds, both
    tasks, all four protocols, three arms; about 4 hours of a quiet 2-core CPU (the
    binary task under the honest and reference protocols alone took 1 h 33 min,
    docs/results/README.md; `"--config.sweep.protocols=('honest', 'reference')"` leaves
    the two protocols between them out):
      python main.py --config=configs/sweep.py:preset=cpu \
        --config.data.path=/path/to/alzheimer-mri-dataset.zip --workdir=runs/sweep_cpu
  full: the reference's settings (ResNet-50, 128 px, 3 channels, batch 32, flatten
    head, ASAM rho 2, 100 epochs, float32) for GPUs and TPUs, validating every 5
    epochs (the reference protocol: every epoch); add `,dtype=bfloat16` for
    bfloat16 compute:
      python main.py --config=configs/sweep.py:preset=full,dtype=bfloat16 \
        --config.data.path=/path/to/alzheimer-mri-dataset.zip --workdir=gs://bucket/sweep
Writes results.md, results.csv, sweep.json, label_fraction_curve.png,
pretraining_curves.png, confusion_matrices.png, gradcam_grid.png and predictions.npz
to the workdir; `python -m simclr_jax.study.recompute --predictions=WORKDIR/predictions.npz
--out=DIR` recomputes all but the Grad-CAM grid from predictions.npz and config.json.
results.md answers the pre-registered primary endpoint (`sweep.primary`) first.
"""

import ml_collections
from ml_collections import config_dict

from configs import default
from configs import pretrain

from simclr_jax import errors

PRESETS = ('runlocal', 'cpu', 'full')


def _small(config):
  """What the CPU presets share: pretrain.py's runlocal model, sweep-sized runs."""
  config = pretrain.runlocal(config)
  config.eval.batch_size = 256
  # A few hundred steps from scratch need a larger step than the reference's 1e-4.
  config.supervised.optimizer.learning_rate = 1e-3
  config.eval.knn_k = (1, 10)
  config.train.checkpoint_every_steps = 1000
  config.train.num_summary_images = 0
  return config


def runlocal(config):
  """Embedded synthetic data, a tiny ResNet-18 at 32 px: minutes on a CPU.

  Every code path of the study on a small scale: both protocols, both label tasks,
  2 cross-validation folds (45 training subjects each), honest budgets of 8 and all
  training subjects, reference budgets of 10 and 100 % of the slices, one seed, at most
  about 200 steps per run; add folds, budgets or seeds with e.g.
  `--config.split.num_folds=5` or `"--config.sweep.subject_budgets=(4,8,16,0)"`.
  """
  config = _small(config)
  config.data.image_size = 32
  config.split.num_folds = 2
  config.sweep.update(seeds=(0,), subject_budgets=(8, 0), fractions=(0.1, 1.0),
                      bootstrap_samples=500)
  # Run lengths: 3 pretraining epochs, supervised runs of about 200 steps.
  config.sweep.update(pretrain_num_epochs=3, max_steps_per_run=200, evals_per_run=3)
  config.train.update(num_epochs=15, log_every_steps=20)
  config.cam.layer = 'stage2'  # 4 x 4 at 32 px (stage4 is 1 x 1).
  return config


def cpu(config):
  """The Kaggle data at 64 px with a quarter-width ResNet-18: the study in about 4 h of 2 CPU cores.

  (Measured on 2026-12-06: the binary task under the honest and reference protocols, 3
  seeds, 186 trained runs, in 1 h 33 min; the three_class task and the two protocols
  between add about 2.5 h by those timings. A supervised run of about 600 steps takes
  26 s, a linear probe 9-14 s, a pretraining 3 min.)
  Sized on this project's 2-core machine (docs/results/README.md) so that the learned
  arms fit the data: under the reference protocol the baseline on all labels reached
  96.3 % test accuracy (the reference: 98.1 %) with these settings, where the
  reference's crop augmentation of the labeled images left it at 61 % after 10 epochs
  and 94.7 % after 15 epochs without precise BatchNorm. So:
  - labeled images are not augmented (train_augment=False): the crop cost more
    accuracy than anything else tried; SimCLR's views keep the reference's crop;
  - BatchNorm statistics are recomputed before each evaluation (precise BN, 8
    batches): with running averages the test accuracy of successive epochs swung by
    up to 10 points;
  - the reference protocol trains every fraction 25 epochs and checks test every
    epoch (as the reference, which trained 100); the honest protocol's runs stop at
    about 600 steps (4 subjects, 128 slices: 150 epochs), which bounds its 5 folds
    x 2 tasks x 5 subject budgets x 2 arms = 100 runs;
  - the learning rate is 3e-3 (30x the reference's: the runs are far shorter), chosen
    on the honest protocol's validation subjects among 1e-4, 3e-4, 1e-3 and 3e-3 beside
    the other settings above, one factor at a time (docs/results/cpu/tune_supervised.md:
    68.8 % against the previous 1e-3's 67.2 % per-subject validation balanced accuracy,
    one validation subject apart; augmentation of the labeled images, no precise
    BatchNorm and 300 steps scored lower there, 1,200 steps tied and lost the tie);
  - all four protocols run, so that results.md's inflation table adds the reference's
    choices one at a time: the two between honest and reference (one slice split,
    the honest protocol's budgets and run lengths) add 2 x 2 tasks x 5 subject
    budgets x 3 arms, with 3 seeds at the few-label budgets, and 2 pretrainings;
  - SimCLR pretrains 6 epochs: 25 epochs raised the linear probe on fold 0's
    validation subjects (61.3 -> 66.6 % at 8 labeled subjects) but not fine-tuning
    (55.3 -> 54.3 %), within one or two subjects' noise, at 4x the pretraining time
    (docs/results/cpu/pretrain_length.png); the linear-probe arm (sweep.linear_probe)
    measures the probe in the study itself.
  """
  config = _small(config)
  config.data.name = 'alzheimer_mri'
  # All four protocols (study/plan.PROTOCOLS): the inflation table one step at a time.
  config.sweep.protocols = ('honest', 'slice_split', 'slice_split_transductive', 'reference')
  config.pretrain.projection_dims = (128, 64)
  config.augment.labeled = False
  config.eval.precise_bn_batches = 8
  config.supervised.optimizer.learning_rate = 3e-3  # Chosen on validation (tune_supervised.md).
  # Run lengths: 6 pretraining epochs, supervised runs of about 600 steps (the
  # reference protocol: 25 epochs).
  config.sweep.update(pretrain_num_epochs=6, max_steps_per_run=600, reference_num_epochs=25,
                      evals_per_run=6)
  # Three seeds where labels are few (4, 8 and 16 subjects: sweep.multi_seed_max_subjects);
  # larger budgets, whose runs differ less from seed to seed, run with the first.
  config.sweep.seeds = (0, 1, 2)
  # Runs one by one (sweep.group_runs = 1, the default): since convolutions of images
  # smaller than their kernel became products (cpu_kernels), a run's steps are 1.4-1.9x
  # faster on 2 CPU cores and 5 runs trained together 0.30x (SimCLR) and 0.44x
  # (supervised) as fast as one after another (docs/performance.md, "Runs trained
  # together").
  config.train.update(num_epochs=300, log_every_steps=50)
  config.cam.layer = 'stage3'  # 4 x 4 at 64 px.
  return config


def full(config):
  """The reference's settings for GPUs and TPUs: what the study is about, at full scale.

  The default config as it stands: the Kaggle data, ResNet-50 at 128 px with 3
  channels, batch 32, the flattened 2048 x 4 x 4 head, ASAM (rho 2) around SGD
  for 100 pretraining epochs, AdamW for 100 fine-tuning epochs. Compute dtype
  `auto`: bfloat16 on GPUs and TPUs (parameters, optimizer state and BatchNorm
  statistics stay float32; the NT-Xent similarities are full float32 products),
  float32 on a CPU (the reference's numerics); `,dtype=float32` keeps float32
  everywhere, `,dtype=bfloat16` asks for bfloat16 everywhere. The honest protocol validates (and
  keeps the best checkpoint) 20 times per run, every 5 epochs of a 100-epoch
  run: each validation of a pretraining embeds the whole training split for its
  kNN monitor, about a sixth of an epoch's work, which every epoch would add 15 %
  to the sweep; the reference protocol keeps its check of the test split every
  epoch (study/plan.PROTOCOLS), as the reference did. No cap on a run's steps.
  """
  config.data.name = 'alzheimer_mri'
  config.sweep.pretrain_num_epochs = 100
  config.train.num_epochs = 100
  config.sweep.evals_per_run = 20
  config.model.dtype = 'auto'
  return config


DTYPES = ('float32', 'bfloat16', 'auto')


def sweep_section():
  """The sweep's own fields (the presets then set run lengths and sizes)."""
  sweep = ml_collections.ConfigDict()
  sweep.protocols = ('honest', 'reference')  # Any of honest (subject K-fold cross-validation) | slice_split (honest with the reference's slice split) | slice_split_transductive (and test images in pretraining) | reference (the reference's choices); see study/plan.PROTOCOLS.
  sweep.tasks = ('binary', 'three_class')  # Label tasks of the fine-tuning and baseline runs, the primary first (a pretraining serves all): binary | three_class | four_class.
  sweep.reference_tasks = config_dict.placeholder(tuple)  # reference protocol: only these of the tasks (None: all).
  sweep.label_unit = 'subject'  # honest protocol's label budgets: subject (subject_budgets) | slice (fractions); the reference protocol always uses fractions.
  sweep.subject_budgets = (4, 8, 16, 32, 0)  # label_unit=subject: labeled train subjects per fold with all their slices (0: all), nested, stratified by class.
  sweep.fractions = (0.01, 0.1, 0.2, 0.5, 1.0)  # Label fractions of the train slices (the reference protocol; honest with label_unit=slice), nested.
  sweep.seeds = (0,)  # Seeds of the honest protocol (label subset, init and data order together), in every fold.
  sweep.multi_seed_max_fraction = 0.2  # Larger fractions run with the first seed only.
  sweep.multi_seed_max_subjects = 16  # Larger subject budgets (and all subjects) run with the first seed only.
  sweep.reference_seeds = (0,)  # Seeds of the reference protocol.
  sweep.pretrain_num_epochs = 100  # SimCLR pretraining epochs (train.num_epochs is for finetune/baseline).
  sweep.max_steps_per_run = config_dict.placeholder(int)  # Cap: a run's epochs are cut to about this many steps (None: no cap).
  sweep.reference_num_epochs = config_dict.placeholder(int)  # reference protocol: every fraction trains this many epochs, no cap (None: as the other protocols).
  sweep.evals_per_run = config_dict.placeholder(int)  # Validations per run (None: every eval.every_epochs).
  sweep.floor_image_size = 64  # Raw-pixel 1-NN floor: pixels area-downsampled to this side (None: stored size).
  sweep.linear_probe = True  # A third trained arm at every budget: a linear probe (the head alone) on the frozen SimCLR encoder, beside fine-tuning.
  sweep.group_runs = 1  # Runs trained together in one compiled program (train/groups.py): up to this many folds and arms of one cell, or pretrainings of one protocol; 1: one run at a time.
  sweep.group_arms = ('pretrain', 'baseline', 'finetune', 'probe')  # With group_runs > 1: the arms whose runs are grouped (the others train one at a time).
  sweep.run_devices = 0  # With group_runs > 1 on several devices: at most this many along the mesh's `run` axis (the most that divide the device count and the group), each run's batch split over the rest (0: no bound; 1: every run's batch over every device).
  sweep.bootstrap_samples = 2000  # Resamples of subjects (and seeds) behind each 95 % confidence interval.
  sweep.equivalence_margin = 5.0  # Points: a − b is "equivalent" where its 95 % interval lies inside ±this (verdicts: ahead, behind, equivalent, inconclusive).
  sweep.primary = primary_section()
  return sweep


def primary_section():
  """The pre-registered primary endpoint: results.md states it before any number, answers it first.

  Every other comparison of the report is labeled exploratory. The positive control
  is the same comparison under the leaky reference protocol at its few-label
  fractions (up to `max_fraction`).
  """
  primary = ml_collections.ConfigDict()
  primary.protocol = 'honest'  # The protocol that answers the question: honest | reference.
  primary.task = 'binary'  # The label task (one of sweep.tasks, else results.md says it did not run).
  primary.level = 'subject'  # subject (one prediction per person) | slice.
  primary.metric = 'balanced_accuracy'  # accuracy | balanced_accuracy | macro_f1 | roc_auc | sensitivity | specificity | brier | ece.
  primary.comparison = 'finetune-baseline'  # a-b: finetune-baseline (SimCLR − baseline) | finetune-floor | baseline-floor.
  primary.max_subjects = 16  # Few labels: subject budgets up to this many subjects per fold (none: the smallest).
  primary.max_fraction = 0.1  # Few labels: slice fractions up to this (the positive control; label_unit=slice).
  return primary


def get_config(arg=None):
  """Sweep config; arg: 'preset=runlocal|cpu|full' or the bare name (default runlocal),
  optionally ',dtype=float32|bfloat16|auto' (the compute dtype; the preset's by default)."""
  # A bare preset name (`:runlocal`, as the other configs take it) means preset=NAME.
  tokens = [token.strip() for token in (arg or '').split(',')]
  arg = ','.join(f'preset={token}' if token in PRESETS else token for token in tokens)
  args = default.parse_arg(arg, preset='runlocal', dtype=None)
  if args.preset not in PRESETS:
    raise errors.UserError(f'Unknown preset {args.preset!r}; use configs/sweep.py:preset=NAME '
                           f'with NAME one of {PRESETS}.')
  if args.dtype is not None and args.dtype not in DTYPES:
    raise errors.UserError(f'Unknown dtype {args.dtype!r}; use configs/sweep.py:preset='
                           f'{args.preset},dtype=NAME with NAME one of {DTYPES}.')
  config = default.get_config()
  config.mode = 'sweep'

  # ---------------------------------------------------------------- Sweep.
  config.split.num_folds = 5  # honest: folds of the subject-grouped, stratified cross-validation.
  config.sweep = sweep_section()
  config.cam = default.cam_section()  # gradcam_grid.png.

  config = {'runlocal': runlocal, 'cpu': cpu, 'full': full}[args.preset](config)
  if args.dtype is not None:
    config.model.dtype = args.dtype
  return config
