"""The sweep's plan: protocols, tasks, folds, arms, seeds, and the config and cost of every run.

For each protocol (`config.sweep.protocols`) the sweep pretrains SimCLR (once per fold),
then, at each label fraction and seed and for each label task
(`config.sweep.tasks`: four_class, binary), fine-tunes the pretrained encoder
(`finetune`, the "SimCLR" arm) and trains the same classifier from scratch
(`baseline`), both on the same labeled subset. A third arm needs no training:
1-nearest-neighbour on raw pixels (correlation) from the same labeled subset
(`floor`), the score a learned model must clear. Protocols:

- `honest`: subject-grouped, stratified K-fold cross-validation
  (`config.split.num_folds`, default 5): every subject is in the test split of
  exactly one fold; validation subjects for model selection are drawn from each
  fold's training subjects; each fold's pretraining sees only that fold's
  training and validation subjects. Metrics pool the out-of-fold predictions of
  every subject (sweep_report.py).
- `reference`: the reference study's choices: one random 80/20 split of slices
  with no validation carve-out (all train slices available for labels), the
  test accuracy checked every epoch and the best test epoch kept, pretraining
  on all images including test with the temperature step-down and the two views
  in separate calls.

A pretraining reads no labels and the folds follow the data set's own classes,
so one pretraining per fold serves both label tasks.

Seeds. Seed s sets the labeled subset (`label_seed`), the data order and the
initialisation (`seed`) of both arms together. Each fold pretrains once, from
its first seed's initialisation; at that seed both arms start from the same
random encoder. Fractions above `multi_seed_max_fraction` run with the first
seed only, to bound the cost.

Everything here is a pure function of the sweep config and the data set's
labels and splits: `plan_runs` lists the runs in execution order, each with its
workdir and config (`run_config`), so running the sweep again finds the same
runs. `sweep.py` runs them, `sweep_report.py` writes the tables and figures.
"""

import dataclasses
import os

import ml_collections

from simclr_jax.data import arrays as arrays_lib
from simclr_jax.data import batches
from simclr_jax.train import workdirs
from simclr_jax.data import splits as splits_lib

# Sections of a sweep config that its runs do not have.
SWEEP_SECTIONS = ('sweep', 'cam')
# What each protocol sets in its runs' configs (dotted field names).
PROTOCOLS = {
    'honest': {'split.scheme': 'subject', 'split.include_test_in_pretrain': False,
               'eval.selection_split': 'val'},
    'reference': {'split.scheme': 'slice', 'split.include_test_in_pretrain': True,
                  'eval.selection_split': 'test', 'eval.selection_metric': 'accuracy',
                  'split.val_fraction': 0.0, 'split.num_folds': None,
                  'pretrain.temperature_schedule': True, 'pretrain.joint_views': False,
                  'eval.every_epochs': 1, 'labels.class_weights': 'none'},
}
PROTOCOL_DESCRIPTIONS = {
    'honest': 'subject-grouped, stratified K-fold cross-validation (no person on both '
              'sides; every subject tested once, out of fold), checkpoint chosen on '
              'validation subjects of each fold\'s training subjects, test subjects '
              'unseen by the fold\'s pretraining',
    'reference': 'the reference\'s protocol: one random 80/20 slice split (neighbouring '
                 'slices of a person on both sides, no validation carve-out), '
                 'pretraining on all images including test (temperature step-down on, '
                 'the two views in separate calls), test accuracy checked every epoch '
                 'and the best test epoch kept; the pretraining\'s kNN monitor only '
                 'monitors (fine-tuning starts from the last pretraining epoch)',
}
# What this reimplementation still does otherwise than the reference protocol.
REFERENCE_DIFFERENCES = (
    'the SimCLR arm starts from the same random weights as the baseline, not from '
    'ImageNet weights (none can be downloaded here); test images are evaluated whole, '
    'where the reference cropped them at random at every evaluation')
ARMS = ('floor', 'baseline', 'finetune')
ARM_NAMES = {'floor': 'raw-pixel 1-NN', 'baseline': 'baseline', 'finetune': 'SimCLR'}
METRICS = ('accuracy', 'balanced_accuracy', 'macro_f1')
METRIC_TITLES = {'accuracy': 'Accuracy', 'balanced_accuracy': 'Balanced accuracy',
                 'macro_f1': 'Macro-F1'}
# Cost of one run beyond its steps (compilation, data loading, evaluation,
# checkpoints), in supervised steps; only used to weigh the ETA.
RUN_OVERHEAD_STEPS = 150

