"""Tests of the sweep's plan: label budgets (subjects or slice fractions), tasks, runs, configs.

Fast: the data sets are metadata in memory (fake_data's, or the synthetic set's
labels and subjects generated at 32 px), and nothing trains.
"""

import collections
import os

import numpy as np
import pytest

from configs import sweep as sweep_config
from simclr_jax import errors
from simclr_jax import run
from simclr_jax.data import arrays as arrays_lib
from simclr_jax.data import splits as splits_lib
from simclr_jax.data.datasets import alzheimer_mri
from simclr_jax.data.datasets import synthetic_mri
from simclr_jax.study import plan as plan_lib
from tests import fake_data
from tests.conftest import tiny_config

K4, K8, ALL = (splits_lib.Budget('subject', k) for k in (4, 8, 0))
HALF, WHOLE = (splits_lib.Budget('slice', f) for f in (0.5, 1.0))
NUM_CLASSES = {'binary': 2, 'three_class': 3, 'four_class': 4}


def kaggle_named_arrays():
  """fake_data's arrays (10 / 2 / 20 / 14 subjects of 4 slices) with the Kaggle class names."""
  arrays = fake_data.fake_arrays()
  arrays.class_names = list(alzheimer_mri.CLASS_NAMES)
  return arrays


def synthetic_arrays(num_subjects=100, slices_per_subject=24):
  """The metadata of the synthetic data set (the runlocal preset's), at 32 px."""
  data = synthetic_mri.generate(num_subjects, slices_per_subject, image_size=32)
  return arrays_lib.DatasetArrays(
      images=data['image'], labels=data['label'], subject_ids=data['subject_id'],
      slice_index=data['slice_index'], file_names=data['file_name'],
      class_names=list(synthetic_mri.CLASS_NAMES), masks=data['mask'])


def plan_config(**overrides):
  return tiny_config('/unused', 'sweep', **{
      'protocols': ('honest', 'reference'), 'tasks': ('binary', 'three_class'),
      'num_folds': 2, 'sweep.subject_budgets': (4, 8, 0), 'fractions': (0.5, 1.0),
      'seeds': (0, 1), 'sweep.multi_seed_max_subjects': 4, 'reference_seeds': (0,),
      **overrides})


def test_the_plan_lists_subject_budgets_for_honest_and_fractions_for_reference(tmp_path):
  config, arrays = plan_config(), kaggle_named_arrays()
  planned = plan_lib.plan_runs(config, str(tmp_path), arrays)
  keys = collections.Counter((r.protocol, r.task, r.fold, r.arm, r.budget, r.seed)
                             for r in planned)
  assert set(keys.values()) == {1}
  honest_cells = ((K4, 0), (K4, 1), (K8, 0), (ALL, 0))  # Seed 1 only up to 4 subjects.
  expected = (
      [('honest', task, fold, arm, budget, seed) for task in ('binary', 'three_class')
       for fold in (0, 1) for arm in plan_lib.ARMS for budget, seed in honest_cells]
      + [('reference', task, None, arm, budget, 0) for task in ('binary', 'three_class')
         for arm in plan_lib.ARMS for budget in (HALF, WHOLE)]
      + [('honest', None, 0, 'pretrain', None, 0), ('honest', None, 1, 'pretrain', None, 0),
         ('reference', None, None, 'pretrain', None, 0)])
  assert sorted(keys, key=repr) == sorted(expected, key=repr)
  for r in planned:
    if r.arm == 'pretrain':
      continue
    splits = plan_lib.protocol_splits(config, r.protocol, arrays, r.fold)
    rows = splits_lib.budget_subset(arrays, splits['train'], r.budget, r.seed)
    assert r.num_labeled == len(rows)  # Run lengths follow the labeled slices.
    assert r.num_labeled_subjects == len(np.unique(arrays.subject_ids[rows]))
    if r.budget.unit == 'subject' and not r.budget.is_all:
      assert r.num_labeled_subjects == r.budget.size
    fold = [] if r.fold is None else [f'fold{r.fold}']
    assert r.workdir == os.path.join(str(tmp_path), r.protocol, r.task, *fold,
                                     f'{r.arm}_{r.budget.name}_s{r.seed}')
    assert r.budget.label in r.name
    if r.config is None:  # The floor trains nothing.
      continue
    labels = r.config.labels
    assert splits_lib.Budget.of_labels(labels) == r.budget and labels.seed == r.seed
    assert (labels.unit, labels.fraction, labels.subjects) == (
        ('subject', 1.0, r.budget.size) if r.protocol == 'honest' else ('slice', r.budget.size, 0))
    assert r.config.model.num_classes == NUM_CLASSES[r.task]
    assert r.config.train.num_epochs == plan_lib.supervised_schedule(
        config, r.num_labeled, r.protocol)[0]
    if r.arm == 'baseline':  # A valid training config (finetune's needs its pretraining).
      run.check_config(r.config)
  names = {os.path.relpath(r.workdir, str(tmp_path)) for r in planned}
  assert {'honest/binary/fold0/baseline_k4_s1', 'honest/three_class/fold1/finetune_kall_s0',
          'reference/binary/floor_f0.5_s0', 'honest/fold0/pretrain'} <= names


