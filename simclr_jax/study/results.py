"""The sweep's numbers: rows of the finished runs, pooled predictions, intervals, verdicts.

The unit of the study is the (protocol, task, arm, label budget, seed) cell. Under
cross-validation its runs are the folds, and concatenating their test
predictions gives one out-of-fold prediction of every subject (the "pooled"
rows, `rows.py`); every aggregate, interval and verdict is computed from these pooled
predictions (`metrics/bootstrap.py`: a stratified, paired bootstrap over
subjects, and over seeds too where a cell ran several). A verdict follows the
95 % interval of the paired difference and the equivalence margin
(`verdicts.py`), never the point estimate alone; the inflation table's steps from
the honest to the reference protocol are `inflation.py`'s, scored on the same cached
bootstrap. Everything here is a function of the config and the runs' records
(`records.py`), which is what lets `recompute.py` rebuild a report from
predictions.npz. `markdown.py` writes results.md, `report.py` every file.
"""

import collections
import hashlib

import numpy as np

from simclr_jax.data import splits as splits_lib
from simclr_jax.metrics import bootstrap
from simclr_jax.metrics import classification
from simclr_jax.study import inflation as inflation_lib
from simclr_jax.study import plan as plan_lib
from simclr_jax.study import rows as rows_lib
from simclr_jax.study import verdicts

# SimCLR - baseline carries the study's question; each learned arm - the floor says
# whether it learned more than a look-up of the labeled images' pixels.
COMPARISONS = (('finetune', 'baseline'), ('probe', 'baseline'), ('finetune', 'floor'),
               ('probe', 'floor'), ('baseline', 'floor'))
LEVELS = bootstrap.LEVELS
# The order of the report's columns: balanced accuracy first (the majority class is
# half the data, so accuracy alone flatters a model that answers it).
REPORT_METRICS = ('balanced_accuracy', 'accuracy', 'macro_f1')
LEVEL_NAMES = verdicts.LEVEL_NAMES
ANSWER_PROTOCOL = 'honest'
FIGURES = ('label_fraction_curve.png', 'pretraining_curves.png', 'confusion_matrices.png',
           'gradcam_grid.png')


def duration(seconds):
  """'1 h 05 min' or '4 min 09 s'."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours} h {minutes:02d} min' if hours else f'{minutes} min {seconds:02d} s'


def comparison_name(a, b):
  return f'{plan_lib.ARM_NAMES[a]} − {plan_lib.ARM_NAMES[b]}'


def budget_of(entry):
  """The `splits.Budget` of an aggregate's budget entry."""
  return splits_lib.Budget.from_dict(entry['budget'])


# ----------------------------------------------------------------------------- aggregates


def _by_cell(pooled):
  """{(protocol, task, budget, arm): [pooled rows sorted by seed]}."""
  cells = {}
  for row in pooled:
    key = (row['protocol'], row['task'], row['budget'], row['arm'])
    cells.setdefault(key, []).append(row)
  return {k: sorted(v, key=lambda r: r['seed']) for k, v in cells.items()}


_STATISTICS = collections.OrderedDict()  # A sweep rewrites its reports after every run.
_STATISTICS_SIZE = 256


def _fingerprint(predictions):
  digest = hashlib.sha1()
  for array in (predictions.subject_ids, predictions.labels, predictions.probabilities):
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _bootstrap(kind, args, kwargs, predictions, layout):
  """`bootstrap.<kind>(*args, **kwargs)`, kept for prediction sets already seen.

  Mid-sweep the reports are rewritten after every run, and only the cell of the
  run just finished has new predictions: the others' statistics are reused. The
  key: the prediction sets' contents, `layout` (how args arrange them) and kwargs.
  """
  key = (kind, tuple(_fingerprint(p) for p in predictions), repr(layout),
         repr(sorted(kwargs.items())))
  if key in _STATISTICS:
    _STATISTICS.move_to_end(key)
    return _STATISTICS[key]
  value = getattr(bootstrap, kind)(*args, **kwargs)
  _STATISTICS[key] = value
  if len(_STATISTICS) > _STATISTICS_SIZE:
    _STATISTICS.popitem(last=False)
  return value