def percent_label(fraction):
  """'1 %', '10 %', '0.5 %': a label fraction as the reference wrote it."""
  return f'{100 * fraction:g} %'


@dataclasses.dataclass
class Run:
  """One run of the sweep (a pretraining, a trained arm, or the floor)."""
  protocol: str
  task: str | None  # four_class | binary; None for a pretraining (serves both).
  fold: int | None  # The cross-validation fold; None for a single split.
  arm: str  # pretrain | floor | baseline | finetune
  fraction: float | None
  seed: int
  workdir: str
  config: ml_collections.ConfigDict | None  # None for the floor (no training).
  num_labeled: int | None
  work: float  # Relative cost, for the ETA.

  @property
  def name(self):
    fold = '' if self.fold is None else f' fold {self.fold}'
    if self.arm == 'pretrain':
      return f'{self.protocol}{fold} pretrain'
    return (f'{self.protocol} {self.task}{fold} {self.arm} {percent_label(self.fraction)} '
            f'seed {self.seed}')

  @property
  def finished(self):
    return workdirs.is_finished(self.workdir)



# ----------------------------------------------------------------------------- config


def protocol_seeds(config, protocol):
  return tuple(config.sweep.reference_seeds if protocol == 'reference' else config.sweep.seeds)


def fraction_seeds(config, protocol, fraction):
  """Seeds run at `fraction`: all of the protocol's up to multi_seed_max_fraction."""
  seeds = protocol_seeds(config, protocol)
  return seeds if fraction <= config.sweep.multi_seed_max_fraction + 1e-9 else seeds[:1]


def supervised_schedule(config, num_labeled, protocol='honest'):
  """(num_epochs, eval_every_epochs) of a finetune or baseline run.

  The whole number of epochs nearest to `max_steps_per_run` steps (at least one)
  if that is fewer than `num_epochs`, so large fractions get fewer epochs;
  validation runs about `evals_per_run` times. The reference protocol trains every
  fraction for `reference_num_epochs` epochs (when set), as the reference did
  (100 epochs), and checks the test split after every epoch.
  """
  if protocol == 'reference' and config.sweep.reference_num_epochs:
    return int(config.sweep.reference_num_epochs), 1
  per_epoch = batches.steps_per_epoch(num_labeled, config.train.batch_size)
  num_epochs = config.train.num_epochs
  if config.sweep.max_steps_per_run is not None:
    num_epochs = max(1, min(num_epochs, round(config.sweep.max_steps_per_run / per_epoch)))
  return num_epochs, _eval_every(config, num_epochs)


