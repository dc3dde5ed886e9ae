"""A sweep's aggregates: intervals over subjects and seeds, and the metrics of probabilities."""

import json
import os

import pytest

from simclr_jax.metrics import bootstrap
from simclr_jax.metrics import calibration
from simclr_jax.metrics import classification
from simclr_jax.study import plan as plan_lib
from simclr_jax.study import rows as rows_lib
from simclr_jax.train import workdirs
from tests.fake_sweep import pooled_rows
from tests.fake_sweep import read_rows
from tests.fake_sweep import read_text


def test_intervals_resample_seeds_and_show_each_seed(fake_sweep):
  config, workdir, _, summary, _ = fake_sweep
  entry = summary['protocols']['honest']['tasks']['binary']['budgets'][0]
  assert entry['budget']['label'] == '4 subjects'
  # Each seed's out-of-fold predictions: its two folds joined.
  arms = {arm: [rows_lib._concatenate([classification.Predictions.load(  # pylint: disable=protected-access
      workdirs.predictions_path(os.path.join(workdir, 'honest', 'binary', f'fold{k}',
                                             f'{arm}_k4_s{seed}'))) for k in (0, 1)])
      for seed in (0, 1)] for arm in plan_lib.ARMS}
  expected = bootstrap.arm_statistics(
      arms, [('finetune', 'baseline')], 'subject', config.sweep.bootstrap_samples, config.seed,
      metrics=('balanced_accuracy',), resample_seeds=True)
  got = entry['comparisons']['finetune-baseline']['subject']['balanced_accuracy']
  want = expected['differences']['finetune', 'baseline']['balanced_accuracy']
  assert (got['low'], got['high']) == (want['low'], want['high'])
  assert len(got['seed_values']) == 2
  arm = entry['arms']['finetune']['subject']['balanced_accuracy']
  assert arm['seed_values'] == expected['arms']['finetune']['balanced_accuracy']['seed_values']
  with open(os.path.join(workdir, 'sweep.json')) as f:
    stored = json.load(f)['protocols']['honest']['tasks']['binary']['budgets'][0]
  assert stored['arms']['finetune']['subject']['balanced_accuracy']['seed_values'] == (
      arm['seed_values'])
  seeds = read_text(workdir, 'results.md').split('#### Seed spread')[1].split('####')[0]
  assert ' / '.join(f'{100 * v:.1f}' for v in arm['seed_values']) in seeds


def test_probability_metrics_per_slice_and_subject(fake_sweep):
  _, workdir, _, summary, _ = fake_sweep
  rows = read_rows(workdir)
  row = next(r for r in pooled_rows(rows) if r['task'] == 'binary' and r['arm'] == 'finetune'
             and r['budget'] == '4 subjects' and r['seed'] == '0')
  predictions = rows_lib._concatenate([classification.Predictions.load(  # pylint: disable=protected-access
      workdirs.predictions_path(os.path.join(workdir, 'honest', 'binary', f'fold{k}',
                                             'finetune_k4_s0'))) for k in (0, 1)])
  subjects = classification.subject_level(predictions)
  for prefix, scored in (('', predictions), ('subject_', subjects)):
    expected = calibration.probability_metrics(scored.labels, scored.probabilities)
    for metric, value in expected.items():
      assert float(row[prefix + metric]) == pytest.approx(value), prefix + metric
  three = next(r for r in pooled_rows(rows) if r['task'] == 'three_class')
  assert three['sensitivity'] == three['subject_specificity'] == ''  # Binary only.
  assert 0 <= float(three['subject_roc_auc']) <= 1
  entry = summary['protocols']['honest']['tasks']['binary']['budgets'][0]
  for level in bootstrap.LEVELS:
    auc = entry['arms']['finetune'][level]['roc_auc']
    assert auc['low'] <= auc['value'] <= auc['high']
    assert 'outcome' in entry['comparisons']['finetune-baseline'][level]['brier']
  assert 'sensitivity' not in summary['protocols']['honest']['tasks']['three_class'][
      'budgets'][0]['arms']['finetune']['subject']
