"""The sweep's plan: protocols, tasks, folds, arms, seeds, and the config and cost of every run.

For each protocol (`config.sweep.protocols`) the sweep pretrains SimCLR (once per fold),
then, at each label budget and seed and for each label task
(`config.sweep.tasks`: binary, three_class, four_class), fine-tunes the pretrained encoder
(`finetune`, the "SimCLR" arm) and trains the same classifier from scratch
(`baseline`), both on the same labeled subset. A third arm needs no training:
1-nearest-neighbour on raw pixels (correlation) from the same labeled subset
(`floor`), the score a learned model must clear. Protocols:

- `honest`: subject-grouped, stratified K-fold cross-validation
  (`config.split.num_folds`, default 5): every subject is in the test split of
  exactly one fold; validation subjects for model selection are drawn from each
  fold's training subjects; each fold's pretraining sees only that fold's
  training and validation subjects. Metrics pool the out-of-fold predictions of
  every subject (rows.py).
- `reference`: the reference study's choices: one random 80/20 split of slices
  with no validation carve-out (all train slices available for labels), the
  test accuracy checked every epoch and the best test epoch kept, pretraining
  on all images including test with the temperature step-down and the two views
  in separate calls.

Between them, two protocols add one of the reference's choices at a time, so that
the inflation table (`inflation.py`) can say what each one adds: `slice_split` is
`honest` with the reference's split instead of the subject folds (one random
80/20 slice split, whose test slices are the reference's: the same seed and test
share; a validation carve-out of `split.val_fraction` of the other slices for
model selection; test images kept out of pretraining), `slice_split_transductive`
adds the test images to its pretraining, and `reference` then adds model
selection on test and the reference's other choices (`REFERENCE_OTHER_CHOICES`).
The two label as the honest protocol does (`sweep.label_unit`) and run its seeds,
tasks and run lengths. `sweep.protocols` runs any of the four; the chain's order is
`PROTOCOLS`' order.

A pretraining reads no labels and the folds follow the data set's own classes,
so one pretraining per fold serves every label task.

Label budgets (`splits.Budget`, `protocol_budgets`). The honest protocol (and the
two between it and the reference's) labels k training subjects of each fold (or of
the one slice split) with all their training slices (`sweep.subject_budgets`, 0: all;
`sweep.label_unit=subject`), as a clinic labels people; `sweep.label_unit=slice`
gives it the slice fractions instead. The reference protocol labels fractions of the
train slices (`sweep.fractions`), as the reference did. Either way the subsets are
nested and stratified by class. A run's length follows its number of labeled slices.

Seeds (`sweep.seeds`; the reference protocol's: `sweep.reference_seeds`). Seed s
sets the labeled subset (`label_seed`), the data order and the initialisation
(`seed`) of both arms together. Each fold pretrains once, from its first seed's
initialisation; at that seed both arms start from the same random encoder.
Budgets above `multi_seed_max_fraction` (slices) or `multi_seed_max_subjects`
(subjects; all subjects too) run with the first seed only, to bound the cost.

Everything here is a pure function of the sweep config and the data set's
labels and splits: `plan_runs` lists the runs in execution order, each with its
workdir and config (`run_config`), so running the sweep again finds the same
runs. `sweep.py` runs them, `report.py` writes the tables and figures.
"""

import dataclasses
import os

import ml_collections
import numpy as np

from simclr_jax.data import arrays as arrays_lib
from simclr_jax.data import batches
from simclr_jax.train import compile_cache
from simclr_jax.train import workdirs
from simclr_jax.data import splits as splits_lib