def _cell_statistics(arms, config, metrics):
  """{level: {'arms': {arm: intervals}, 'differences': {(a, b): differences}}} of a cell.

  `arms`: {arm: pooled rows, one per seed}. When every arm has the same seeds and
  subjects (a finished cell), one bootstrap scores them all; mid-sweep, each arm
  is bootstrapped over its own subjects and each pair over the subjects and seeds
  both have. Where a cell ran several seeds they are resampled too
  (`resample_seeds`), so the intervals are over subjects and seeds together.
  """
  predictions = {arm: [r['predictions'] for r in rows] for arm, rows in arms.items()}
  seeds = {arm: [r['seed'] for r in rows] for arm, rows in arms.items()}
  pairs = [(a, b) for a, b in COMPARISONS if a in arms and b in arms]
  subject_sets = {tuple(np.unique(p.subject_ids)) for ps in predictions.values() for p in ps}
  whole = len(subject_sets) == 1 and len({tuple(s) for s in seeds.values()}) == 1
  options = {'num_samples': int(config.sweep.bootstrap_samples), 'seed': int(config.seed),
             'metrics': tuple(metrics),
             'resample_seeds': max(len(s) for s in seeds.values()) > 1}
  everything = [p for ps in predictions.values() for p in ps]
  result = {}
  for level in LEVELS:
    if whole:
      layout = ([(arm, len(ps)) for arm, ps in predictions.items()], pairs, level)
      result[level] = _bootstrap('arm_statistics', (predictions, pairs, level), options,
                                 everything, layout)
      continue
    result[level] = {'arms': {arm: _bootstrap('bootstrap_intervals', (ps, level), options, ps,
                                              level) for arm, ps in predictions.items()},
                     'differences': {}}
    for a, b in pairs:
      common = sorted(set(seeds[a]) & set(seeds[b]))
      a_sets = [p for s, p in zip(seeds[a], predictions[a]) if s in common]
      b_sets = [p for s, p in zip(seeds[b], predictions[b]) if s in common]
      if common and len(bootstrap.common_subjects(a_sets + b_sets)):
        result[level]['differences'][a, b] = _bootstrap(
            'paired_differences', (a_sets, b_sets, level), options, a_sets + b_sets,
            (len(a_sets), level))
  return result


def _step_statistics(config):
  """`inflation.inflation`'s statistics: arms 'from' and 'to', and to − from, cached."""
  def statistics(arms, level):
    options = {'num_samples': int(config.sweep.bootstrap_samples), 'seed': int(config.seed),
               'metrics': inflation_lib.METRICS,
               'resample_seeds': max(len(ps) for ps in arms.values()) > 1}
    pairs = [('to', 'from')]
    layout = ([(side, len(ps)) for side, ps in arms.items()], pairs, level)
    return _bootstrap('arm_statistics', (arms, pairs, level), options,
                      [p for ps in arms.values() for p in ps], layout)
  return statistics


def _levels(row, metrics):
  return {'slice': {m: row[m] for m in metrics},
          'subject': {m: row[f'subject_{m}'] for m in metrics}}


def _arm_entry(arm, arm_rows, statistics, metrics):
  entry = {'seeds': [r['seed'] for r in arm_rows],
           'folds_pooled': min(r['folds_pooled'] for r in arm_rows),
           'folds_planned': max(r['folds_planned'] for r in arm_rows),
           'num_labeled': arm_rows[0]['num_labeled'],
           'num_labeled_subjects': arm_rows[0]['num_labeled_subjects']}
  for level in LEVELS:
    intervals = statistics[level]['arms'][arm]
    entry['num_subjects'] = intervals['num_subjects']
    if level == 'slice':
      entry['num_slices'] = intervals['num_slices']
    entry[level] = {m: intervals[m] for m in metrics}  # With each seed's value.
  first = arm_rows[0]
  entry['confusion'] = {'slice': first['confusion_matrix'],
                        'subject': first['subject_confusion_matrix'], 'seed': first['seed']}
  entry['per_fold'] = [
      {'seed': r['seed'], 'fold': f['fold'], **_levels(f, metrics),
       'num_test_subjects': f['num_test_subjects'], 'num_test_slices': f['num_test_slices']}
      for r in arm_rows for f in r['fold_rows']]
  entry['per_seed'] = [{'seed': r['seed'], 'folds': r['folds'], **_levels(r, metrics)}
                       for r in arm_rows]
  return entry


