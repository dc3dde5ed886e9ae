"""The inflation table: from the honest to the reference protocol, paired where it can be."""

import dataclasses
import os

import ml_collections
import numpy as np
import pytest

from simclr_jax.data import arrays as arrays_lib
from simclr_jax.metrics import classification
from simclr_jax.study import inflation as inflation_lib
from simclr_jax.study import plan as plan_lib
from simclr_jax.study import records as records_lib
from simclr_jax.study import report as report_lib
from simclr_jax.train import workdirs
from tests.fake_sweep import read_text

SPLIT, TEST_IMAGES, SELECTION, OTHER = (
    'the slice split', 'test images in pretraining', 'selection on test',
    'the reference\'s other choices')


def test_each_step_adds_the_factors_of_the_protocols_between():
  steps = inflation_lib.steps(plan_lib.PROTOCOLS)
  assert [(s['from'], s['to'], s['factors'], s['one_factor'], s['skipped']) for s in steps] == [
      ('honest', 'slice_split', [SPLIT], True, []),
      ('slice_split', 'slice_split_transductive', [TEST_IMAGES], True, []),
      ('slice_split_transductive', 'reference', [SELECTION, OTHER], False, [])]
  # Without the protocols between, one step adds every factor at once.
  (step,) = inflation_lib.steps(('reference', 'honest'))  # The chain's order, not the config's.
  assert (step['from'], step['to'], step['one_factor']) == ('honest', 'reference', False)
  assert step['factors'] == [SPLIT, TEST_IMAGES, SELECTION, OTHER]
  assert step['skipped'] == ['slice_split', 'slice_split_transductive']
  assert [s['factors'] for s in inflation_lib.steps(('honest', 'slice_split_transductive'))] == [
      [SPLIT, TEST_IMAGES]]
  assert not inflation_lib.steps(('honest',))


def _predictions(workdir, protocol, task, arm, folds=(None,)):
  """A cell's pooled test predictions at all labels, seed 0 (its folds joined)."""
  parts = [classification.Predictions.load(workdirs.predictions_path(os.path.join(
      workdir, protocol, task, *([] if fold is None else [f'fold{fold}']),
      f'{arm}_{"f1" if protocol == "reference" else "kall"}_s0'))) for fold in folds]
  return classification.Predictions(*(np.concatenate([getattr(p, f.name) for p in parts])
                                      for f in dataclasses.fields(classification.Predictions)))


def _scores(predictions, rows, num_classes):
  """Balanced accuracy per slice and per subject of the predictions of `rows`."""
  keep = np.isin(predictions.rows, rows)
  metrics = classification.prediction_metrics(classification.Predictions(
      predictions.rows[keep], predictions.subject_ids[keep], predictions.labels[keep],
      predictions.probabilities[keep]), num_classes)
  return {'slice': metrics['balanced_accuracy'],
          'subject': metrics['subject']['balanced_accuracy']}