def test_slice_fractions_stay_selectable_for_the_honest_protocol():
  config = plan_config(**{'sweep.label_unit': 'slice'})
  assert plan_lib.protocol_budgets(config, 'honest') == (HALF, WHOLE)
  assert plan_lib.protocol_budgets(config, 'reference') == (HALF, WHOLE)
  config.sweep.label_unit = 'subject'
  config.sweep.subject_budgets = (0, 8, 4, 8)  # Sorted, once each, all subjects last.
  assert plan_lib.protocol_budgets(config, 'honest') == (K4, K8, ALL)
  assert plan_lib.budget_seeds(config, 'honest', K4) == (0, 1)
  assert plan_lib.budget_seeds(config, 'honest', K8) == (0,)
  assert plan_lib.budget_seeds(config, 'honest', ALL) == (0,)  # All subjects: one seed.
  assert plan_lib.budget_seeds(config, 'honest', HALF) == (0,)
  config.sweep.multi_seed_max_fraction = 0.5
  assert plan_lib.budget_seeds(config, 'honest', HALF) == (0, 1)


def test_schedule_caps_steps_and_spreads_evaluations():
  config = plan_config(num_epochs=50, max_steps_per_run=40, evals_per_run=5, batch_size=16,
                       multi_seed_max_fraction=0.5)
  # 20 images: 2 steps per epoch, 50 epochs = 100 steps > 40: cut to 20 epochs.
  assert plan_lib.supervised_schedule(config, 20) == (20, 4)
  # 4 images: 1 step per epoch, 50 epochs = 50 steps: cut to 40 epochs.
  assert plan_lib.supervised_schedule(config, 4) == (40, 8)
  # 300 images: 19 steps per epoch: 2 whole epochs fit in 40 steps.
  assert plan_lib.supervised_schedule(config, 300) == (2, 1)
  # 1000 images: 63 steps per epoch, more than the cap: one epoch all the same.
  assert plan_lib.supervised_schedule(config, 1000) == (1, 1)
  config.sweep.max_steps_per_run = None
  config.sweep.evals_per_run = None
  assert plan_lib.supervised_schedule(config, 20) == (50, config.eval.every_epochs)
  half, whole = splits_lib.Budget('slice', 0.5), splits_lib.Budget('slice', 1.0)
  assert plan_lib.budget_seeds(config, 'honest', half) == (0, 1)
  assert plan_lib.budget_seeds(config, 'honest', whole) == (0,)
  assert plan_lib.budget_seeds(config, 'reference', half) == (0,)
  assert plan_lib.budget_seeds(config, 'honest', splits_lib.Budget('subject', 4)) == (0, 1)
  assert plan_lib.budget_seeds(config, 'honest', splits_lib.Budget('subject', 0)) == (0,)


def test_a_budget_larger_than_a_folds_subjects_fails_before_any_run(tmp_path):
  config = plan_config(**{'sweep.subject_budgets': (4, 40)})  # 46 subjects, ~30 per fold.
  with pytest.raises(errors.UserError, match=r'budget of 40 subjects.*sweep\.subject_budgets'):
    plan_lib.plan_runs(config, str(tmp_path), kaggle_named_arrays())


