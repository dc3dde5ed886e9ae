"""Tests of the label-budget sweep: pooled reports, caps, reruns, configs, one real run."""

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
from simclr_jax.study import records as records_lib
from simclr_jax.study import report as report_lib
from simclr_jax.study import results as results_lib
from simclr_jax.study import rows as rows_lib
from simclr_jax.study import tables as tables_lib
from simclr_jax.metrics import classification
from simclr_jax import run
from tests.fake_sweep import is_all
from tests.fake_sweep import NUM_CLASSES
from tests.fake_sweep import pooled_rows
from tests.fake_sweep import read_rows
from tests.fake_sweep import read_text
from tests.fake_sweep import run_fake_sweep
from tests.fake_sweep import run_rows
from tests.fake_sweep import sweep_test_config


def test_sweep_writes_every_output_with_one_row_per_run(fake_sweep):
  config, workdir, fake, summary, gradcam_calls = fake_sweep
  for name in ('results.csv', 'results.md', 'sweep.json', 'config.json', 'predictions.npz',
               'label_fraction_curve.png', 'confusion_matrices.png', 'pretraining_curves.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert len(gradcam_calls) == 1
  rows = read_rows(workdir)
  assert list(rows[0]) == list(rows_lib.CSV_COLUMNS)
  tasks = config.sweep.tasks
  keys = sorted((r['protocol'], r['task'], r['fold'], r['arm'], r['budget'], r['budget_unit'],
                 r['budget_size'], int(r['seed'])) for r in run_rows(rows))
  # Seed 1 only up to 4 subjects; the budgets of honest and of the two slice-split
  # protocols between it and the reference (one split each) are subjects.
  honest_cells = (('4 subjects', '4', 0), ('4 subjects', '4', 1), ('all subjects', '0', 0))
  between = ('slice_split', 'slice_split_transductive')
  expected = sorted(
      [('honest', task, str(fold), arm, label, 'subject', size, s) for task in tasks
       for fold in (0, 1) for arm in plan_lib.ARMS for label, size, s in honest_cells]
      + [(protocol, task, '', arm, label, 'subject', size, s) for protocol in between
         for task in tasks for arm in plan_lib.ARMS for label, size, s in honest_cells]
      + [('reference', task, '', arm, label, 'slice', size, 0) for task in tasks
         for arm in plan_lib.ARMS for label, size in (('50 %', '0.5'), ('100 %', '1.0'))])
  assert keys == expected
  # One pooled row per honest (task, arm, budget, seed); the reference has one split.
  assert sorted((r['protocol'], r['task'], r['arm'], r['budget'], int(r['seed']))
                for r in pooled_rows(rows)) == sorted(
      ('honest', task, arm, label, s) for task in tasks for arm in plan_lib.ARMS
      for label, _, s in honest_cells)
  for r in run_rows(rows):  # A subject budget: k subjects with all their training slices:
    if r['budget'] == '4 subjects':  # all 8 under subject folds, fewer under a slice split.
      assert r['num_labeled_subjects'] == '4'
      assert (int(r['num_labeled']) == 4 * 8 if r['protocol'] == 'honest' else
              4 <= int(r['num_labeled']) < 4 * 8)
  # Pretraining once per fold (2 honest + 1 for each other protocol), then 3 arms
  # (baseline, finetune, probe) x 3 tasks x (2 folds x 3 honest + 2 x 3 between + 2
  # reference) runs.
  modes = [c.mode for c, _ in fake.calls]
  assert modes.count('pretrain') == 5 and len(modes) == 5 + 3 * 3 * (2 * 3 + 2 * 3 + 2)
  assert sum(c.mode == 'finetune' and c.finetune.linear_probe for c, _ in fake.calls) == 3 * 14
  markdown = read_text(workdir, 'results.md')
  for needle in ('## Protocol `honest`', '## Protocol `reference`', '## Protocol `slice_split`',
                 plan_lib.PROTOCOL_DESCRIPTIONS['slice_split_transductive'][1:],
                 'Label budgets: 4 subjects and all subjects (training subjects, each',
                 '### `honest`, task '
                 '`binary`', '### `honest`, task `three_class` (3 classes)', 'raw-pixel 1-NN',
                 '50 % (', '4 subjects (32 slices per fold)', 'all subjects (',
                 'Label budgets: 4 subjects and all subjects (training subjects per fold',
                 'Label budgets: 50 % and 100 % of the training slices', 'Sainte-Laguë',
                 'SimCLR − baseline', 'baseline − raw-pixel 1-NN', 'per subject',
                 'SimCLR linear probe − baseline',
                 'Balanced accuracy per fold', 'Inflation', 'all (all subjects / 100 %)',
                 plan_lib.REFERENCE_DIFFERENCES, plan_lib.PROTOCOL_DESCRIPTIONS['honest'][1:],
                 '](label_fraction_curve.png)', '](confusion_matrices.png)', 'Wall time',
                 '](pretraining_curves.png)', '#### Discrimination and calibration',
                 '#### Seed spread', '## Primary endpoint: SimCLR − baseline',
                 '## Positive control', '| primary |', '| positive control |',
                 '| exploratory |'):
    assert needle in markdown, needle
  # It states the primary endpoint, then opens with the answer generated from the numbers.
  lines = markdown.splitlines()
  assert lines[2].startswith('**Primary endpoint** (pre-registered')
  assert lines[4] == '**Answer.** ' + ' '.join(summary['answer'])
  assert 'detectabl' not in markdown  # Never the bare "not detectably different".
  entry = summary['protocols']['honest']['tasks']['binary']['budgets'][0]
  assert summary['primary']['cells'][0]['difference'] == (
      entry['comparisons']['finetune-baseline']['subject']['balanced_accuracy'])
  entry = summary['protocols']['honest']['tasks']['four_class']['budgets'][0]
  assert entry['budget'] == {'unit': 'subject', 'size': 4, 'label': '4 subjects'}
  assert entry['arms']['baseline']['seeds'] == [0, 1]  # Two seeds at 4 subjects.
  with open(os.path.join(workdir, 'sweep.json')) as f:
    num_runs = 4 * 14 * len(tasks)
    assert json.load(f)['num_runs'] == {
        'finished': 5 + num_runs, 'planned': 5 + num_runs, 'floor_finished': num_runs // 4,
        'baseline_finished': num_runs // 4, 'finetune_finished': num_runs // 4,
        'probe_finished': num_runs // 4, 'pretrain_finished': 5}


def test_reports_state_the_cap_of_classes_never_validated(fake_sweep):
  _, workdir, _, summary, _ = fake_sweep
  tasks = summary['protocols']['honest']['tasks']
  # The small synthetic set's 3 Mild and 2 Moderate subjects leave a fold's training
  # split too few of either for a validation subject: selection never scores them.
  assert tasks['four_class']['cap'] == {
      'classes': ['Mild_Demented', 'Moderate_Demented'], 'subjects': [3, 2],
      'max_balanced_accuracy': 0.5}
  assert tasks['three_class']['cap'] == {
      'classes': ['Mild_or_Moderate_Demented'], 'subjects': [5],
      'max_balanced_accuracy': pytest.approx(2 / 3)}
  assert tasks['binary']['cap'] is None
  assert summary['protocols']['reference']['tasks']['four_class']['cap'] is None
  markdown = read_text(workdir, 'results.md')
  section = markdown.split('### `honest`, task `four_class`')[1].split('###')[0]
  assert ('Cap: Mild_Demented and Moderate_Demented (3 and 2 subjects each) are never in a '
          'fold\'s validation split' in section)
  assert ('pooled four_class balanced accuracy (the mean of the 4 class recalls) is capped '
          'at 50 %.' in section)
  assert markdown.count('Cap: ') == 2  # four_class and three_class, honest only.
  assert 'The honest four_class scores are capped at 50 % balanced accuracy' in markdown
  assert 'capped' not in ' '.join(summary['answer'])  # The primary task, binary, has no cap.


def test_the_cap_of_the_kaggle_datas_four_classes_is_75_percent():
  """The Kaggle data: Moderate_Demented's 2 subjects are in no fold's validation split."""
  names = ['Mild_Demented', 'Moderate_Demented', 'Non_Demented', 'Very_Mild_Demented']
  missing = {'missing': ['Moderate_Demented'], 'num_runs': 10}
  entry = {'class_names': names, 'subjects_per_class': [28, 2, 100, 70],
           'selection': {'num_trained_runs': 10, 'missing': [missing]}}
  cap = results_lib._balanced_accuracy_cap(entry, 5)  # pylint: disable=protected-access
  assert cap == {'classes': ['Moderate_Demented'], 'subjects': [2],
                 'max_balanced_accuracy': 0.75}
  assert tables_lib.cap_note('four_class', cap, 4) == (
      'Cap: Moderate_Demented (2 subjects) is never in a fold\'s validation split, so model '
      'selection never scores it and training sees at most a few of its subjects; where its '
      'test subjects are all missed, pooled four_class balanced accuracy (the mean of the 4 '
      'class recalls) is capped at 75 %.')
  missing['num_runs'] = 9  # Validated somewhere: no cap.
  assert results_lib._balanced_accuracy_cap(entry, 5) is None  # pylint: disable=protected-access
  assert results_lib._balanced_accuracy_cap(entry, None) is None  # pylint: disable=protected-access


def test_label_subsets_are_nested_and_floor_scores_are_probabilities(fake_sweep):
  config, workdir, _, _, _ = fake_sweep
  rows = read_rows(workdir)
  for r in run_rows(rows):
    if r['budget'] in ('4 subjects', '50 %') and r['seed'] == '0':
      full = next(o for o in run_rows(rows) if is_all(o) and
                  all(o[k] == r[k] for k in ('protocol', 'task', 'fold', 'arm')))
      assert int(r['num_labeled']) < int(full['num_labeled'])
      if r['budget_unit'] == 'subject':  # 50 % of the slices still has every subject.
        assert int(r['num_labeled_subjects']) < int(full['num_labeled_subjects'])
  arrays = arrays_lib.load_arrays(config)
  for fold in (0, 1):
    train = plan_lib.protocol_splits(config, 'honest', arrays, fold)['train']
    few, every = (set(splits_lib.budget_subset(arrays, train, splits_lib.Budget('subject', k), 0))
                  for k in (4, 0))
    assert few < every and every == set(train)
  for r in run_rows(rows):
    if r['arm'] == 'floor':
      for metric in plan_lib.METRICS:
        assert 0.0 <= float(r[metric]) <= 1.0
  floor = classification.Predictions.load(workdirs.predictions_path(
      os.path.join(workdir, 'honest', 'binary', 'fold0', 'floor_k4_s0')))
  np.testing.assert_array_equal(floor.probabilities.sum(1), 1.0)
  assert set(np.unique(floor.probabilities)) <= {0.0, 1.0}
  # The slice split leaks near-identical slices: the floor is far higher there.
  mean_floor = {p: np.mean([float(r['accuracy']) for r in run_rows(rows) if r['protocol'] == p
                            and r['arm'] == 'floor' and is_all(r)])
                for p in ('honest', 'reference')}
  assert mean_floor['reference'] > mean_floor['honest'] + 0.2


def test_pooled_rows_join_the_folds_and_hold_every_subject_once(fake_sweep):
  config, workdir, _, summary, _ = fake_sweep
  arrays = arrays_lib.load_arrays(config)
  num_subjects = len(np.unique(arrays.subject_ids))
  rows = read_rows(workdir)
  for pooled in pooled_rows(rows):
    folds = [r for r in run_rows(rows) if all(
        r[k] == pooled[k] for k in ('protocol', 'task', 'arm', 'budget', 'seed'))]
    assert sorted(r['fold'] for r in folds) == ['0', '1'] and pooled['folds_pooled'] == '2'
    assert int(pooled['num_test_subjects']) == num_subjects
    assert int(pooled['num_test_slices']) == sum(int(r['num_test_slices']) for r in folds)
    assert int(pooled['num_test_slices']) == len(arrays.labels)
  # Every subject in exactly one fold's test predictions; the pooled metrics are theirs.
  run_dir = os.path.join(workdir, 'honest', 'four_class', 'fold{}', 'baseline_k4_s1')
  parts = [classification.Predictions.load(workdirs.predictions_path(run_dir.format(k))) for k in (0, 1)]
  assert not set(parts[0].subject_ids) & set(parts[1].subject_ids)
  joined = rows_lib._concatenate(parts)  # pylint: disable=protected-access
  expected = classification.prediction_metrics(joined, 4)
  row = next(r for r in pooled_rows(rows) if r['task'] == 'four_class' and
             r['arm'] == 'baseline' and r['budget'] == '4 subjects' and r['seed'] == '1')
  assert float(row['balanced_accuracy']) == pytest.approx(expected['balanced_accuracy'])
  assert float(row['subject_accuracy']) == pytest.approx(expected['subject']['accuracy'])
  # The aggregates average the seeds' pooled scores and bootstrap over all subjects.
  arm = summary['protocols']['honest']['tasks']['four_class']['budgets'][0]['arms'][
      'baseline']
  assert arm['num_subjects'] == num_subjects and arm['folds_pooled'] == 2
  seeds = [float(r['subject_balanced_accuracy']) for r in pooled_rows(rows)
           if r['task'] == 'four_class' and r['arm'] == 'baseline'
           and r['budget'] == '4 subjects']
  assert arm['subject']['balanced_accuracy']['value'] == pytest.approx(np.mean(seeds))
  assert (arm['subject']['balanced_accuracy']['low'] <= arm['subject']['balanced_accuracy'][
      'value'] <= arm['subject']['balanced_accuracy']['high'])


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
    assert parts[1] == config.labels.task and config.labels.task in NUM_CLASSES
    assert config.model.num_classes == NUM_CLASSES[config.labels.task]
    if config.mode == 'finetune':
      assert config.finetune.pretrained_workdir == os.path.join(workdir, protocol, *fold_dir,
                                                       'pretrain')
    assert config.labels.seed == config.seed
    # Reference runs label a fraction of the slices, the other protocols subjects.
    assert config.labels.unit == ('slice' if protocol == 'reference' else 'subject')
    budget = splits_lib.Budget.of_labels(config.labels)
    arm = 'probe' if config.finetune.linear_probe else config.mode
    assert arm == 'probe' or (config.mode == 'finetune') == (arm == 'finetune')
    assert parts[-1] == f'{arm}_{budget.name}_s{config.seed}'


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
  interrupted = os.path.join(workdir, 'honest', 'binary', 'fold1', 'baseline_k4_s1')
  os.remove(os.path.join(interrupted, 'metrics.json'))
  # Meanwhile the reports cover the finished runs: one fold pooled for that cell.
  arrays = arrays_lib.load_arrays(config)
  planned = plan_lib.plan_runs(config, workdir, arrays)
  summary = report_lib.write_reports(config, workdir, planned, arrays, figures=False)
  arm = summary['protocols']['honest']['tasks']['binary']['budgets'][0]['arms']['baseline']
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


def test_grouped_sweep_trains_each_cells_folds_together_with_the_same_results(
    data_dir, tmp_path, monkeypatch):
  overrides = dict(protocols=('honest', 'reference'), tasks=('binary',))
  _, alone_dir, alone, _, _ = run_fake_sweep(data_dir, str(tmp_path / 'alone'), monkeypatch,
                                             **overrides)
  config, workdir, fake, _, _ = run_fake_sweep(data_dir, str(tmp_path / 'grouped'),
                                               monkeypatch, **{'sweep.group_runs': 10},
                                               **overrides)
  assert not alone.groups  # group_runs=1 (the default): one run at a time, in plan order.
  # Honest: 2 folds' pretrainings, then each cell's 2 folds x 2 arms, and its 2 folds'
  # linear probes (another program); the reference protocol's single split: its
  # pretraining alone, then each fraction's 2 arms, and its probe alone.
  names = [[os.path.relpath(w, workdir) for w in group] for group in fake.groups]
  assert names[0] == ['honest/fold0/pretrain', 'honest/fold1/pretrain']
  assert ['honest/binary/fold0/baseline_k4_s1', 'honest/binary/fold0/finetune_k4_s1',
          'honest/binary/fold1/baseline_k4_s1', 'honest/binary/fold1/finetune_k4_s1'] in names
  assert ['honest/binary/fold0/probe_k4_s1', 'honest/binary/fold1/probe_k4_s1'] in names
  assert ['reference/binary/baseline_f0.5_s0', 'reference/binary/finetune_f0.5_s0'] in names
  assert len(names) == 1 + 3 * 2 + 2 and sum(map(len, names)) + 3 == len(alone.calls)
  # Groups of one went through train_and_evaluate.
  assert [os.path.relpath(w, workdir) for _, w in fake.calls
          if w not in sum(fake.groups, [])] == [
              'reference/pretrain', 'reference/binary/probe_f0.5_s0',
              'reference/binary/probe_f1_s0']

  def strip(rows):  # A grouped run's wall time is its share of its group's.
    return [{k: v for k, v in r.items() if k != 'wall_seconds'} for r in rows]
  assert strip(read_rows(workdir)) == strip(read_rows(alone_dir))
  # Rerun: every group finished, nothing trains.
  run.run(config, workdir)
  assert len(fake.groups) == 9 and len(fake.calls) == len(alone.calls)


def test_reference_tasks_narrow_only_the_reference_protocol(data_dir, tmp_path):
  config = sweep_test_config(data_dir, reference_tasks=('four_class',))
  arrays = arrays_lib.load_arrays(config)
  planned = plan_lib.plan_runs(config, str(tmp_path), arrays)
  tasks = lambda protocol: {r.task for r in planned if r.protocol == protocol and r.task}
  assert tasks('honest') == set(config.sweep.tasks)
  assert tasks('reference') == {'four_class'}
  # The runs it keeps are the ones the full plan has, with the same configs.
  config.sweep.reference_tasks = None
  full = {r.workdir: r.config for r in plan_lib.plan_runs(config, str(tmp_path), arrays)}
  assert len(full) > len(planned)
  for planned_run in planned:
    assert planned_run.config == full[planned_run.workdir]
  config.sweep.reference_tasks = ('four_class',)
  summary = results_lib.aggregate(config, [], [])  # No run finished yet.
  summary['answer'] = markdown_lib.answer_sentences(summary, config)
  text = markdown_lib.results_markdown(summary, config)
  assert 'Left out under this protocol: the binary and three_class tasks' in text
  # The positive control: the reference protocol's first task where it has not the primary.
  assert summary['positive_control']['task'] == 'four_class'
  assert summary['answer'][0].startswith('The positive control has not finished')
  assert 'Not answered yet' in summary['answer'][1]


@pytest.mark.parametrize('overrides,needle', [
    (dict(protocols=('honest', 'leaky')), 'protocols'),
    (dict(fractions=(0.0, 0.5)), 'fractions'),
    (dict(seeds=()), 'seed'),
    (dict(max_steps_per_run=0), 'max_steps_per_run'),
    (dict(tasks=('binary',), reference_tasks=('four_class',)), 'reference_tasks'),
    ({'sweep.label_unit': 'people'}, 'label_unit'),
    ({'sweep.group_runs': 0}, 'group_runs'),
    ({'sweep.group_arms': ('pretrain', 'teacher')}, 'group_arms'),
    ({'sweep.run_devices': -1}, 'run_devices'),
    ({'sweep.subject_budgets': (8, -4)}, 'subject_budgets'),
    ({'sweep.equivalence_margin': -1.0}, 'equivalence_margin'),
    ({'sweep.primary.metric': 'auc'}, 'primary.metric'),
    ({'sweep.primary.comparison': 'baseline-finetune'}, 'primary.comparison'),
    ({'sweep.primary.task': 'three_class', 'sweep.primary.metric': 'sensitivity'},
     'needs the binary task'),
    ({'sweep.primary.max_fraction': 0.0}, 'max_fraction'),
])
def test_bad_sweep_config_is_one_clear_error(data_dir, overrides, needle):
  with pytest.raises(ValueError, match=needle):
    run.check_config(sweep_test_config(data_dir, **overrides))


def test_presets_are_sweep_configs_and_runs_drop_sweep_fields():
  for preset in sweep_config.PRESETS:
    config = sweep_config.get_config(f'preset={preset}')
    assert config.mode == 'sweep'
    run.check_config(config)
    assert config.sweep.tasks[0] == 'binary' and 'three_class' in config.sweep.tasks
    budget = plan_lib.protocol_budgets(config, 'honest')[0]
    assert budget.unit == 'subject'
    assert plan_lib.protocol_budgets(config, 'reference')[0].unit == 'slice'
    run_config = plan_lib.run_config(config, 'honest', 'baseline', seed=1, num_classes=2,
                                     budget=budget, num_labeled=400, task='binary')
    assert not set(plan_lib.SWEEP_SECTIONS) & set(run_config)
    assert run_config.labels.seed == 1 and run_config.split.scheme == 'subject'
    assert run_config.labels.unit == 'subject' and run_config.labels.subjects == budget.size
    run.check_config(run_config)
  assert sweep_config.get_config().data.name == 'synthetic_mri'  # runlocal by default.
  # A bare preset name, as `configs/pretrain.py:runlocal` takes it.
  assert sweep_config.get_config('cpu,dtype=bfloat16') == sweep_config.get_config(
      'preset=cpu,dtype=bfloat16')
  assert sweep_config.get_config('runlocal') == sweep_config.get_config('preset=runlocal')
  with pytest.raises(ValueError, match='preset'):
    sweep_config.get_config('preset=gpu')


def test_tiny_real_sweep_trains_every_arm_and_reruns_nothing(data_dir, tmp_path,
                                                             monkeypatch):
  # Grouped (group_runs=4): the 2 folds' pretrainings together, then both folds' arms.
  # Two pretraining epochs as test_train's pretraining: the same compiled step.
  config = sweep_test_config(data_dir, protocols=('honest',), tasks=('four_class',),
                             seeds=(0,), pretrain_num_epochs=2, num_epochs=1,
                             **{'sweep.subject_budgets': (0,), 'sweep.group_runs': 4})
  workdir = str(tmp_path / 'sweep')
  summary = run.run(config, workdir)
  entry = summary['protocols']['honest']['tasks']['four_class']['budgets'][0]
  assert entry['budget']['label'] == 'all subjects'
  assert set(entry['arms']) == set(plan_lib.ARMS)
  for arm in plan_lib.ARMS:
    assert entry['arms'][arm]['folds_pooled'] == 2
    for level in bootstrap.LEVELS:
      assert 0.0 <= entry['arms'][arm][level]['balanced_accuracy']['value'] <= 1.0
  assert os.path.getsize(os.path.join(workdir, 'gradcam_grid.png')) > 0
  assert '](gradcam_grid.png)' in read_text(workdir, 'results.md')
  # Each fold's pretraining curves, from its curves.jsonl: the loss and both monitors.
  _, meta = records_lib.load(os.path.join(workdir, records_lib.PREDICTIONS_FILE))
  assert sorted(curve['fold'] for curve in meta['curves']) == [0, 1]
  for curve in meta['curves']:
    assert curve['split'] == 'val' and any('loss' in line for line in curve['lines'])
    assert any({'knn', 'probe'} <= set(line) for line in curve['lines'])
  assert '](pretraining_curves.png)' in read_text(workdir, 'results.md')

  def fail(*args):
    raise AssertionError(f'finished run trained again: {args}')
  monkeypatch.setattr(sweep.trainer, 'train_and_evaluate', fail)
  monkeypatch.setattr(sweep.groups_lib, 'train_group', fail)
  run.run(config, workdir)  # Every run's config.json matches: all skipped.
