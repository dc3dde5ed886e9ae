"""A label-budget sweep with training faked: the sweep's runs, reports and files in seconds.

`run_fake_sweep` runs the sweep mode with `train_and_evaluate` replaced by
`FakeTraining` (test predictions drawn right with a probability per arm, and each
pretraining's curves) and the Grad-CAM grid left out; conftest's `fake_sweep`
fixture runs it once per session for test_sweep, test_verdicts, test_results and
test_recompute.
"""

import csv
import os

import numpy as np

from simclr_jax import run
from simclr_jax.data import arrays as arrays_lib
from simclr_jax.data import splits as splits_lib
from simclr_jax.metrics import classification
from simclr_jax.study import report as report_lib
from simclr_jax.study import sweep
from simclr_jax.train import curves as curves_lib
from simclr_jax.train import workdirs
from tests.conftest import tiny_config

# All four protocols. Honest, slice_split and slice_split_transductive: 4 and all
# training subjects (of each fold); reference: 50 and 100 %.
SWEEP_OVERRIDES = {
    'protocols': ('honest', 'slice_split', 'slice_split_transductive', 'reference'), 'tasks': ('binary', 'three_class', 'four_class'),
    'num_folds': 2, 'sweep.subject_budgets': (4, 0), 'fractions': (0.5, 1.0), 'seeds': (0, 1),
    'sweep.multi_seed_max_subjects': 4, 'multi_seed_max_fraction': 0.5,
    'reference_seeds': (0,), 'pretrain_num_epochs': 1, 'max_steps_per_run': None,
    'evals_per_run': None, 'floor_image_size': 16, 'cam_method': 'gradcam',
    'cam_layer': 'stage3', 'bootstrap_samples': 200}
NUM_CLASSES = {'binary': 2, 'three_class': 3, 'four_class': 4}


def sweep_test_config(data_dir, **overrides):
  return tiny_config(data_dir, 'sweep', **{**SWEEP_OVERRIDES, **overrides})


class FakeTraining:
  """Stands in for train.train_and_evaluate: writes metrics.json and test predictions.

  Each test slice is answered right with probability `right[mode]`; the draws do
  not depend on the mode, so arms of equal `right` answer identically, and a
  better arm is right wherever a worse one is (paired predictions).
  """

  def __init__(self, arrays, right=None):
    self.arrays = arrays
    self.right = right or {'baseline': 0.6, 'finetune': 0.65}
    self.calls = []
    self.groups = []  # The workdirs of each group trained together.

  def train_group(self, configs, workdirs_of_runs, cache=None, run_devices=0):
    """Stands in for groups.train_group: each run as train_and_evaluate, the group noted."""
    del run_devices  # Nothing runs on devices.
    self.groups.append(list(workdirs_of_runs))
    return [self(config, workdir, cache) for config, workdir in zip(configs, workdirs_of_runs)]

  def __call__(self, config, workdir, cache=None):
    del cache  # A stand-in compiles nothing.
    self.calls.append((config, workdir))
    if config.mode == 'pretrain':
      writer = curves_lib.CurveWriter(workdir)  # What a pretraining's evaluations write.
      split = config.eval.selection_split
      for step in (2, 4, 6):
        writer.write_scalars(step, {'train/loss': 5.0 / step})
        writer.write_scalars(step, {f'{split}/knn1_balanced_accuracy': 0.5 + step / 100,
                                    f'{split}/probe_balanced_accuracy': 0.6})
      result = {'mode': 'pretrain', 'fold': config.split.fold, 'knn1_accuracy': 0.5}
      workdirs.write_metrics(workdir, result)
      return result
    # The sweep pretrains the fold before it fine-tunes.
    assert workdirs.is_finished(config.finetune.pretrained_workdir) or config.mode == 'baseline'
    labels, class_names = arrays_lib.task_labels(self.arrays, config)
    splits = splits_lib.load_splits(config, self.arrays)
    test = splits['test']
    num_classes = len(class_names)
    rng = np.random.default_rng([config.seed, int(100 * config.labels.fraction),
                                 config.labels.subjects, config.split.fold,
                                 arrays_lib.TASKS.index(config.labels.task)])
    uniform, other = rng.uniform(size=len(test)), rng.integers(1, num_classes, len(test))
    arm = 'probe' if config.mode == 'finetune' and config.finetune.linear_probe else config.mode
    predicted = np.where(uniform < self.right.get(arm, self.right[config.mode]), labels[test],
                         (labels[test] + other) % num_classes)
    probabilities = np.full((len(test), num_classes), 0.2 / num_classes, np.float32)
    probabilities[np.arange(len(test)), predicted] += 0.8
    predictions = classification.Predictions(np.asarray(test, np.int64),
                                       self.arrays.subject_ids[test], labels[test],
                                       probabilities)
    workdirs.write_predictions(workdir, predictions)
    result = classification.prediction_metrics(predictions, num_classes)
    train_idx = splits_lib.labeled_rows(config, self.arrays, splits['train'])
    select = splits[config.eval.selection_split]
    result.update(
        mode=config.mode, task=config.labels.task, fold=config.split.fold, chosen_step=3,
        class_names=class_names, num_train_images=int(len(train_idx)),
        selection_classes=[class_names[k] for k in np.unique(labels[select])],
        **{f'selection_{config.eval.selection_split}_{config.eval.selection_metric}':
           float(rng.uniform())})
    workdirs.write_metrics(workdir, result)
    return result


def run_fake_sweep(data_dir, workdir, monkeypatch, right=None, **overrides):
  """A sweep with training replaced by FakeTraining (all four protocols by default)."""
  config = sweep_test_config(data_dir, **overrides)
  fake = FakeTraining(arrays_lib.load_arrays(config), right)
  monkeypatch.setattr(sweep.trainer, 'train_and_evaluate', fake)
  monkeypatch.setattr(sweep.groups_lib, 'train_group', fake.train_group)
  gradcam_calls = []
  monkeypatch.setattr(report_lib, 'write_gradcam_grid',
                      lambda *args: gradcam_calls.append(args))
  summary = run.run(config, workdir)
  return config, workdir, fake, summary, gradcam_calls


def read_rows(workdir):
  with open(os.path.join(workdir, 'results.csv')) as f:
    return list(csv.DictReader(f))


def read_text(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return f.read()


def run_rows(rows):
  return [r for r in rows if r['fold'] != 'pooled']


def pooled_rows(rows):
  return [r for r in rows if r['fold'] == 'pooled']


def is_all(row):
  """Whether a results.csv row labeled the whole train split (100 % or all subjects)."""
  return row['budget'] in ('100 %', 'all subjects')