@pytest.mark.parametrize('num_folds', [2, 5])
def test_the_runlocal_preset_plans_budgets_its_data_set_has(tmp_path, num_folds):
  """runlocal: the synthetic set (100 subjects x 24 slices), 2 folds of 45 training subjects."""
  config = sweep_config.get_config('preset=runlocal')
  config.split.num_folds = num_folds
  if num_folds == 5:  # The docstring's way up: five folds and the default budgets.
    config.sweep.subject_budgets = sweep_config.sweep_section().subject_budgets
  run.check_config(config)
  assert config.sweep.tasks == ('binary', 'three_class') and config.sweep.label_unit == 'subject'
  planned = plan_lib.plan_runs(config, str(tmp_path), synthetic_arrays())
  honest = [r for r in planned if r.protocol == 'honest' and r.arm == 'baseline']
  budgets = plan_lib.protocol_budgets(config, 'honest')
  assert {r.budget for r in honest} == set(budgets)
  assert len(honest) == num_folds * len(budgets) * len(config.sweep.tasks)
  for r in honest:  # A budget of k subjects has k of them, in every fold.
    if not r.budget.is_all:
      assert r.num_labeled_subjects == r.budget.size and r.num_labeled == 24 * r.budget.size
    else:
      assert r.num_labeled_subjects > max(b.size for b in budgets)
  reference = {r.budget for r in planned if r.protocol == 'reference' and r.arm == 'floor'}
  assert reference == {splits_lib.Budget('slice', 0.1), WHOLE}


def test_run_config_writes_the_budget_into_the_labels_section():
  config = sweep_config.get_config('preset=cpu')
  runs = {budget: plan_lib.run_config(config, 'honest', 'baseline', seed=2, num_classes=3,
                                      budget=budget, num_labeled=400, task='three_class')
          for budget in (K8, HALF)}
  labels = runs[K8].labels
  assert (labels.unit, labels.subjects, labels.fraction, labels.seed) == ('subject', 8, 1.0, 2)
  assert (runs[HALF].labels.unit, runs[HALF].labels.fraction, runs[HALF].labels.subjects) == (
      'slice', 0.5, 0)
  assert runs[K8].labels.task == 'three_class' and runs[K8].model.num_classes == 3
  default = plan_lib.run_config(config, 'honest', 'baseline', seed=0, num_classes=2,
                                num_labeled=400)
  assert splits_lib.Budget.of_labels(default.labels) == splits_lib.ALL_SLICES


