"""The sweep's plan: protocols, arms, seeds, and the config and cost of every run.

For each protocol (`config.protocols`) the sweep pretrains SimCLR once, then, at
each label fraction and seed, fine-tunes the pretrained encoder (`finetune`, the
"SimCLR" arm) and trains the same classifier from scratch (`baseline`), both on
the same labeled subset. A third arm needs no training: 1-nearest-neighbour on
raw pixels (correlation) from the same labeled subset (`floor`), the score a
learned model must clear. Protocols:

- `honest`: the subject split (no person on both sides), model selection on the
  validation subjects, pretraining on train + val only (test images unseen).
- `reference`: the reference study's choices: the slice split, pretraining on
  every image including test, the checkpoint with the best TEST accuracy kept.

Seeds. Seed s sets the labeled subset (`label_seed`), the data order and the
initialisation (`seed`) of both arms together, so the spread over seeds covers
all three. Each protocol pretrains once, from its first seed's initialisation;
at that seed both arms start from the same random encoder. At other seeds the
baseline starts from the initialisation of seed s, a fresh draw from the same
distribution, and the fine-tuned arm's head too (`train.py` ties init and data
order to one seed). Fractions above `multi_seed_max_fraction` run with the first
seed only, to bound the cost: the spread matters most where labels are few.

Everything here is a pure function of the sweep config and the data set's
labels and splits: `plan_runs` lists the runs in execution order, each with its
workdir and config (`run_config`), so running the sweep again finds the same
runs. `sweep.py` runs them, `sweep_report.py` writes the tables and figures.
"""

import dataclasses
import os

import ml_collections

from simclr_jax import input_pipeline
from simclr_jax import runs
from simclr_jax import splits as splits_lib

# Fields of a sweep config that its runs do not have.
SWEEP_FIELDS = ('protocols', 'fractions', 'seeds', 'multi_seed_max_fraction',
                'reference_seeds', 'pretrain_num_epochs', 'max_steps_per_run',
                'evals_per_run', 'floor_image_size', 'cam_method', 'cam_layer')
PROTOCOLS = {
    'honest': dict(split_scheme='subject', include_test_in_pretrain=False,
                   selection_split='val'),
    'reference': dict(split_scheme='slice', include_test_in_pretrain=True,
                      selection_split='test', selection_metric='accuracy'),
}
PROTOCOL_DESCRIPTIONS = {
    'honest': 'subject split (no person on both sides), checkpoint chosen on the '
              'validation subjects, test images unseen by pretraining',
    'reference': 'the reference\'s protocol: slice split (neighbouring slices of a '
                 'person on both sides), pretraining on all images including test, '
                 'checkpoint with the best TEST accuracy kept (the pretraining\'s kNN '
                 'monitor too)',
}
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
  arm: str  # pretrain | floor | baseline | finetune
  fraction: float | None
  seed: int
  workdir: str
  config: ml_collections.ConfigDict | None  # None for the floor (no training).
  num_labeled: int | None
  work: float  # Relative cost, for the ETA.

  @property
  def name(self):
    if self.arm == 'pretrain':
      return f'{self.protocol} pretrain'
    return f'{self.protocol} {self.arm} {percent_label(self.fraction)} seed {self.seed}'

  @property
  def finished(self):
    return runs.is_finished(self.workdir)



# ----------------------------------------------------------------------------- config


def check_sweep_config(config):
  """Rejects sweep settings the sweep cannot run, in one sentence naming the fix."""
  unknown = [p for p in config.protocols if p not in PROTOCOLS]
  if unknown or not config.protocols:
    raise ValueError(f'Unknown protocols {unknown or "(none)"}; set --config.protocols to '
                     f'some of {tuple(PROTOCOLS)}, e.g. "(\'honest\',)".')
  if not config.fractions or any(not 0.0 < f <= 1.0 for f in config.fractions):
    raise ValueError(f'Label fractions must be in (0, 1], got {config.fractions}; set '
                     '--config.fractions to e.g. "(0.01, 0.1, 1.0)".')
  if not config.seeds or not config.reference_seeds:
    raise ValueError('The sweep needs at least one seed; set --config.seeds and '
                     '--config.reference_seeds to e.g. "(0,)".')
  if config.max_steps_per_run is not None and config.max_steps_per_run < 1:
    raise ValueError(f'max_steps_per_run={config.max_steps_per_run} must be positive '
                     '(or None for no cap).')
  if config.evals_per_run is not None and config.evals_per_run < 1:
    raise ValueError(f'evals_per_run={config.evals_per_run} must be positive (or None '
                     'to evaluate every eval_every_epochs).')
  if config.pretrain_num_epochs < 1:
    raise ValueError('pretrain_num_epochs must be at least 1; set '
                     '--config.pretrain_num_epochs.')


def protocol_seeds(config, protocol):
  return tuple(config.reference_seeds if protocol == 'reference' else config.seeds)


def fraction_seeds(config, protocol, fraction):
  """Seeds run at `fraction`: all of the protocol's up to multi_seed_max_fraction."""
  seeds = protocol_seeds(config, protocol)
  return seeds if fraction <= config.multi_seed_max_fraction + 1e-9 else seeds[:1]