def test_rows_go_task_budget_arm_then_step_with_paired_changes(fake_sweep):
  config, workdir, _, summary, _ = fake_sweep
  rows = summary['inflation']['rows']
  assert summary['inflation']['chain'] == list(plan_lib.PROTOCOLS)
  assert summary['inflation']['skipped'] == []
  first, second, last = ('honest', 'slice_split'), ('slice_split',
                                                     'slice_split_transductive'), (
      'slice_split_transductive', 'reference')
  # The reference labels fractions: its step matches the others at all labels only.
  expected = [(task, label, arm, step) for task in config.sweep.tasks
              for label, steps in (('4 subjects', (first, second)),
                                   ('all subjects', (first, second, last)))
              for arm in plan_lib.ARMS for step in steps]
  assert [(r['task'], r['from_budget']['label'], r['arm'], (r['from'], r['to']))
          for r in rows] == expected
  assert {r['budget']['label'] for r in rows if r['to'] == 'reference'} == {'100 %'}
  arrays = arrays_lib.load_arrays(config)
  test = plan_lib.protocol_splits(config, 'reference', arrays)['test']
  for r in rows:
    assert r['paired'] and r['compared']['slices'] == len(test)  # The reference's test slices.
    assert r['compared']['same'] == (r['from'] != 'honest')
    for level in ('slice', 'subject'):
      change = r[level]['balanced_accuracy']
      assert change['low'] <= change['difference'] <= change['high']
      assert change['difference'] == pytest.approx(100 * (change['to'] - change['from']))
      if r['from'] == 'slice_split' or (r['to'] == 'reference' and r['arm'] != 'floor'):
        # The same split and labels (FakeTraining draws alike at all subjects and
        # 100 %): nothing changes, to the bit.
        assert change['from'] == change['to'] and change['low'] == change['high'] == 0
  for task in config.sweep.tasks:
    num_classes = len(summary['protocols']['honest']['tasks'][task]['class_names'])
    for arm in plan_lib.ARMS:
      honest = _scores(_predictions(workdir, 'honest', task, arm, (0, 1)), test, num_classes)
      sliced = _scores(_predictions(workdir, 'slice_split', task, arm), test, num_classes)
      step = next(r for r in rows if r['task'] == task and r['arm'] == arm and
                  r['from'] == 'honest' and r['budget']['label'] == 'all subjects')
      for level in ('slice', 'subject'):  # The honest predictions of the same slices.
        assert step[level]['balanced_accuracy']['from'] == pytest.approx(honest[level])
        assert step[level]['balanced_accuracy']['to'] == pytest.approx(sliced[level])
    floor = next(r for r in rows if r['task'] == task and r['arm'] == 'floor' and
                 r['from'] == 'honest' and r['budget']['label'] == 'all subjects')
    assert floor['slice']['balanced_accuracy']['low'] > 0  # The slice split's leak.
    reference = next(r for r in rows if r['task'] == task and r['arm'] == 'floor' and
                     r['to'] == 'reference')  # No validation carve-out: more neighbours.
    assert reference['slice']['accuracy']['to'] == pytest.approx(summary['protocols'][
        'reference']['tasks'][task]['budgets'][-1]['arms']['floor']['slice']['accuracy'][
            'value'])


def test_results_md_shows_the_steps_one_factor_at_a_time(fake_sweep):
  _, workdir, _, summary, _ = fake_sweep
  markdown = read_text(workdir, 'results.md')
  section = markdown.split('## Inflation: from the honest protocol to the reference\'s, '
                           'step by step\n')[1]
  assert section.index('1. `honest` → `slice_split` adds the slice split.') < section.index(
      '2. `slice_split` → `slice_split_transductive` adds test images in pretraining.') < (
          section.index('3. `slice_split_transductive` → `reference` adds several factors '
                        'at once: selection on test and the reference\'s other choices ('
                        + plan_lib.REFERENCE_OTHER_CHOICES + ').'))
  assert 'Cut to what it can show' not in markdown and 'unpaired:' not in section
  assert ('| task | labeled | arm | step | factor added | test compared | bal. acc. per slice '
          '| change per slice (pts) | bal. acc. per subject | change per subject (pts) |'
          in section)
  row = next(r for r in summary['inflation']['rows'] if r['from'] == 'honest')
  value = row['slice']['balanced_accuracy']
  assert (f'| binary | 4 subjects | raw-pixel 1-NN | honest → slice_split | the slice split | '
          f'paired: the {row["compared"]["slices"]} slices both tested '
          f'({row["compared"]["subjects"]} subjects) | {100 * value["from"]:.1f} → '
          f'{100 * value["to"]:.1f} | {value["difference"]:+.1f} [{value["low"]:+.1f}, '
          f'{value["high"]:+.1f}] |') in section
  assert '| all (all subjects / 100 %) | SimCLR | slice_split_transductive → reference | ' \
         'several at once: selection on test and the reference\'s other choices | paired: ' \
         'the same ' in section
  assert 'under the slice_split protocol (the slice split alone) the raw-pixel 1-NN' in (
      ' '.join(summary['answer']))