# Sections of a sweep config that its runs do not have.
SWEEP_SECTIONS = ('sweep', 'cam')
# What each protocol sets in its runs' configs (dotted field names).
PROTOCOLS = {
    'honest': {'split.scheme': 'subject', 'split.include_test_in_pretrain': False,
               'eval.selection_split': 'val'},
    'slice_split': {'split.scheme': 'slice', 'split.num_folds': None,
                    'split.include_test_in_pretrain': False, 'eval.selection_split': 'val'},
    'slice_split_transductive': {'split.scheme': 'slice', 'split.num_folds': None,
                                 'split.include_test_in_pretrain': True,
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
    'slice_split': 'the honest protocol with the reference\'s split instead of subject '
                   'folds: one random 80/20 slice split (the reference\'s test slices: the '
                   'same seed and test share; neighbouring slices of a person on both '
                   'sides), checkpoint chosen on a validation carve-out of the other '
                   'slices (split.val_fraction), test images unseen by the pretraining, '
                   'labels as the honest protocol\'s',
    'slice_split_transductive': 'the slice_split protocol with the reference\'s '
                                'transductive pretraining: the same slice split, '
                                'validation carve-out and labels, pretraining on all '
                                'images including test',
    'reference': 'the reference\'s protocol: one random 80/20 slice split (neighbouring '
                 'slices of a person on both sides, no validation carve-out), '
                 'pretraining on all images including test (temperature step-down on, '
                 'the two views in separate calls), test accuracy checked every epoch '
                 'and the best test epoch kept; the pretraining\'s kNN monitor only '
                 'monitors (fine-tuning starts from the last pretraining epoch)',
}
# The way from the honest protocol to the reference's (PROTOCOLS' order): what each
# protocol adds to the one before it, factor by factor.
PROTOCOL_FACTORS = {
    'slice_split': ('the slice split',),
    'slice_split_transductive': ('test images in pretraining',),
    'reference': ('selection on test', 'the reference\'s other choices'),
}
# What `reference` changes besides selection on test, over slice_split_transductive.
REFERENCE_OTHER_CHOICES = (
    'no validation carve-out, its slices labeled too; test accuracy checked every epoch; '
    'its run length, sweep.reference_num_epochs; no class weights; the temperature '
    'step-down; the two views in separate calls; labels as fractions of the slices, '
    'sweep.fractions')
# What this reimplementation still does otherwise than the reference protocol.
REFERENCE_DIFFERENCES = (
    'the SimCLR arm starts from the same random weights as the baseline, not from '
    'ImageNet weights (none can be downloaded here); test images are evaluated whole, '
    'where the reference cropped them at random at every evaluation')
ARMS = ('floor', 'baseline', 'finetune', 'probe')
ARM_NAMES = {'floor': 'raw-pixel 1-NN', 'baseline': 'baseline', 'finetune': 'SimCLR',
             'probe': 'SimCLR linear probe'}
# The trained arms of a label budget: `probe` (a finetune run that trains only the head
# on the frozen SimCLR encoder) where `sweep.linear_probe` is set.
# The arms whose runs can train in groups (`sweep.group_arms`): all but the floor.
GROUPABLE_ARMS = ('pretrain',) + ARMS[1:]
METRICS = ('accuracy', 'balanced_accuracy', 'macro_f1')
METRIC_TITLES = {'accuracy': 'Accuracy', 'balanced_accuracy': 'Balanced accuracy',
                 'macro_f1': 'Macro-F1'}
# Cost of one run beyond its steps (compilation, data loading, evaluation,
# checkpoints), in supervised steps; only used to weigh the ETA.
RUN_OVERHEAD_STEPS = 150


@dataclasses.dataclass
class Run:
  """One run of the sweep (a pretraining, a trained arm, or the floor)."""
  protocol: str
  task: str | None  # binary | three_class | four_class; None for a pretraining (serves all).
  fold: int | None  # The cross-validation fold; None for a single split.
  arm: str  # pretrain | floor | baseline | finetune
  budget: splits_lib.Budget | None  # The label budget; None for a pretraining.
  seed: int
  workdir: str
  config: ml_collections.ConfigDict | None  # None for the floor (no training).
  num_labeled: int | None  # Labeled slices.
  work: float  # Relative cost, for the ETA.
  num_labeled_subjects: int | None = None  # The subjects of the labeled slices.

  @property
  def name(self):
    fold = '' if self.fold is None else f' fold {self.fold}'
    if self.arm == 'pretrain':
      return f'{self.protocol}{fold} pretrain'
    return (f'{self.protocol} {self.task}{fold} {self.arm} {self.budget.label} '
            f'seed {self.seed}')

  @property
  def finished(self):
    return workdirs.is_finished(self.workdir)



# ----------------------------------------------------------------------------- config


def protocol_seeds(config, protocol):
  return tuple(config.sweep.reference_seeds if protocol == 'reference' else config.sweep.seeds)


def protocol_budgets(config, protocol):
  """The label budgets (`splits.Budget`) a protocol runs, smallest first.

  The reference protocol: the slice fractions `sweep.fractions`, as the reference.
  Another protocol: `sweep.subject_budgets` (k subjects, 0: all) where
  `sweep.label_unit` is subject, else the slice fractions.
  """
  if protocol != 'reference' and config.sweep.label_unit == 'subject':
    budgets = {splits_lib.Budget('subject', int(k)) for k in config.sweep.subject_budgets}
  else:
    budgets = {splits_lib.Budget('slice', float(f)) for f in config.sweep.fractions}
  return tuple(sorted(budgets, key=lambda b: b.sort_key))


def budget_seeds(config, protocol, budget):
  """Seeds run at `budget`: all of the protocol's up to multi_seed_max_fraction (slices)
  or multi_seed_max_subjects (subjects, never all of them), else the first."""
  seeds = protocol_seeds(config, protocol)
  if budget.unit == 'subject':
    few = not budget.is_all and budget.size <= config.sweep.multi_seed_max_subjects
  else:
    few = budget.size <= config.sweep.multi_seed_max_fraction + 1e-9
  return seeds if few else seeds[:1]


def supervised_schedule(config, num_labeled, protocol='honest'):
  """(num_epochs, eval_every_epochs) of a finetune or baseline run.

  `num_labeled` is the run's number of labeled slices, whatever its budget's unit.
  The whole number of epochs nearest to `max_steps_per_run` steps (at least one)
  if that is fewer than `num_epochs`, so large budgets get fewer epochs;
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


def run_config(config, protocol, mode, *, seed, num_classes, budget=splits_lib.ALL_SLICES,
               num_labeled=None, pretrained_workdir=None, task='four_class', fold=None):
  """The config of one run: the sweep config without its sweep-only fields.

  Args:
    config: the sweep config.
    protocol: a key of PROTOCOLS.
    mode: pretrain | finetune | baseline.
    seed: seed of the label subset, initialisation and data order.
    num_classes: classes of the task (what train_and_evaluate would set).
    budget: the label budget, a `splits.Budget` (finetune, baseline).
    num_labeled: labeled slices of the budget (finetune, baseline).
    pretrained_workdir: the fold's pretrain workdir (finetune).
    task: the label task (a pretraining takes the first of config.sweep.tasks).
    fold: the cross-validation fold, or None.

  Returns:
    A new ConfigDict, a pure function of the arguments.
  """
  run = protocol_config(config, protocol)
  for section in SWEEP_SECTIONS:
    del run[section]
  if mode == 'probe':  # The linear probe: fine-tuning's head on the frozen encoder.
    mode, run.finetune.linear_probe = 'finetune', True
  run.mode = mode
  run.seed = int(seed)
  run.labels.task = task
  run.model.num_classes = int(num_classes)
  run.split.fold = 0 if fold is None else int(fold)
  if mode == 'pretrain':
    run.train.num_epochs = int(config.sweep.pretrain_num_epochs)
    run.eval.every_epochs = _eval_every(config, run.train.num_epochs)
  else:
    run.labels.unit = budget.unit
    run.labels.fraction = float(budget.size) if budget.unit == 'slice' else 1.0
    run.labels.subjects = int(budget.size) if budget.unit == 'subject' else 0
    run.labels.seed = int(seed)
    run.train.num_epochs, run.eval.every_epochs = supervised_schedule(config, num_labeled,
                                                                      protocol)
  if 'eval.every_epochs' in PROTOCOLS[protocol]:  # The reference checks every epoch.
    run.eval.every_epochs = PROTOCOLS[protocol]['eval.every_epochs']
  if mode == 'finetune':
    run.finetune.pretrained_workdir = pretrained_workdir
  return run


# ----------------------------------------------------------------------------- plan


def trained_arms(config):
  """The arms trained at each label budget: baseline and finetune, and probe if
  `sweep.linear_probe`."""
  return ('baseline', 'finetune') + (('probe',) if config.sweep.get('linear_probe') else ())


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
  interrupted sweep already holds whole folds. Every labeled subset is drawn here,
  before any run: a subject budget larger than a fold's training subjects is an error.
  """
  planned = []
  task_classes = {task: len(arrays_lib.task_labels(arrays, task_config(config, task))[1])
                  for task in config.sweep.tasks}
  for protocol in config.sweep.protocols:
    folds = protocol_folds(config, protocol)
    seeds = protocol_seeds(config, protocol)
    plan = [(seed, budget) for seed in seeds for budget in protocol_budgets(config, protocol)
            if seed in budget_seeds(config, protocol, budget)]
    for fold in folds:
      splits = protocol_splits(config, protocol, arrays, fold)
      fold_dir = os.path.join(workdir, protocol, *([f'fold{fold}'] if fold is not None else []))
      pretrain_dir = os.path.join(fold_dir, 'pretrain')
      labeled = {}
      for seed, budget in plan:
        rows = splits_lib.budget_subset(arrays, splits['train'], budget, seed)
        labeled[seed, budget] = (len(rows), len(np.unique(arrays.subject_ids[rows])))
      for task in protocol_tasks(config, protocol):
        for seed, budget in plan:
          planned.append(Run(protocol, task, fold, 'floor', budget, seed,
                             _arm_dir(workdir, protocol, task, fold, 'floor', budget, seed),
                             None, labeled[seed, budget][0], 0.0, labeled[seed, budget][1]))
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
        for seed, budget in plan:
          num_labeled, num_subjects = labeled[seed, budget]
          for arm in trained_arms(config):
            run = run_config(config, protocol, arm, seed=seed, num_classes=task_classes[task],
                             budget=budget, num_labeled=num_labeled,
                             pretrained_workdir=pretrain_dir, task=task, fold=fold)
            steps = run.train.num_epochs * batches.steps_per_epoch(
                num_labeled, config.train.batch_size)
            cost = 1 if config.supervised.sam == 'none' else 2
            planned.append(Run(protocol, task, fold, arm, budget, seed,
                               _arm_dir(workdir, protocol, task, fold, arm, budget, seed),
                               run, num_labeled, steps * cost + RUN_OVERHEAD_STEPS,
                               num_subjects))
  return planned


def _arm_dir(workdir, protocol, task, fold, arm, budget, seed):
  """<protocol>/<task>[/fold<k>]/<arm>_<budget.name>_s<seed>, e.g. baseline_k8_s0, floor_f0.1_s0."""
  fold_part = [f'fold{fold}'] if fold is not None else []
  return os.path.join(workdir, protocol, task, *fold_part, f'{arm}_{budget.name}_s{seed}')


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


def training_groups(planned, max_runs, arms=GROUPABLE_ARMS):
  """The trained runs of `planned` in groups that train together, in execution order.

  Per protocol, the pretrainings of its folds first (fine-tuning starts from
  them), then each (task, seed, budget) cell: its baseline and finetune runs of
  every fold (and, another program, its probes). A group holds runs of one step
  key and one batch size (what `groups.train_group` requires), at most `max_runs`
  of them in plan order, all of `arms` (a run of another arm trains alone);
  `max_runs` 1 keeps the plan's own order, one run at a time.
  """
  trained = [run for run in planned if run.config is not None]
  if max_runs <= 1:
    return [[run] for run in trained]
  cells = {}  # In first-seen order (the plan's).
  for run in trained:
    if run.arm not in arms:
      cells[run.workdir] = [run]  # Alone, in its place.
      continue
    batch = (None if run.num_labeled is None else
             batches.train_batch_size(run.num_labeled, run.config.train.batch_size))
    cell = (run.protocol, run.arm == 'pretrain', run.task, run.seed, run.budget,
            compile_cache.step_key(run.config), batch)
    cells.setdefault(cell, []).append(run)
  groups = [runs[i:i + max_runs] for runs in cells.values()
            for i in range(0, len(runs), max_runs)]
  # A protocol's pretrainings before any of its fine-tuning, grouped or not.
  protocols = list(dict.fromkeys(run.protocol for run in trained))
  return sorted(groups, key=lambda g: (protocols.index(g[0].protocol), g[0].arm != 'pretrain'))