def _eval_every(config, num_epochs):
  if config.sweep.evals_per_run is None:
    return config.eval.every_epochs
  return max(1, num_epochs // config.sweep.evals_per_run)


def run_config(config, protocol, mode, *, seed, num_classes, fraction=1.0,
               num_labeled=None, pretrained_workdir=None, task='four_class', fold=None):
  """The config of one run: the sweep config without its sweep-only fields.

  Args:
    config: the sweep config.
    protocol: a key of PROTOCOLS.
    mode: pretrain | finetune | baseline.
    seed: seed of the label subset, initialisation and data order.
    num_classes: classes of the task (what train_and_evaluate would set).
    fraction: label fraction (finetune, baseline).
    num_labeled: size of the labeled subset (finetune, baseline).
    pretrained_workdir: the fold's pretrain workdir (finetune).
    task: the label task (a pretraining takes the first of config.sweep.tasks).
    fold: the cross-validation fold, or None.

  Returns:
    A new ConfigDict, a pure function of the arguments.
  """
  run = protocol_config(config, protocol)
  for section in SWEEP_SECTIONS:
    del run[section]
  run.mode = mode
  run.seed = int(seed)
  run.labels.task = task
  run.model.num_classes = int(num_classes)
  run.split.fold = 0 if fold is None else int(fold)
  if mode == 'pretrain':
    run.train.num_epochs = int(config.sweep.pretrain_num_epochs)
    run.eval.every_epochs = _eval_every(config, run.train.num_epochs)
  else:
    run.labels.fraction = float(fraction)
    run.labels.seed = int(seed)
    run.train.num_epochs, run.eval.every_epochs = supervised_schedule(config, num_labeled,
                                                                      protocol)
  if 'eval.every_epochs' in PROTOCOLS[protocol]:  # The reference checks every epoch.
    run.eval.every_epochs = PROTOCOLS[protocol]['eval.every_epochs']
  if mode == 'finetune':
    run.finetune.pretrained_workdir = pretrained_workdir
  return run


# ----------------------------------------------------------------------------- plan


def protocol_tasks(config, protocol):
  """The label tasks a protocol runs: config.sweep.tasks, or reference_tasks under `reference`."""
  if protocol == 'reference' and config.sweep.reference_tasks is not None:
    return tuple(config.sweep.reference_tasks)
  return tuple(config.sweep.tasks)


def protocol_folds(config, protocol):
  """The folds a protocol runs: 0 .. K-1 with cross-validation, else [None]."""
  num_folds = protocol_config(config, protocol).split.num_folds
  return list(range(num_folds)) if num_folds else [None]


def plan_runs(config, workdir, arrays):
  """Every run of the sweep in execution order, with its config and cost.

  Per protocol: the floor runs (instant), then fold by fold the pretraining and the
  baseline and finetune runs side by side, task by task and seed by seed, so that an
  interrupted sweep already holds whole folds.
  """
  planned = []
  task_classes = {task: len(arrays_lib.task_labels(arrays, task_config(config, task))[1])
                  for task in config.sweep.tasks}
  for protocol in config.sweep.protocols:
    folds = protocol_folds(config, protocol)
    seeds = protocol_seeds(config, protocol)
    plan = [(seed, fraction) for seed in seeds for fraction in config.sweep.fractions
            if seed in fraction_seeds(config, protocol, fraction)]
    for fold in folds:
      splits = protocol_splits(config, protocol, arrays, fold)
      fold_dir = os.path.join(workdir, protocol, *([f'fold{fold}'] if fold is not None else []))
      pretrain_dir = os.path.join(fold_dir, 'pretrain')
      labeled = {(seed, fraction): len(splits_lib.label_subset(
          arrays.labels, splits['train'], fraction, seed)) for seed, fraction in plan}
      for task in protocol_tasks(config, protocol):
        for seed, fraction in plan:
          planned.append(Run(protocol, task, fold, 'floor', fraction, seed,
                             _arm_dir(workdir, protocol, task, fold, 'floor', fraction, seed),
                             None, labeled[seed, fraction], 0.0))
      pretrain = run_config(config, protocol, 'pretrain', seed=seeds[0],
                            num_classes=task_classes[config.sweep.tasks[0]],
                            task=config.sweep.tasks[0], fold=fold)
      pretrain_images = len(splits_lib.pretrain_indices(
          splits, pretrain.split.include_test_in_pretrain))
      steps = pretrain.train.num_epochs * batches.steps_per_epoch(
          pretrain_images, config.train.batch_size)
      # A pretraining step runs two views, twice with SAM.
      cost = 2 * (1 if config.pretrain.sam == 'none' else 2)
      planned.append(Run(protocol, None, fold, 'pretrain', None, seeds[0], pretrain_dir, pretrain,
                         None, steps * cost + RUN_OVERHEAD_STEPS))
      for task in protocol_tasks(config, protocol):
        for seed, fraction in plan:
          for arm in ('baseline', 'finetune'):
            run = run_config(config, protocol, arm, seed=seed, num_classes=task_classes[task],
                             fraction=fraction, num_labeled=labeled[seed, fraction],
                             pretrained_workdir=pretrain_dir, task=task, fold=fold)
            steps = run.train.num_epochs * batches.steps_per_epoch(
                labeled[seed, fraction], config.train.batch_size)
            cost = 1 if config.supervised.sam == 'none' else 2
            planned.append(Run(protocol, task, fold, arm, fraction, seed,
                               _arm_dir(workdir, protocol, task, fold, arm, fraction, seed),
                               run,
                               labeled[seed, fraction], steps * cost + RUN_OVERHEAD_STEPS))
  return planned


def _arm_dir(workdir, protocol, task, fold, arm, fraction, seed):
  fold_part = [f'fold{fold}'] if fold is not None else []
  return os.path.join(workdir, protocol, task, *fold_part, f'{arm}_f{fraction:g}_s{seed}')


def task_config(config, task):
  """`config` with `task` as its label task."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.labels.task = task
  return config


def protocol_config(config, protocol):
  """`config` with the protocol's split, pretraining and selection settings."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.update_from_flattened_dict(PROTOCOLS[protocol])
  return config


def protocol_splits(config, protocol, arrays, fold=None):
  """The train / val / test splits of the protocol (of `fold` under cross-validation)."""
  protocol_run = protocol_config(config, protocol)
  protocol_run.split.fold = 0 if fold is None else fold
  return splits_lib.load_splits(protocol_run, arrays)