def _comparison_entry(a, b, arms, statistics, metrics, primary):
  """a − b of a cell: every metric's difference with its 95 % interval, per-seed
  values and verdict (`verdicts.outcome`), and a sentence of the headline metric."""
  if (a, b) not in statistics['slice']['differences']:
    return None  # Mid-sweep, the two arms may share no seed or no fold yet.
  seeds = sorted(set(r['seed'] for r in arms[a]) & set(r['seed'] for r in arms[b]))
  entry = {'a': a, 'b': b, 'name': comparison_name(a, b), 'seeds': seeds, 'verdict': {}}
  metric, margin = primary['metric'], primary['margin']
  for level in LEVELS:
    differences = statistics[level]['differences'][a, b]
    entry['num_subjects'] = differences['num_subjects']
    entry[level] = {m: {**differences[m], 'outcome': verdicts.outcome(differences[m], margin, m)}
                    for m in metrics}
    entry['verdict'][level] = bootstrap.verdict(
        differences[metric], verdicts.arm_name(a), verdicts.arm_name(b, article=True),
        verdicts.what(level, metric), margin=margin,
        lower_is_better=metric in bootstrap.LOWER_IS_BETTER)
  return entry


def _selection_summary(rows, protocol, task):
  """Which trained runs' selection splits miss classes, grouped by what they miss."""
  groups = {}
  trained = [r for r in rows if r['protocol'] == protocol and r['task'] == task
             and r['arm'] != 'floor' and r['selection_classes'] is not None]
  for r in trained:
    missing = tuple(c for c in r['class_names'] if c not in r['selection_classes'])
    if missing:
      group = groups.setdefault(missing, {'missing': list(missing),
                                          'averaged_over': list(r['selection_classes']),
                                          'split': r['selection_split'],
                                          'key': r['selection_key'], 'folds': set(),
                                          'num_runs': 0})
      group['num_runs'] += 1
      group['folds'].add(r['fold'])
  return {'num_trained_runs': len(trained),
          'missing': [{**g, 'folds': sorted(g['folds'], key=lambda f: -1 if f is None else f)}
                      for g in groups.values()]}


def _test_set(pooled, protocol, task):
  """Sizes and majority shares of the pooled test predictions (the floor's, if it ran)."""
  candidates = [r for r in pooled if r['protocol'] == protocol and r['task'] == task]
  if not candidates:
    return None
  row = max(candidates, key=lambda r: (r['folds_pooled'], r['arm'] == 'floor'))
  predictions = row['predictions']
  subjects = classification.subject_level(predictions)
  num_classes = len(row['class_names'])
  share = lambda labels: float(np.bincount(labels, minlength=num_classes).max() / len(labels))
  return {'num_test_slices': int(len(predictions.labels)),
          'num_test_subjects': int(len(subjects.labels)),
          'folds_pooled': row['folds_pooled'], 'folds_planned': row['folds_planned'],
          'majority_share': share(predictions.labels),
          'subject_majority_share': share(subjects.labels),
          'subjects_per_class': np.bincount(subjects.labels, minlength=num_classes).tolist()}


