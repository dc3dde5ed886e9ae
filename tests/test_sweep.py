"""Tests of the label-fraction sweep: plan, reports, skipping finished runs, one real run."""

import csv
import json
import math
import os

import numpy as np
import pytest

from configs import sweep as sweep_config
from simclr_jax import data as data_lib
from simclr_jax import evaluate
from simclr_jax import splits as splits_lib
from simclr_jax import sweep
from simclr_jax import sweep_plan
from simclr_jax import sweep_report
from tests.conftest import tiny_config

SWEEP_OVERRIDES = dict(
    protocols=('honest', 'reference'), fractions=(0.5, 1.0), seeds=(0, 1),
    multi_seed_max_fraction=0.5, reference_seeds=(0,), pretrain_num_epochs=1,
    max_steps_per_run=None, evals_per_run=None, floor_image_size=16,
    cam_method='gradcam', cam_layer='stage3')


def sweep_test_config(data_dir, **overrides):
  return tiny_config(data_dir, 'sweep', **{**SWEEP_OVERRIDES, **overrides})


class FakeTraining:
  """Stands in for train.train_and_evaluate: writes a metrics.json, counts calls."""

  def __init__(self, arrays):
    self.arrays = arrays
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append((config, workdir))
    if config.mode == 'finetune':  # The sweep pretrains before it fine-tunes.
      assert os.path.exists(os.path.join(config.pretrained_workdir, 'metrics.json'))
    splits = splits_lib.load_splits(config, self.arrays)
    test_labels = self.arrays.labels[splits['test']]
    rng = np.random.default_rng([config.seed, int(100 * config.label_fraction),
                                 config.mode == 'finetune'])
    predictions = np.where(rng.uniform(size=len(test_labels)) < 0.6, test_labels,
                           rng.integers(0, 4, len(test_labels)))
    result = evaluate.classification_metrics(test_labels, predictions, 4)
    train_idx = splits_lib.label_subset(self.arrays.labels, splits['train'],
                                        config.label_fraction, config.label_seed)
    result.update(mode=config.mode, chosen_step=3, class_names=self.arrays.class_names,
                  num_train_images=int(len(train_idx)),
                  selection_val_balanced_accuracy=float(rng.uniform()))
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump(result, f)
    return result


def run_fake_sweep(data_dir, workdir, monkeypatch):
  """A sweep of both protocols with training replaced by FakeTraining."""
  config = sweep_test_config(data_dir)
  fake = FakeTraining(data_lib.load_arrays(config))
  monkeypatch.setattr(sweep.train, 'train_and_evaluate', fake)
  gradcam_calls = []
  monkeypatch.setattr(sweep_report, 'write_gradcam_grid',
                      lambda *args: gradcam_calls.append(args))
  summary = sweep.run_sweep(config, workdir)
  return config, workdir, fake, summary, gradcam_calls


@pytest.fixture(scope='module')
def fake_sweep(data_dir, tmp_path_factory):
  with pytest.MonkeyPatch.context() as monkeypatch:  # Undone before the other tests.
    return run_fake_sweep(data_dir, str(tmp_path_factory.mktemp('sweep')), monkeypatch)


def read_rows(workdir):
  with open(os.path.join(workdir, 'results.csv')) as f:
    return list(csv.DictReader(f))


