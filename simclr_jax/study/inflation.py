"""The inflation table: what the reference's choices add to the scores, step by step.

The protocols of `plan.PROTOCOLS` form a chain from the honest protocol to the
reference's, each adding factors to the one before it (`plan.PROTOCOL_FACTORS`): the
slice split, then test images in pretraining, then selection on test with the
reference's other choices. A step of the table goes from one protocol of the chain
that ran (`sweep.protocols`) to the next one that ran and adds the factors of every
link between them: one factor where the protocols between honest and reference all
ran, several at once where some did not (with `honest` and `reference` alone, all of
them at once; results.md then says that the table is cut to what it can show).

A row: a task, a label budget both protocols ran (equal budgets, or all labels in
either unit), an arm and a step, with the change (to − from, points) of balanced
accuracy and accuracy per slice and per subject. Where the two protocols tested
slices in common, both sides' pooled predictions are restricted to those slices (the
honest protocol's out-of-fold predictions of the slice split's test slices; the
slice-split protocols test the same slices) and scored on the same bootstrap
resamples of their subjects: the change is paired, with its 95 % interval. Where
they share no test slice, the change is the difference of the two protocols' own
scores, unpaired, and has no interval.
"""

import functools

import numpy as np

from simclr_jax.data import splits as splits_lib
from simclr_jax.metrics import bootstrap
from simclr_jax.metrics import classification
from simclr_jax.study import plan as plan_lib

METRICS = ('balanced_accuracy', 'accuracy')
LEVELS = bootstrap.LEVELS
# The protocols between the honest and the reference protocol.
INTERMEDIATE = tuple(plan_lib.PROTOCOLS)[1:-1]


def chain(protocols):
  """The protocols of `protocols` in the chain's order (`plan.PROTOCOLS`)."""
  return [p for p in plan_lib.PROTOCOLS if p in protocols]


def factors(a, b):
  """The factors added on the way from protocol `a` to the later protocol `b`."""
  order = list(plan_lib.PROTOCOLS)
  return [factor for p in order[order.index(a) + 1:order.index(b) + 1]
          for factor in plan_lib.PROTOCOL_FACTORS.get(p, ())]


def steps(protocols):
  """The table's steps: consecutive protocols of `chain(protocols)`, with their factors.

  Each: {'from', 'to', 'factors', 'one_factor', 'skipped' (the chain's protocols
  between them that did not run)}.
  """
  ran = chain(protocols)
  order = list(plan_lib.PROTOCOLS)
  result = []
  for a, b in zip(ran, ran[1:]):
    added = factors(a, b)
    result.append({'from': a, 'to': b, 'factors': added, 'one_factor': len(added) == 1,
                   'skipped': order[order.index(a) + 1:order.index(b)]})
  return result


def comparable(budget):
  """The key that matches budgets across protocols: 'all' labels, or the budget itself."""
  return 'all' if budget.is_all else budget


def _key_order(key):
  return (1,) if key == 'all' else (0, *key.sort_key)


def _budgets(task_entry):
  """{comparable key: budget entry} of a protocol's task."""
  return {comparable(splits_lib.Budget.from_dict(e['budget'])): e
          for e in task_entry['budgets']}


def _restrict(predictions, rows):
  keep = np.isin(predictions.rows, rows)
  return classification.Predictions(predictions.rows[keep], predictions.subject_ids[keep],
                                    predictions.labels[keep], predictions.probabilities[keep])


def _tested(arm_entry):
  return {'slices': arm_entry['num_slices'], 'subjects': arm_entry['num_subjects']}


def _row(step, task, arm, entries, cells, statistics):
  """One row of the table, or None where an arm of either protocol has not finished."""
  from_entry, to_entry = entries
  sides = {}
  for side, protocol, entry in (('from', step['from'], from_entry), ('to', step['to'], to_entry)):
    sides[side] = cells.get((protocol, task, splits_lib.Budget.from_dict(entry['budget']), arm))
    if not sides[side] or arm not in entry['arms']:
      return None
  row = {'task': task, 'arm': arm, 'from': step['from'], 'to': step['to'],
         'factors': step['factors'], 'one_factor': step['one_factor'],
         'from_budget': from_entry['budget'], 'budget': to_entry['budget'],
         'tested': {'from': _tested(from_entry['arms'][arm]),
                    'to': _tested(to_entry['arms'][arm])},
         'seeds': {side: [r['seed'] for r in rows] for side, rows in sides.items()}}
  sets = {side: [r['predictions'] for r in rows] for side, rows in sides.items()}
  common = functools.reduce(np.intersect1d, [p.rows for ps in sets.values() for p in ps])
  row['paired'] = bool(len(common))
  if not row['paired']:  # Different test sets: each protocol's own score, no interval.
    row['compared'] = None
    for level in LEVELS:
      row[level] = {}
      for m in METRICS:
        values = {side: e['arms'][arm][level][m]['value']
                  for side, e in (('from', from_entry), ('to', to_entry))}
        row[level][m] = {**values, 'difference': 100 * (values['to'] - values['from']),
                         'low': None, 'high': None}
    return row
  restricted = {side: [_restrict(p, common) for p in ps] for side, ps in sets.items()}
  row['compared'] = {
      'slices': int(len(common)),
      'subjects': int(len(np.unique(restricted['from'][0].subject_ids))),
      'same': all(len(p.rows) == len(common) for ps in sets.values() for p in ps)}
  for level in LEVELS:
    result = statistics(restricted, level)
    row[level] = {m: {'from': result['arms']['from'][m]['value'],
                      'to': result['arms']['to'][m]['value'],
                      **{k: result['differences']['to', 'from'][m][k]
                         for k in ('difference', 'low', 'high')}} for m in METRICS}
  return row


def inflation(protocols, cells, tasks, statistics):
  """The inflation table of a sweep's aggregates.

  Args:
    protocols: `results.aggregate`'s 'protocols' (each with its tasks' budget entries).
    cells: {(protocol, task, budget, arm): pooled rows sorted by seed}.
    tasks: the label tasks in the report's order.
    statistics: (arms, level) -> `bootstrap.arm_statistics` of arms {'from', 'to'}
      (prediction sets, one per seed) with the pair ('to', 'from') and METRICS.

  Returns:
    None where fewer than two protocols of the chain ran; else {'chain' (the
    protocols that ran), 'skipped' (those between honest and reference that did
    not), 'steps' (`steps`), 'rows'}: per task, budget (smallest first, all labels
    last), arm and step in this order.
  """
  ran = chain(protocols)
  if len(ran) < 2:
    return None
  table_steps = steps(protocols)
  rows = []
  for task in tasks:
    budgets = {}  # {key: {step index: (from entry, to entry)}}
    for index, step in enumerate(table_steps):
      a, b = (protocols[step[side]]['tasks'].get(task) for side in ('from', 'to'))
      if a is None or b is None:
        continue
      a_budgets = _budgets(a)
      for key, entry in _budgets(b).items():
        if key in a_budgets:
          budgets.setdefault(key, {})[index] = (a_budgets[key], entry)
    for key in sorted(budgets, key=_key_order):
      for arm in plan_lib.ARMS:
        for index, entries in sorted(budgets[key].items()):
          row = _row(table_steps[index], task, arm, entries, cells, statistics)
          if row is not None:
            rows.append(row)
  return {'chain': ran, 'skipped': [p for p in INTERMEDIATE if p not in ran],
          'steps': table_steps, 'rows': rows}