def _report(fake_sweep, out, protocols, shift=0):
  """The fake sweep's report recomputed with only `protocols` (the reference's test rows
  shifted by `shift`, so that no test slice is shared)."""
  config, workdir, _, _, _ = fake_sweep
  records, meta = records_lib.load(os.path.join(workdir, records_lib.PREDICTIONS_FILE))
  records = [r for r in records if r['protocol'] in protocols]
  for r in records:
    if r['protocol'] == 'reference':
      r['predictions'] = dataclasses.replace(r['predictions'], rows=r['predictions'].rows + shift)
  meta['plan'] = [e for e in meta['plan'] if e['protocol'] in protocols]
  config = ml_collections.ConfigDict(config.to_dict())
  config.sweep.protocols = protocols
  summary = report_lib.write_outputs(config, str(out), records, meta, figures=False)
  return summary, read_text(str(out), 'results.md')


@pytest.mark.parametrize('protocols,title,factors', [
    (('honest', 'reference'), '`honest` vs `reference`, several factors at once',
     [[SPLIT, TEST_IMAGES, SELECTION, OTHER]]),
    (('honest', 'slice_split', 'reference'), 'from the honest protocol to the reference\'s, '
     'step by step (some steps add several factors at once)',
     [[SPLIT], [TEST_IMAGES, SELECTION, OTHER]]),
])
def test_without_the_protocols_between_the_table_is_cut_to_what_it_can_show(
    fake_sweep, tmp_path, protocols, title, factors):
  summary, markdown = _report(fake_sweep, tmp_path, protocols)
  inflation = summary['inflation']
  assert [s['factors'] for s in inflation['steps']] == factors
  assert inflation['skipped'] == [p for p in inflation_lib.INTERMEDIATE if p not in protocols]
  assert f'## Inflation: {title}\n' in markdown
  section = markdown.split('## Inflation: ')[1]
  assert '**Cut to what it can show**' in section
  assert (('It compares the honest and the reference protocol with several factors changed at '
           'once' if len(protocols) == 2 else 'A step that adds several factors at once')
          + ', so it cannot say how much each of them inflates the scores') in section
  last = [r for r in inflation['rows'] if r['to'] == 'reference']
  # 3 tasks x 4 arms (floor, baseline, finetune, probe).
  assert {r['budget']['label'] for r in last} == {'100 %'} and len(last) == 3 * 4
  for r in last:  # Still paired: on the reference's test slices.
    assert r['paired'] and not r['one_factor']
    assert f'| several at once: {", ".join(r["factors"][:-1])} and {r["factors"][-1]} |' in (
        section)


def test_protocols_without_a_test_slice_in_common_differ_unpaired(fake_sweep, tmp_path):
  summary, markdown = _report(fake_sweep, tmp_path, ('honest', 'reference'), shift=10**6)
  rows = summary['inflation']['rows']
  assert rows and not any(r['paired'] for r in rows)
  protocols = summary['protocols']
  for r in rows:
    assert r['compared'] is None
    own = {side: protocols[r[side]]['tasks'][r['task']]['budgets'][-1]['arms'][r['arm']]
           for side in ('from', 'to')}
    assert r['tested'] == {side: {'slices': own[side]['num_slices'],
                                  'subjects': own[side]['num_subjects']} for side in own}
    for level in ('slice', 'subject'):
      value = r[level]['balanced_accuracy']
      assert value['low'] is None and value['high'] is None  # No interval to compute.
      assert value['difference'] == pytest.approx(100 * (
          own['to'][level]['balanced_accuracy']['value']
          - own['from'][level]['balanced_accuracy']['value']))
  section = markdown.split('## Inflation: ')[1]
  assert '(unpaired: no interval) |' in section and '| unpaired: ' in section
  assert '[' not in section.split('|---|')[1]  # No bracketed interval in the table.
  assert 'on different test slices' in ' '.join(summary['answer'])
