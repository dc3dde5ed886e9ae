"""Tests of the label-fraction sweep: plan, pooled reports, verdicts, reruns, one real run."""

import csv
import json
import os

import numpy as np
import pytest

from configs import sweep as sweep_config
from simclr_jax.data import arrays as arrays_lib
from simclr_jax.train import workdirs
from simclr_jax.data import splits as splits_lib
from simclr_jax.metrics import bootstrap
from simclr_jax.study import sweep
from simclr_jax.study import markdown as markdown_lib
from simclr_jax.study import plan as plan_lib
from simclr_jax.study import report as report_lib
from simclr_jax.study import results as results_lib
from simclr_jax.metrics import classification
from simclr_jax import run
from tests.conftest import tiny_config

SWEEP_OVERRIDES = dict(
    protocols=('honest', 'reference'), tasks=('four_class', 'binary'), num_folds=2,
    fractions=(0.5, 1.0), seeds=(0, 1), multi_seed_max_fraction=0.5, reference_seeds=(0,),
    pretrain_num_epochs=1, max_steps_per_run=None, evals_per_run=None, floor_image_size=16,
    cam_method='gradcam', cam_layer='stage3', bootstrap_samples=200)


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

  def __call__(self, config, workdir, cache=None):
    del cache  # A stand-in compiles nothing.
    self.calls.append((config, workdir))
    if config.mode == 'pretrain':
      result = {'mode': 'pretrain', 'fold': config.split.fold, 'knn1_accuracy': 0.5}
      workdirs.write_metrics(workdir, result)
      return result
    # The sweep pretrains the fold before it fine-tunes.
    assert workdirs.is_finished(config.finetune.pretrained_workdir) or config.mode == 'baseline'
    labels, class_names = arrays_lib.task_labels(self.arrays, config)
    splits = splits_lib.load_splits(config, self.arrays)
    test = splits['test']
    num_classes = len(class_names)
    rng = np.random.default_rng([config.seed, int(100 * config.labels.fraction), config.split.fold,
                                 config.labels.task == 'binary'])
    uniform, other = rng.uniform(size=len(test)), rng.integers(1, num_classes, len(test))
    predicted = np.where(uniform < self.right[config.mode], labels[test],
                         (labels[test] + other) % num_classes)
    probabilities = np.full((len(test), num_classes), 0.2 / num_classes, np.float32)
    probabilities[np.arange(len(test)), predicted] += 0.8
    predictions = classification.Predictions(np.asarray(test, np.int64),
                                       self.arrays.subject_ids[test], labels[test],
                                       probabilities)
    workdirs.write_predictions(workdir, predictions)
    result = classification.prediction_metrics(predictions, num_classes)
    train_idx = splits_lib.label_subset(self.arrays.labels, splits['train'],
                                        config.labels.fraction, config.labels.seed)
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
  """A sweep with training replaced by FakeTraining (both protocols by default)."""
  config = sweep_test_config(data_dir, **overrides)
  fake = FakeTraining(arrays_lib.load_arrays(config), right)
  monkeypatch.setattr(sweep.trainer, 'train_and_evaluate', fake)
  gradcam_calls = []
  monkeypatch.setattr(report_lib, 'write_gradcam_grid',
                      lambda *args: gradcam_calls.append(args))
  summary = run.run(config, workdir)
  return config, workdir, fake, summary, gradcam_calls


@pytest.fixture(scope='module')
def fake_sweep(data_dir, tmp_path_factory):
  with pytest.MonkeyPatch.context() as monkeypatch:  # Undone before the other tests.
    return run_fake_sweep(data_dir, str(tmp_path_factory.mktemp('sweep')), monkeypatch)


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