def test_the_protocols_between_honest_and_reference_each_add_one_factor(tmp_path):
  """slice_split: the reference's test slices, a validation carve-out, test kept out of
  pretraining; slice_split_transductive: the same with test in pretraining; both with
  the honest protocol's budgets, seeds and run lengths."""
  chain = ('honest', 'slice_split', 'slice_split_transductive', 'reference')
  assert tuple(plan_lib.PROTOCOLS) == chain
  assert sweep_config.sweep_section().protocols == ('honest', 'reference')  # The default.
  assert sweep_config.get_config('preset=cpu').sweep.protocols == chain
  config = plan_config(protocols=chain, reference_num_epochs=7, evals_per_run=2)
  arrays = kaggle_named_arrays()
  planned = plan_lib.plan_runs(config, str(tmp_path), arrays)
  splits = {p: plan_lib.protocol_splits(config, p, arrays) for p in chain[1:]}
  np.testing.assert_array_equal(splits['slice_split']['test'], splits['reference']['test'])
  for name in ('train', 'val', 'test'):
    np.testing.assert_array_equal(splits['slice_split'][name],
                                  splits['slice_split_transductive'][name])
  assert len(splits['slice_split']['val']) and not len(splits['reference']['val'])
  np.testing.assert_array_equal(
      np.union1d(splits['slice_split']['train'], splits['slice_split']['val']),
      splits['reference']['train'])
  expected = {  # (scheme, folds, test in pretraining, selection split, label unit)
      'slice_split': ('slice', None, False, 'val', 'subject'),
      'slice_split_transductive': ('slice', None, True, 'val', 'subject')}
  for protocol, settings in expected.items():
    runs = [r for r in planned if r.protocol == protocol]
    assert {r.fold for r in runs} == {None}
    cells = lambda runs: collections.Counter((r.task, r.arm, r.budget, r.seed) for r in runs
                                             if r.arm != 'pretrain')
    assert cells(runs) == cells(r for r in planned if r.protocol == 'honest' and r.fold == 0)
    pretrain = [r for r in runs if r.arm == 'pretrain']
    assert len(pretrain) == 1 and pretrain[0].workdir == str(tmp_path / protocol / 'pretrain')
    for r in runs:
      if r.config is None:
        continue
      assert (r.config.split.scheme, r.config.split.num_folds,
              r.config.split.include_test_in_pretrain,
              r.config.eval.selection_split) == settings[:4]
      assert (r.config.labels.class_weights, r.config.pretrain.temperature_schedule,
              r.config.pretrain.joint_views) == (config.labels.class_weights,
                                                 config.pretrain.temperature_schedule,
                                                 config.pretrain.joint_views)
      if r.arm != 'pretrain':  # The honest schedule, not the reference's 7 epochs.
        assert r.config.labels.unit == settings[4]
        assert (r.config.train.num_epochs, r.config.eval.every_epochs) == (
            plan_lib.supervised_schedule(config, r.num_labeled, 'honest'))
  rows = {p: splits_lib.pretrain_indices(splits[p], plan_lib.protocol_config(
      config, p).split.include_test_in_pretrain) for p in expected}
  assert not np.isin(splits['slice_split']['test'], rows['slice_split']).any()
  np.testing.assert_array_equal(rows['slice_split_transductive'], np.arange(len(arrays.labels)))


ALL_ARMS = ('pretrain', 'baseline', 'finetune', 'probe')


@pytest.mark.parametrize('max_runs,arms', [(1, ALL_ARMS), (3, ALL_ARMS), (10, ALL_ARMS),
                                           (10, ('pretrain',)), (10, ('finetune', 'probe'))])
def test_training_groups_train_a_cells_folds_after_their_pretrainings(tmp_path, max_runs, arms):
  planned = plan_lib.plan_runs(plan_config(num_folds=3), str(tmp_path), kaggle_named_arrays())
  groups = plan_lib.training_groups(planned, max_runs, arms)
  trained = [r for r in planned if r.config is not None]
  flat = [r for group in groups for r in group]
  assert sorted(r.workdir for r in flat) == sorted(r.workdir for r in trained)  # Each once.
  if max_runs == 1:
    assert flat == trained  # One at a time: the plan's own order.
  assert all(1 <= len(group) <= max_runs for group in groups)
  seen = set()
  for group in groups:
    first = group[0]
    for r in group:  # One cell: protocol, task, seed, budget (a pretraining: its protocol).
      assert (r.protocol, r.arm == 'pretrain', r.task, r.seed, r.budget) == (
          first.protocol, first.arm == 'pretrain', first.task, first.seed, first.budget)
      if r.arm in ('finetune', 'probe'):  # They start from their fold's finished pretraining.
        assert r.config.finetune.pretrained_workdir in seen
    seen.update(r.workdir for r in group)
    # The linear probe trains the head alone: another program, its own group.
    assert ({r.arm == 'probe' for r in group} == {True}) or all(r.arm != 'probe' for r in group)
    if len(group) > 1:
      assert first.arm in arms
  if arms != ALL_ARMS:  # The other arms' runs train alone.
    assert all(len(g) == 1 for g in groups if g[0].arm not in arms)
    assert any(len(g) > 1 for g in groups if g[0].arm in arms)
  elif max_runs == 10:  # 3 folds x 2 arms of a cell, and its 3 probes; 3 pretrainings.
    sizes = collections.Counter((g[0].protocol, g[0].arm, len(g)) for g in groups)
    assert sizes == {('honest', 'pretrain', 3): 1, ('honest', 'baseline', 6): 8,
                     ('honest', 'probe', 3): 8, ('reference', 'pretrain', 1): 1,
                     ('reference', 'baseline', 2): 4, ('reference', 'probe', 1): 4}