def aggregate(config, rows, pooled):
  """The sweep's aggregates (sweep.json), from the per-fold and the pooled rows.

  Besides the protocols' tables: 'primary' (the pre-registered endpoint,
  `verdicts.primary_endpoint`) and 'positive_control' (`verdicts.positive_control`).
  """
  cells = _by_cell(pooled)
  primary = verdicts.settings(config)
  summary = {
      'dataset': config.data.name, 'bootstrap_samples': int(config.sweep.bootstrap_samples),
      'bootstrap_seed': int(config.seed), 'confidence': bootstrap.CONFIDENCE,
      'interval': 'percentile interval of a stratified cluster bootstrap over subjects: '
                  'subjects resampled with replacement within their class, with all '
                  'their slices; both arms of a comparison on the same resamples; where '
                  'a cell ran several seeds, each resample also draws the seeds with '
                  'replacement (the same draw for both arms) and averages them, so the '
                  'intervals are over subjects and seeds together',
      'equivalence_margin': primary['margin'],
      'verdicts': 'ahead: the interval of a − b lies above 0 (below 0 for brier and '
                  'ece, lower is better); behind: the reverse; equivalent: neither, and '
                  'the interval lies inside ±equivalence_margin points; inconclusive: '
                  'neither, and it does not',
      'headline': {'level': primary['level'], 'metric': primary['metric']},
      'protocols': {}, 'inflation': None}
  for protocol in config.sweep.protocols:
    folds = plan_lib.protocol_folds(config, protocol)
    result = {'description': plan_lib.PROTOCOL_DESCRIPTIONS[protocol],
              **plan_lib.PROTOCOLS[protocol],
              'num_folds': None if folds == [None] else len(folds),
              'label_unit': plan_lib.protocol_budgets(config, protocol)[0].unit, 'tasks': {}}
    if protocol == 'reference':
      result['differences_from_reference'] = plan_lib.REFERENCE_DIFFERENCES
    for task in plan_lib.protocol_tasks(config, protocol):
      test = _test_set(pooled, protocol, task)
      if test is None:
        continue
      task_rows = [r for r in pooled if r['protocol'] == protocol and r['task'] == task]
      metrics = rows_lib.task_metrics(len(task_rows[0]['class_names']))
      entry = {'class_names': task_rows[0]['class_names'], 'metrics': list(metrics), **test,
               'selection': _selection_summary(rows, protocol, task), 'budgets': []}
      entry['cap'] = _balanced_accuracy_cap(entry, result['num_folds'])
      for budget in plan_lib.protocol_budgets(config, protocol):
        arms = {arm: cells[protocol, task, budget, arm] for arm in plan_lib.ARMS
                if (protocol, task, budget, arm) in cells}
        if not arms:
          continue
        statistics = _cell_statistics(arms, config, metrics)
        first = next(iter(arms.values()))[0]
        budget_entry = {'budget': budget.to_dict(), 'num_labeled': first['num_labeled'],
                        'num_labeled_subjects': first['num_labeled_subjects'],
                        'arms': {arm: _arm_entry(arm, arm_rows, statistics, metrics)
                                 for arm, arm_rows in arms.items()},
                        'comparisons': {}}
        for a, b in COMPARISONS:
          if a in arms and b in arms:
            comparison = _comparison_entry(a, b, arms, statistics, metrics, primary)
            if comparison is not None:
              budget_entry['comparisons'][f'{a}-{b}'] = comparison
        entry['budgets'].append(budget_entry)
      result['tasks'][task] = entry
    summary['protocols'][protocol] = result
  summary['inflation'] = inflation_lib.inflation(
      summary['protocols'], cells, config.sweep.tasks, _step_statistics(config))
  summary['primary'] = verdicts.primary_endpoint(summary, config)
  summary['positive_control'] = verdicts.positive_control(summary, config)
  return summary


def _balanced_accuracy_cap(entry, num_folds):
  """Under cross-validation, the classes no trained run's selection split held, and the cap.

  Such a class (the Kaggle data's Moderate_Demented: 2 subjects, never in a fold's
  validation split) is never scored by model selection and has at most a subject or two
  to train on; where its test subjects are all missed, the task's pooled balanced
  accuracy (the mean of the classes' recalls) is at most (K - m) / K.

  Returns:
    {'classes', 'subjects' (test subjects of each), 'max_balanced_accuracy'}, or None.
  """
  selection = entry['selection']
  if not num_folds or not selection['num_trained_runs']:
    return None
  names = entry['class_names']
  never = [name for name in names if sum(
      g['num_runs'] for g in selection['missing']
      if name in g['missing']) == selection['num_trained_runs']]
  if not never:
    return None
  return {'classes': never,
          'subjects': [entry['subjects_per_class'][names.index(n)] for n in never],
          'max_balanced_accuracy': (len(names) - len(never)) / len(names)}