def test_sweep_writes_every_output_with_one_row_per_run(fake_sweep):
  config, workdir, fake, summary, gradcam_calls = fake_sweep
  for name in ('results.csv', 'results.md', 'sweep.json', 'config.json',
               'label_fraction_curve.png', 'confusion_matrices.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert len(gradcam_calls) == 1
  rows = read_rows(workdir)
  keys = sorted((r['protocol'], r['arm'], float(r['fraction']), int(r['seed'])) for r in rows)
  expected = sorted(
      [('honest', arm, f, s) for arm in sweep_plan.ARMS for f, s in ((0.5, 0), (0.5, 1), (1.0, 0))]
      + [('reference', arm, f, 0) for arm in sweep_plan.ARMS for f in (0.5, 1.0)])
  assert keys == expected
  assert list(rows[0]) == list(sweep_report.CSV_COLUMNS)
  # One pretraining per protocol, then 2 arms x (3 honest + 2 reference) runs.
  modes = [c.mode for c, _ in fake.calls]
  assert modes.count('pretrain') == 2 and len(modes) == 12
  with open(os.path.join(workdir, 'results.md')) as f:
    markdown = f.read()
  for needle in ('## Protocol `honest`', '## Protocol `reference`', 'raw-pixel 1-NN',
                 '50 % (', 'SimCLR beat the baseline', 'inflation'):
    assert needle in markdown, needle
  assert summary['protocols']['honest']['fractions'][0]['arms']['baseline'][
      'balanced_accuracy']['std'] is not None  # Two seeds at 50 %.


def test_label_subsets_are_nested_and_floor_scores_are_probabilities(fake_sweep):
  _, workdir, _, _, _ = fake_sweep
  rows = read_rows(workdir)
  for protocol in ('honest', 'reference'):
    for arm in sweep_plan.ARMS:
      labeled = {float(r['fraction']): int(r['num_labeled']) for r in rows
                 if r['protocol'] == protocol and r['arm'] == arm}
      assert labeled[0.5] < labeled[1.0]
    floor = [r for r in rows if r['protocol'] == protocol and r['arm'] == 'floor']
    for r in floor:
      for metric in sweep_plan.METRICS:
        assert 0.0 <= float(r[metric]) <= 1.0
  # The slice split leaks near-identical slices: the floor is far higher there.
  mean_floor = {p: np.mean([float(r['accuracy']) for r in rows if r['protocol'] == p
                            and r['arm'] == 'floor' and float(r['fraction']) == 1.0])
                for p in ('honest', 'reference')}
  assert mean_floor['reference'] > mean_floor['honest'] + 0.2


def test_run_configs_follow_the_protocols_and_seeds(fake_sweep):
  _, workdir, fake, _, _ = fake_sweep
  for config, run_dir in fake.calls:
    protocol = os.path.basename(os.path.dirname(run_dir))
    for key, value in sweep_plan.PROTOCOLS[protocol].items():
      assert config[key] == value
    assert 'fractions' not in config and 'protocols' not in config
    if config.mode == 'finetune':
      assert config.pretrained_workdir == os.path.join(workdir, protocol, 'pretrain')
    if config.mode != 'pretrain':
      assert config.label_seed == config.seed
      assert os.path.basename(run_dir) == (
          f'{config.mode}_f{config.label_fraction:g}_s{config.seed}')


def test_rerun_skips_finished_runs_and_completes_unfinished_ones(data_dir, tmp_path,
                                                                monkeypatch):
  config, workdir, fake, _, _ = run_fake_sweep(data_dir, str(tmp_path), monkeypatch)
  before = read_rows(workdir)
  num_calls = len(fake.calls)
  sweep.run_sweep(config, workdir)
  assert len(fake.calls) == num_calls
  assert read_rows(workdir) == before
  # An interrupted run (no metrics.json) is run again, and only it.
  os.remove(os.path.join(workdir, 'honest', 'baseline_f0.5_s1', 'metrics.json'))
  sweep.run_sweep(config, workdir)
  assert len(fake.calls) == num_calls + 1
  assert fake.calls[-1][1].endswith(os.path.join('honest', 'baseline_f0.5_s1'))
  # A finished run made with other settings is an error, not silently reused.
  config.num_epochs = 3
  with pytest.raises(ValueError, match='different config'):
    sweep.run_sweep(config, workdir)


def test_schedule_caps_steps_and_spreads_evaluations(data_dir):
  config = sweep_test_config(data_dir, num_epochs=50, max_steps_per_run=40,
                             evals_per_run=5, batch_size=16)
  # 20 images: 2 steps per epoch, 50 epochs = 100 steps > 40: cut to 20 epochs.
  assert sweep_plan.supervised_schedule(config, 20) == (20, 4)
  # 4 images: 1 step per epoch, 50 epochs = 50 steps: cut to 40 epochs.
  assert sweep_plan.supervised_schedule(config, 4) == (40, 8)
  # 300 images: 19 steps per epoch: 2 whole epochs fit in 40 steps.
  assert sweep_plan.supervised_schedule(config, 300) == (2, 1)
  # 1000 images: 63 steps per epoch, more than the cap: one epoch all the same.
  assert sweep_plan.supervised_schedule(config, 1000) == (1, 1)
  config.max_steps_per_run = None
  config.evals_per_run = None
  assert sweep_plan.supervised_schedule(config, 20) == (50, config.eval_every_epochs)
  assert sweep_plan.fraction_seeds(config, 'honest', 0.5) == (0, 1)
  assert sweep_plan.fraction_seeds(config, 'honest', 1.0) == (0,)
  assert sweep_plan.fraction_seeds(config, 'reference', 0.5) == (0,)


def test_verdict_compares_the_gain_with_the_seed_spread():
  assert sweep_report.simclr_verdict([0.50, 0.52, 0.54], [0.60, 0.61, 0.62])['verdict'] == (
      'SimCLR better, above spread')
  within = sweep_report.simclr_verdict([0.50, 0.55, 0.60], [0.52, 0.57, 0.62])
  assert within['verdict'] == 'within spread'
  assert math.isclose(within['gain'], 2.0) and math.isclose(within['spread'], 5.0)
  assert sweep_report.simclr_verdict([0.6, 0.61], [0.5, 0.51])['verdict'] == (
      'baseline better, above spread')
  assert sweep_report.simclr_verdict([0.5], [0.6])['spread'] is None


@pytest.mark.parametrize('overrides,needle', [
    (dict(protocols=('honest', 'leaky')), 'protocols'),
    (dict(fractions=(0.0, 0.5)), 'fractions'),
    (dict(seeds=()), 'seed'),
    (dict(max_steps_per_run=0), 'max_steps_per_run'),
])
def test_bad_sweep_config_is_one_clear_error(data_dir, overrides, needle):
  with pytest.raises(ValueError, match=needle):
    sweep_plan.check_sweep_config(sweep_test_config(data_dir, **overrides))


def test_presets_are_sweep_configs_and_runs_drop_sweep_fields():
  for preset in sweep_config.PRESETS:
    config = sweep_config.get_config(f'preset={preset}')
    assert config.mode == 'sweep'
    sweep_plan.check_sweep_config(config)
    run_config = sweep_plan.run_config(config, 'honest', 'baseline', seed=1, num_classes=4,
                                  fraction=0.1, num_labeled=400)
    assert not set(sweep_plan.SWEEP_FIELDS) & set(run_config)
    assert run_config.label_seed == 1 and run_config.split_scheme == 'subject'
  assert sweep_config.get_config().dataset == 'synthetic_mri'  # runlocal by default.
  with pytest.raises(ValueError, match='preset'):
    sweep_config.get_config('preset=gpu')


def test_tiny_real_sweep_trains_both_arms_and_reruns_nothing(data_dir, tmp_path,
                                                             monkeypatch):
  # Two pretraining epochs as test_train's pretraining: the same compiled step.
  config = sweep_test_config(data_dir, protocols=('honest',), fractions=(1.0,), seeds=(0,),
                             pretrain_num_epochs=2, num_epochs=1)
  workdir = str(tmp_path / 'sweep')
  summary = sweep.run_sweep(config, workdir)
  entry = summary['protocols']['honest']['fractions'][0]
  assert set(entry['arms']) == set(sweep_plan.ARMS)
  for arm in sweep_plan.ARMS:
    assert 0.0 <= entry['arms'][arm]['balanced_accuracy']['mean'] <= 1.0
  assert os.path.getsize(os.path.join(workdir, 'gradcam_grid.png')) > 0

  def fail(*args):
    raise AssertionError(f'finished run trained again: {args}')
  monkeypatch.setattr(sweep.train, 'train_and_evaluate', fail)
  sweep.run_sweep(config, workdir)  # Every run's config.json matches: all skipped.