def supervised_schedule(config, num_labeled):
  """(num_epochs, eval_every_epochs) of a finetune or baseline run.

  The whole number of epochs nearest to `max_steps_per_run` steps (at least one)
  if that is fewer than `num_epochs`, so large fractions get fewer epochs;
  validation runs about `evals_per_run` times.
  """
  per_epoch = input_pipeline.steps_per_epoch(num_labeled, config.batch_size)
  num_epochs = config.num_epochs
  if config.max_steps_per_run is not None:
    num_epochs = max(1, min(num_epochs, round(config.max_steps_per_run / per_epoch)))
  return num_epochs, _eval_every(config, num_epochs)


def _eval_every(config, num_epochs):
  if config.evals_per_run is None:
    return config.eval_every_epochs
  return max(1, num_epochs // config.evals_per_run)


def run_config(config, protocol, mode, *, seed, num_classes, fraction=1.0,
               num_labeled=None, pretrained_workdir=None):
  """The config of one run: the sweep config without its sweep-only fields.

  Args:
    config: the sweep config.
    protocol: a key of PROTOCOLS.
    mode: pretrain | finetune | baseline.
    seed: seed of the label subset, initialisation and data order.
    num_classes: classes of the data set (what train_and_evaluate would set).
    fraction: label fraction (finetune, baseline).
    num_labeled: size of the labeled subset (finetune, baseline).
    pretrained_workdir: the protocol's pretrain workdir (finetune).

  Returns:
    A new ConfigDict, a pure function of the arguments.
  """
  values = config.to_dict()
  for field in SWEEP_FIELDS:
    values.pop(field, None)
  run = ml_collections.ConfigDict(values)
  run.update(PROTOCOLS[protocol])
  run.mode = mode
  run.seed = int(seed)
  run.num_classes = int(num_classes)
  if mode == 'pretrain':
    run.num_epochs = int(config.pretrain_num_epochs)
    run.eval_every_epochs = _eval_every(config, run.num_epochs)
  else:
    run.label_fraction = float(fraction)
    run.label_seed = int(seed)
    run.num_epochs, run.eval_every_epochs = supervised_schedule(config, num_labeled)
  if mode == 'finetune':
    run.pretrained_workdir = pretrained_workdir
  return run


# ----------------------------------------------------------------------------- plan


def plan_runs(config, workdir, arrays):
  """Every run of the sweep in execution order, with its config and cost.

  Per protocol: the floor runs (instant), the pretraining, then baseline and
  finetune side by side, seed by seed, so that an interrupted sweep already
  holds whole curves of the first seed.
  """
  runs = []
  num_classes = len(arrays.class_names)
  for protocol in config.protocols:
    splits = protocol_splits(config, protocol, arrays)
    protocol_dir = os.path.join(workdir, protocol)
    pretrain_dir = os.path.join(protocol_dir, 'pretrain')
    seeds = protocol_seeds(config, protocol)
    plan = [(seed, fraction) for seed in seeds for fraction in config.fractions
            if seed in fraction_seeds(config, protocol, fraction)]
    labeled = {(seed, fraction): len(splits_lib.label_subset(
        arrays.labels, splits['train'], fraction, seed)) for seed, fraction in plan}
    for seed, fraction in plan:
      runs.append(Run(protocol, 'floor', fraction, seed,
                      os.path.join(protocol_dir, f'floor_f{fraction:g}_s{seed}'), None,
                      labeled[seed, fraction], 0.0))
    pretrain = run_config(config, protocol, 'pretrain', seed=seeds[0],
                          num_classes=num_classes)
    pretrain_images = len(splits_lib.pretrain_indices(
        splits, pretrain.include_test_in_pretrain))
    steps = pretrain.num_epochs * input_pipeline.steps_per_epoch(
        pretrain_images, config.batch_size)
    # A pretraining step runs two views, twice with SAM.
    cost = 2 * (1 if config.sam == 'none' else 2)
    runs.append(Run(protocol, 'pretrain', None, seeds[0], pretrain_dir, pretrain, None,
                    steps * cost + RUN_OVERHEAD_STEPS))
    for seed, fraction in plan:
      for arm in ('baseline', 'finetune'):
        run = run_config(config, protocol, arm, seed=seed, num_classes=num_classes,
                         fraction=fraction, num_labeled=labeled[seed, fraction],
                         pretrained_workdir=pretrain_dir)
        steps = run.num_epochs * input_pipeline.steps_per_epoch(
            labeled[seed, fraction], config.batch_size)
        cost = 1 if config.finetune_sam == 'none' else 2
        runs.append(Run(protocol, arm, fraction, seed,
                        os.path.join(protocol_dir, f'{arm}_f{fraction:g}_s{seed}'), run,
                        labeled[seed, fraction], steps * cost + RUN_OVERHEAD_STEPS))
  return runs


def protocol_config(config, protocol):
  """`config` with the protocol's split, pretraining and selection settings."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.update(PROTOCOLS[protocol])
  return config


def protocol_splits(config, protocol, arrays):
  """The train / val / test splits of the protocol."""
  return splits_lib.load_splits(protocol_config(config, protocol), arrays)