def test_sweep_writes_every_output_with_one_row_per_run(fake_sweep):
  config, workdir, fake, summary, gradcam_calls = fake_sweep
  for name in ('results.csv', 'results.md', 'sweep.json', 'config.json',
               'label_fraction_curve.png', 'confusion_matrices.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert len(gradcam_calls) == 1
  rows = read_rows(workdir)
  assert list(rows[0]) == list(results_lib.CSV_COLUMNS)
  keys = sorted((r['protocol'], r['task'], r['fold'], r['arm'], float(r['fraction']),
                 int(r['seed'])) for r in run_rows(rows))
  honest_cells = ((0.5, 0), (0.5, 1), (1.0, 0))  # Seed 1 only up to 50 %.
  expected = sorted(
      [('honest', task, str(fold), arm, f, s) for task in config.sweep.tasks for fold in (0, 1)
       for arm in plan_lib.ARMS for f, s in honest_cells]
      + [('reference', task, '', arm, f, 0) for task in config.sweep.tasks
         for arm in plan_lib.ARMS for f in (0.5, 1.0)])
  assert keys == expected
  # One pooled row per honest (task, arm, fraction, seed); the reference has one split.
  assert sorted((r['protocol'], r['task'], r['arm'], float(r['fraction']), int(r['seed']))
                for r in pooled_rows(rows)) == sorted(
      ('honest', task, arm, f, s) for task in config.sweep.tasks for arm in plan_lib.ARMS
      for f, s in honest_cells)
  # Pretraining once per fold (2 honest + 1 reference), then 2 arms x 2 tasks x
  # (2 folds x 3 honest + 2 reference) runs.
  modes = [c.mode for c, _ in fake.calls]
  assert modes.count('pretrain') == 3 and len(modes) == 3 + 2 * 2 * (2 * 3 + 2)
  markdown = read_text(workdir, 'results.md')
  for needle in ('## Protocol `honest`', '## Protocol `reference`', '### `honest`, task '
                 '`binary`', 'raw-pixel 1-NN', '50 % (', 'SimCLR − baseline',
                 'baseline − raw-pixel 1-NN', 'per subject', 'Balanced accuracy per fold',
                 'inflation', plan_lib.REFERENCE_DIFFERENCES,
                 plan_lib.PROTOCOL_DESCRIPTIONS['honest'][1:],
                 '](label_fraction_curve.png)', '](confusion_matrices.png)', 'Wall time'):
    assert needle in markdown, needle
  # It opens with the three-sentence answer, generated from the numbers.
  assert markdown.splitlines()[2] == '**Answer.** ' + ' '.join(summary['answer'])
  assert len(summary['answer']) == 3
  entry = summary['protocols']['honest']['tasks']['four_class']['fractions'][0]
  assert entry['arms']['baseline']['seeds'] == [0, 1]  # Two seeds at 50 %.
  with open(os.path.join(workdir, 'sweep.json')) as f:
    assert json.load(f)['num_runs'] == {
        'finished': 3 + 12 * 3 + 4 * 3, 'planned': 3 + 12 * 3 + 4 * 3,
        'floor_finished': 16, 'baseline_finished': 16, 'finetune_finished': 16,
        'pretrain_finished': 3}


def test_label_subsets_are_nested_and_floor_scores_are_probabilities(fake_sweep):
  config, workdir, _, _, _ = fake_sweep
  rows = read_rows(workdir)
  for r in run_rows(rows):
    if float(r['fraction']) == 0.5 and r['seed'] == '0':
      full = next(o for o in run_rows(rows) if float(o['fraction']) == 1.0 and
                  all(o[k] == r[k] for k in ('protocol', 'task', 'fold', 'arm')))
      assert int(r['num_labeled']) < int(full['num_labeled'])
  arrays = arrays_lib.load_arrays(config)
  for fold in (0, 1):
    train = plan_lib.protocol_splits(config, 'honest', arrays, fold)['train']
    half, full = (set(splits_lib.label_subset(arrays.labels, train, f, 0)) for f in (0.5, 1.0))
    assert half < full
  for r in run_rows(rows):
    if r['arm'] == 'floor':
      for metric in plan_lib.METRICS:
        assert 0.0 <= float(r[metric]) <= 1.0
  floor = classification.Predictions.load(workdirs.predictions_path(
      os.path.join(workdir, 'honest', 'binary', 'fold0', 'floor_f0.5_s0')))
  np.testing.assert_array_equal(floor.probabilities.sum(1), 1.0)
  assert set(np.unique(floor.probabilities)) <= {0.0, 1.0}
  # The slice split leaks near-identical slices: the floor is far higher there.
  mean_floor = {p: np.mean([float(r['accuracy']) for r in run_rows(rows) if r['protocol'] == p
                            and r['arm'] == 'floor' and float(r['fraction']) == 1.0])
                for p in ('honest', 'reference')}
  assert mean_floor['reference'] > mean_floor['honest'] + 0.2


def test_pooled_rows_join_the_folds_and_hold_every_subject_once(fake_sweep):
  config, workdir, _, summary, _ = fake_sweep
  arrays = arrays_lib.load_arrays(config)
  num_subjects = len(np.unique(arrays.subject_ids))
  rows = read_rows(workdir)
  for pooled in pooled_rows(rows):
    folds = [r for r in run_rows(rows) if all(
        r[k] == pooled[k] for k in ('protocol', 'task', 'arm', 'fraction', 'seed'))]
    assert sorted(r['fold'] for r in folds) == ['0', '1'] and pooled['folds_pooled'] == '2'
    assert int(pooled['num_test_subjects']) == num_subjects
    assert int(pooled['num_test_slices']) == sum(int(r['num_test_slices']) for r in folds)
    assert int(pooled['num_test_slices']) == len(arrays.labels)
  # Every subject in exactly one fold's test predictions; the pooled metrics are theirs.
  run_dir = os.path.join(workdir, 'honest', 'four_class', 'fold{}', 'baseline_f0.5_s1')
  parts = [classification.Predictions.load(workdirs.predictions_path(run_dir.format(k))) for k in (0, 1)]
  assert not set(parts[0].subject_ids) & set(parts[1].subject_ids)
  joined = results_lib._concatenate(parts)  # pylint: disable=protected-access
  expected = classification.prediction_metrics(joined, 4)
  row = next(r for r in pooled_rows(rows) if r['task'] == 'four_class' and
             r['arm'] == 'baseline' and float(r['fraction']) == 0.5 and r['seed'] == '1')
  assert float(row['balanced_accuracy']) == pytest.approx(expected['balanced_accuracy'])
  assert float(row['subject_accuracy']) == pytest.approx(expected['subject']['accuracy'])
  # The aggregates average the seeds' pooled scores and bootstrap over all subjects.
  arm = summary['protocols']['honest']['tasks']['four_class']['fractions'][0]['arms'][
      'baseline']
  assert arm['num_subjects'] == num_subjects and arm['folds_pooled'] == 2
  seeds = [float(r['subject_balanced_accuracy']) for r in pooled_rows(rows)
           if r['task'] == 'four_class' and r['arm'] == 'baseline'
           and float(r['fraction']) == 0.5]
  assert arm['subject']['balanced_accuracy']['value'] == pytest.approx(np.mean(seeds))
  assert (arm['subject']['balanced_accuracy']['low'] <= arm['subject']['balanced_accuracy'][
      'value'] <= arm['subject']['balanced_accuracy']['high'])


def test_verdicts_in_results_md_follow_the_intervals(fake_sweep):
  _, workdir, _, summary, _ = fake_sweep
  markdown = read_text(workdir, 'results.md')
  seen = set()
  for protocol in summary['protocols'].values():
    for task in protocol['tasks'].values():
      for entry in task['fractions']:
        for comparison in entry['comparisons'].values():
          for level in bootstrap.LEVELS:
            for value in comparison[level].values():
              seen.add(value['outcome'])
              assert value['outcome'] == ('ahead' if value['low'] > 0 else 'behind'
                                          if value['high'] < 0 else
                                          'no difference detectable')
          verdict = comparison['verdict']['subject']
          if comparison['a'] == 'finetune' and comparison['b'] == 'baseline':
            assert verdict in markdown
          outcome = comparison['subject']['balanced_accuracy']['outcome']
          assert ('is ahead of' in verdict) == (outcome == 'ahead')
          assert ('is behind' in verdict) == (outcome == 'behind')
          assert ('no difference detectable at this sample size: the interval is ['
                  in verdict) == (outcome == 'no difference detectable')
  assert 'ahead' in seen  # The fake arms beat the floor's random answers somewhere.


@pytest.mark.parametrize('right,opening,outcome', [
    ({'finetune': 1.0, 'baseline': 0.0}, 'Yes: with few labels', 'ahead'),
    ({'finetune': 0.0, 'baseline': 1.0}, 'No, the reverse: with few labels', 'behind'),
    ({'finetune': 0.6, 'baseline': 0.6}, 'Not detectably: with few labels',
     'no difference detectable'),
])
def test_the_answer_follows_the_intervals_at_few_labels(data_dir, tmp_path, monkeypatch,
                                                        right, opening, outcome):
  config, workdir, _, summary, _ = run_fake_sweep(
      data_dir, str(tmp_path), monkeypatch, right, protocols=('honest',),
      tasks=('four_class',), fractions=(0.1, 1.0), seeds=(0,))
  entry = summary['protocols']['honest']['tasks']['four_class']['fractions'][0]
  comparison = entry['comparisons']['finetune-baseline']
  assert entry['fraction'] == 0.1
  assert comparison['subject']['balanced_accuracy']['outcome'] == outcome
  answer = read_text(workdir, 'results.md').splitlines()[2]
  assert answer.startswith('**Answer.** ' + opening)
  assert '(10 %; four-class task)' in answer and 'four-class 100 %' not in answer
  low, high = (comparison['subject']['balanced_accuracy'][k] for k in ('low', 'high'))
  assert f'four-class 10 %: [{low:+.1f}, {high:+.1f}]' in answer
  assert 'the reference protocol was not run' in answer


def test_run_configs_follow_the_protocols_tasks_folds_and_seeds(fake_sweep):
  _, workdir, fake, _, _ = fake_sweep
  for config, run_dir in fake.calls:
    parts = os.path.relpath(run_dir, workdir).split(os.sep)
    protocol = parts[0]
    for key, value in plan_lib.PROTOCOLS[protocol].items():
      assert config[key] == value
    assert 'fractions' not in config and 'protocols' not in config
    folds = [int(p[len('fold'):]) for p in parts if p.startswith('fold')]
    assert config.split.fold == (folds[0] if folds else 0)
    fold_dir = [f'fold{folds[0]}'] if folds else []
    if config.mode == 'pretrain':
      assert parts == [protocol, *fold_dir, 'pretrain']
      continue
    assert parts[1] == config.labels.task and config.labels.task in ('four_class', 'binary')
    assert config.model.num_classes == (4 if config.labels.task == 'four_class' else 2)
    if config.mode == 'finetune':
      assert config.finetune.pretrained_workdir == os.path.join(workdir, protocol, *fold_dir,
                                                       'pretrain')
    assert config.labels.seed == config.seed
    assert parts[-1] == f'{config.mode}_f{config.labels.fraction:g}_s{config.seed}'


def test_rerun_skips_finished_runs_and_completes_unfinished_ones(data_dir, tmp_path,
                                                                monkeypatch):
  config, workdir, fake, _, _ = run_fake_sweep(data_dir, str(tmp_path), monkeypatch,
                                               protocols=('honest',), tasks=('binary',))
  before = read_rows(workdir)
  num_calls = len(fake.calls)
  run.run(config, workdir)
  assert len(fake.calls) == num_calls
  assert read_rows(workdir) == before
  # An interrupted run (no metrics.json) is run again, and only it.
  interrupted = os.path.join(workdir, 'honest', 'binary', 'fold1', 'baseline_f0.5_s1')
  os.remove(os.path.join(interrupted, 'metrics.json'))
  # Meanwhile the reports cover the finished runs: one fold pooled for that cell.
  arrays = arrays_lib.load_arrays(config)
  planned = plan_lib.plan_runs(config, workdir, arrays)
  summary = report_lib.write_reports(config, workdir, planned, arrays, figures=False)
  arm = summary['protocols']['honest']['tasks']['binary']['fractions'][0]['arms']['baseline']
  assert arm['seeds'] == [0, 1] and arm['folds_pooled'] == 1 and arm['folds_planned'] == 2
  assert 'baseline (1 of 2 folds)' in read_text(workdir, 'results.md')
  assert len(run_rows(read_rows(workdir))) == len(run_rows(before)) - 1
  run.run(config, workdir)
  assert len(fake.calls) == num_calls + 1
  assert fake.calls[-1][1] == interrupted
  assert len(read_rows(workdir)) == len(before)
  # A finished run made with other settings is an error, not silently reused.
  config.train.num_epochs = 3
  with pytest.raises(ValueError, match='different config'):
    run.run(config, workdir)


def test_schedule_caps_steps_and_spreads_evaluations(data_dir):
  config = sweep_test_config(data_dir, num_epochs=50, max_steps_per_run=40,
                             evals_per_run=5, batch_size=16)
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
  assert plan_lib.fraction_seeds(config, 'honest', 0.5) == (0, 1)
  assert plan_lib.fraction_seeds(config, 'honest', 1.0) == (0,)
  assert plan_lib.fraction_seeds(config, 'reference', 0.5) == (0,)


def test_reference_tasks_narrow_only_the_reference_protocol(data_dir, tmp_path):
  config = sweep_test_config(data_dir, reference_tasks=('four_class',))
  arrays = arrays_lib.load_arrays(config)
  planned = plan_lib.plan_runs(config, str(tmp_path), arrays)
  tasks = lambda protocol: {r.task for r in planned if r.protocol == protocol and r.task}
  assert tasks('honest') == {'four_class', 'binary'}
  assert tasks('reference') == {'four_class'}
  # The runs it keeps are the ones the full plan has, with the same configs.
  config.sweep.reference_tasks = None
  full = {r.workdir: r.config for r in plan_lib.plan_runs(config, str(tmp_path), arrays)}
  assert len(full) > len(planned)
  for run in planned:
    assert run.config == full[run.workdir]
  config.sweep.reference_tasks = ('four_class',)
  text = markdown_lib.results_markdown(
      {'answer': [], 'bootstrap_samples': 10, 'bootstrap_seed': 0,
       'inflation': [],
       'protocols': {'reference': {'description': 'x', 'num_folds': None, 'tasks': {}}}},
      config)
  assert 'Left out under this protocol: the binary task' in text


@pytest.mark.parametrize('overrides,needle', [
    (dict(protocols=('honest', 'leaky')), 'protocols'),
    (dict(fractions=(0.0, 0.5)), 'fractions'),
    (dict(seeds=()), 'seed'),
    (dict(max_steps_per_run=0), 'max_steps_per_run'),
    (dict(tasks=('binary',), reference_tasks=('four_class',)), 'reference_tasks'),
])
def test_bad_sweep_config_is_one_clear_error(data_dir, overrides, needle):
  with pytest.raises(ValueError, match=needle):
    run.check_config(sweep_test_config(data_dir, **overrides))


def test_presets_are_sweep_configs_and_runs_drop_sweep_fields():
  for preset in sweep_config.PRESETS:
    config = sweep_config.get_config(f'preset={preset}')
    assert config.mode == 'sweep'
    run.check_config(config)
    run_config = plan_lib.run_config(config, 'honest', 'baseline', seed=1, num_classes=4,
                                       fraction=0.1, num_labeled=400)
    assert not set(plan_lib.SWEEP_SECTIONS) & set(run_config)
    assert run_config.labels.seed == 1 and run_config.split.scheme == 'subject'
  assert sweep_config.get_config().data.name == 'synthetic_mri'  # runlocal by default.
  with pytest.raises(ValueError, match='preset'):
    sweep_config.get_config('preset=gpu')


def test_tiny_real_sweep_trains_every_arm_and_reruns_nothing(data_dir, tmp_path,
                                                             monkeypatch):
  # Two pretraining epochs as test_train's pretraining: the same compiled step.
  config = sweep_test_config(data_dir, protocols=('honest',), tasks=('four_class',),
                             fractions=(1.0,), seeds=(0,), pretrain_num_epochs=2,
                             num_epochs=1)
  workdir = str(tmp_path / 'sweep')
  summary = run.run(config, workdir)
  entry = summary['protocols']['honest']['tasks']['four_class']['fractions'][0]
  assert set(entry['arms']) == set(plan_lib.ARMS)
  for arm in plan_lib.ARMS:
    assert entry['arms'][arm]['folds_pooled'] == 2
    for level in bootstrap.LEVELS:
      assert 0.0 <= entry['arms'][arm][level]['balanced_accuracy']['value'] <= 1.0
  assert os.path.getsize(os.path.join(workdir, 'gradcam_grid.png')) > 0
  assert '](gradcam_grid.png)' in read_text(workdir, 'results.md')

  def fail(*args):
    raise AssertionError(f'finished run trained again: {args}')
  monkeypatch.setattr(sweep.trainer, 'train_and_evaluate', fail)
  run.run(config, workdir)  # Every run's config.json matches: all skipped.
