"""The verdicts of a sweep's report: the primary endpoint, the margin, the positive control."""

import pytest

from simclr_jax.metrics import bootstrap
from simclr_jax.study import tables as tables_lib
from tests.fake_sweep import read_text
from tests.fake_sweep import run_fake_sweep


def test_verdicts_in_results_md_follow_the_intervals_and_the_margin(fake_sweep):
  config, workdir, _, summary, _ = fake_sweep
  margin = config.sweep.equivalence_margin
  markdown = read_text(workdir, 'results.md')
  seen = set()
  for protocol in summary['protocols'].values():
    for task in protocol['tasks'].values():
      for entry in task['budgets']:
        for comparison in entry['comparisons'].values():
          for level in bootstrap.LEVELS:
            for metric, value in comparison[level].items():
              seen.add(value['outcome'])
              sign = -1 if metric in ('brier', 'ece') else 1  # Lower is better.
              low, high = sorted((sign * value['low'], sign * value['high']))
              assert value['outcome'] == (
                  'ahead' if low > 0 else 'behind' if high < 0 else 'equivalent'
                  if -margin <= value['low'] and value['high'] <= margin else 'inconclusive')
          verdict = comparison['verdict']['subject']
          if comparison['a'] == 'finetune' and comparison['b'] == 'baseline':
            assert verdict in markdown
          outcome = comparison['subject']['balanced_accuracy']['outcome']
          assert ('is ahead of' in verdict) == (outcome == 'ahead')
          assert ('is behind' in verdict) == (outcome == 'behind')
          assert (f'are equivalent within ±{margin:.1f} points' in verdict) == (
              outcome == 'equivalent')
          assert ('inconclusive: differences from' in verdict) == (outcome == 'inconclusive')
  # The fake arms beat the floor's random answers somewhere; equal arms are equivalent.
  assert {'ahead', 'equivalent', 'inconclusive'} <= seen


def test_every_other_comparison_is_exploratory(fake_sweep):
  _, _, _, summary, _ = fake_sweep
  roles = {}
  for name, protocol in summary['protocols'].items():
    for task, entry in protocol['tasks'].items():
      for budget_entry in entry['budgets']:
        for key in budget_entry['comparisons']:
          roles[name, task, budget_entry['budget']['label'], key] = tables_lib.role(
              summary, name, task, budget_entry['budget'], key)
  # The primary endpoint: binary, honest, SimCLR − baseline at 4 subjects (at most 16);
  # the control: the same under the reference protocol at 50 % (at most 10 %, else the
  # smallest fraction); everything else exploratory.
  assert {k for k, v in roles.items() if v == 'primary'} == {
      ('honest', 'binary', '4 subjects', 'finetune-baseline')}
  assert {k for k, v in roles.items() if v == 'positive control'} == {
      ('reference', 'binary', '50 %', 'finetune-baseline')}
  assert sum(v == 'exploratory' for v in roles.values()) == len(roles) - 2


def _answer(workdir):
  return read_text(workdir, 'results.md').splitlines()[4]


@pytest.mark.parametrize('right,opening,outcome', [
    ({'finetune': 1.0, 'baseline': 0.0}, 'Yes: SimCLR is ahead of the supervised baseline',
     'ahead'),
    ({'finetune': 0.0, 'baseline': 1.0}, 'No, the reverse: SimCLR is behind', 'behind'),
    # Equal arms answer identically (FakeTraining): a difference of exactly 0.
    ({'finetune': 0.6, 'baseline': 0.6}, 'No: SimCLR and the supervised baseline are '
     'equivalent within ±5 points', 'equivalent'),
    ({'finetune': 0.7, 'baseline': 0.6}, 'Inconclusive: at the primary budget',
     'inconclusive'),
])
def test_the_answer_follows_the_primary_endpoint(data_dir, tmp_path, monkeypatch, right,
                                                 opening, outcome):
  _, workdir, _, summary, _ = run_fake_sweep(
      data_dir, str(tmp_path), monkeypatch, right, protocols=('honest',),
      tasks=('binary',), seeds=(0,))
  primary = summary['primary']
  assert primary['status'] == 'answered' and len(primary['cells']) == 1
  cell = primary['cells'][0]
  assert cell['budget']['label'] == '4 subjects' and cell['outcome'] == outcome
  answer = _answer(workdir)
  # No reference protocol, no positive control: said first.
  assert answer.startswith('**Answer.** There is no positive control')
  assert opening in answer
  low, high = cell['difference']['low'], cell['difference']['high']
  assert f'4 subjects: {cell["difference"]["difference"]:+.1f} [{low:+.1f}, {high:+.1f}]' in answer
  if outcome == 'inconclusive':
    assert f'differences from {low:+.1f} to {high:+.1f} points are not excluded' in answer
  # Each arm's level against chance and the floor, with intervals.
  assert 'against chance (50.0 %) and against the raw-pixel 1-NN floor' in answer
  simclr = cell['arms']['finetune']
  assert simclr['minus_floor'] is not None and simclr['against_chance'] in (
      'above chance', 'at chance', 'below chance')
  assert f'SimCLR {tables_lib.interval(simclr)} ({simclr["against_chance"]}' in answer


@pytest.mark.parametrize('right,passed', [({'finetune': 1.0, 'baseline': 0.0}, True),
                                          ({'finetune': 0.6, 'baseline': 0.6}, False)])
def test_a_failed_positive_control_is_said_first(data_dir, tmp_path, monkeypatch, right,
                                                 passed):
  _, workdir, _, summary, _ = run_fake_sweep(
      data_dir, str(tmp_path), monkeypatch, right, tasks=('binary',), seeds=(0,),
      fractions=(0.1, 1.0))
  control = summary['positive_control']
  assert control['status'] == ('passed' if passed else 'failed')
  assert [c['budget']['label'] for c in control['cells']] == ['10 %', '100 %']
  assert [c['few_labels'] for c in control['cells']] == [True, False]
  assert all(c['difference'] is not None for c in control['cells'])  # Every budget's gap.
  answer = _answer(workdir)
  failed = answer.index('The positive control failed') if not passed else None
  if passed:
    assert answer.startswith('**Answer.** Yes: SimCLR is ahead')
    assert 'The positive control passed: under the leaky reference protocol' in answer
  else:
    assert failed == len('**Answer.** ')  # Before any honest-protocol claim.
    assert ('so the honest-protocol comparison cannot tell a weak SimCLR arm from no '
            'effect') in answer
  markdown = read_text(workdir, 'results.md')
  section = markdown.split('## Positive control')[1].split('\n## ')[0]
  for cell in control['cells']:
    assert tables_lib.difference(cell['difference']) in section
