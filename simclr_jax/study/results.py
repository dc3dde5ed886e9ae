"""The sweep's numbers: rows of the finished runs, pooled predictions, intervals, verdicts.

The unit of the study is the (protocol, task, arm, fraction, seed) cell. Under
cross-validation its runs are the folds, and concatenating their test
predictions gives one out-of-fold prediction of every subject (the "pooled"
rows); every aggregate, interval and verdict is computed from these pooled
predictions (`stats.py`: a stratified, paired bootstrap over subjects, seeds
averaged). A verdict follows the 95 % interval of the paired difference, never
the point estimate alone. `sweep_markdown.py` writes them as results.md,
`sweep_report.py` writes every file.
"""

import dataclasses

from absl import logging
import numpy as np

from simclr_jax.train import workdirs
from simclr_jax.metrics import bootstrap
from simclr_jax.study import plan as plan_lib
from simclr_jax.metrics import classification

CSV_COLUMNS = ('protocol', 'task', 'arm', 'fraction', 'seed', 'fold', 'folds_pooled',
               'num_labeled', 'num_test_slices', 'num_test_subjects', 'accuracy',
               'balanced_accuracy', 'macro_f1', 'subject_accuracy',
               'subject_balanced_accuracy', 'subject_macro_f1', 'chosen_step', 'selection',
               'wall_seconds')
# SimCLR - baseline carries the study's question; each learned arm - the floor says
# whether it learned more than a look-up of the labeled images' pixels.
COMPARISONS = (('finetune', 'baseline'), ('finetune', 'floor'), ('baseline', 'floor'))
LEVELS = bootstrap.LEVELS
# The order of the report's columns: balanced accuracy first (the majority class is
# half the data, so accuracy alone flatters a model that answers it).
REPORT_METRICS = ('balanced_accuracy', 'accuracy', 'macro_f1')
LEVEL_NAMES = {'slice': 'per slice', 'subject': 'per subject'}
# The headline (answer, verdict column, figures' emphasis): one prediction per person,
# the unit that is diagnosed, by balanced accuracy (the majority class is half the data).
HEADLINE_LEVEL = 'subject'
HEADLINE_METRIC = 'balanced_accuracy'
# "Few labels": the fractions up to this one (or the smallest fraction if none).
FEW_LABELS_MAX_FRACTION = 0.1
ANSWER_PROTOCOL = 'honest'
FIGURES = ('label_fraction_curve.png', 'confusion_matrices.png', 'gradcam_grid.png')


def duration(seconds):
  """'1 h 05 min' or '4 min 09 s'."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours} h {minutes:02d} min' if hours else f'{minutes} min {seconds:02d} s'


def comparison_name(a, b):
  return f'{plan_lib.ARM_NAMES[a]} − {plan_lib.ARM_NAMES[b]}'


# ----------------------------------------------------------------------------- rows


def _selection(metrics):
  """(split, key, value) of the `selection_<split>_<key>` entry, or (None, None, None)."""
  for name, value in metrics.items():
    if (name.startswith('selection_') and '_' in name[len('selection_'):]
        and isinstance(value, (int, float)) and not isinstance(value, bool)):
      split, key = name[len('selection_'):].split('_', 1)
      return split, key, value
  return None, None, None


def _metric_columns(metrics):
  row = {m: metrics[m] for m in plan_lib.METRICS}
  row.update({f'subject_{m}': metrics['subject'][m] for m in plan_lib.METRICS})
  return row


def collect_rows(planned):
  """One dict per finished floor, baseline or finetune run (the per-fold rows of results.csv).

  Each row holds the CSV columns and, for the report, the run's `predictions`
  (None if it wrote none), confusion matrices, class names and selection details.
  """
  rows = []
  for run in planned:
    if run.arm == 'pretrain' or not run.finished:
      continue
    metrics = workdirs.read_metrics(run.workdir)
    path = workdirs.predictions_path(run.workdir)
    predictions = classification.Predictions.load(path) if path.exists() else None
    if predictions is None:
      logging.warning('%s has no %s: left out of the pooled results.', run.workdir,
                      workdirs.PREDICTIONS_FILE)
    split, key, value = _selection(metrics)
    rows.append({
        'protocol': run.protocol, 'task': run.task, 'arm': run.arm,
        'fraction': run.fraction, 'seed': run.seed, 'fold': run.fold, 'folds_pooled': 1,
        'num_labeled': metrics.get('num_train_images', run.num_labeled),
        'num_test_slices': metrics['num_examples'],
        'num_test_subjects': metrics.get('num_subjects'),
        **_metric_columns(metrics),
        'chosen_step': metrics.get('chosen_step'), 'selection': value,
        'wall_seconds': workdirs.read_wall_time(run.workdir),
        'selection_split': split, 'selection_key': key,
        'selection_classes': metrics.get('selection_classes'),
        'class_names': list(metrics['class_names']),
        'confusion_matrix': metrics['confusion_matrix'],
        'subject_confusion_matrix': metrics['subject']['confusion_matrix'],
        'predictions': predictions, 'workdir': run.workdir,
    })
  return rows


def _cell_key(row):
  return row['protocol'], row['task'], row['arm'], row['fraction'], row['seed']


def _concatenate(predictions):
  return classification.Predictions(
      *(np.concatenate([getattr(p, f.name) for p in predictions])
        for f in dataclasses.fields(classification.Predictions)))


def pool_rows(rows, planned):
  """One pooled row per (protocol, task, arm, fraction, seed): its folds' predictions joined.

  Under cross-validation each subject is in exactly one fold's test split, so the
  concatenation of the finished folds' test predictions holds every subject once
  (each subject of those folds). A protocol without folds has one run per cell,
  which is its own pooled row. Metrics are recomputed from the pooled predictions.

  Returns:
    Rows like `collect_rows`'s with fold 'pooled' (None without folds),
    folds_pooled and folds_planned; rows without predictions are left out.
  """
  planned_folds = {}
  for run in planned:
    if run.arm in plan_lib.ARMS:
      key = (run.protocol, run.task, run.arm, run.fraction, run.seed)
      planned_folds.setdefault(key, set()).add(run.fold)
  groups = {}
  for row in rows:
    if row['predictions'] is not None:
      groups.setdefault(_cell_key(row), []).append(row)
  pooled = []
  for key, group in groups.items():
    group = sorted(group, key=lambda r: -1 if r['fold'] is None else r['fold'])
    cross_validated = group[0]['fold'] is not None
    predictions = _concatenate([r['predictions'] for r in group])
    class_names = group[0]['class_names']
    metrics = classification.prediction_metrics(predictions, len(class_names))
    walls = [r['wall_seconds'] for r in group if r['wall_seconds'] is not None]
    pooled.append({
        **{k: group[0][k] for k in ('protocol', 'task', 'arm', 'fraction', 'seed',
                                    'selection_split', 'selection_key')},
        'fold': 'pooled' if cross_validated else None, 'folds_pooled': len(group),
        'folds_planned': len(planned_folds.get(key, ())) or len(group),
        'folds': [r['fold'] for r in group],
        'num_labeled': int(round(np.mean([r['num_labeled'] for r in group]))),
        'num_test_slices': metrics['num_examples'],
        'num_test_subjects': metrics['num_subjects'], **_metric_columns(metrics),
        'chosen_step': None if cross_validated else group[0]['chosen_step'],
        'selection': None if cross_validated else group[0]['selection'],
        'wall_seconds': float(sum(walls)) if walls else None,
        'class_names': class_names, 'confusion_matrix': metrics['confusion_matrix'],
        'subject_confusion_matrix': metrics['subject']['confusion_matrix'],
        'predictions': predictions, 'fold_rows': group,
    })
  return pooled


# ----------------------------------------------------------------------------- aggregates


def _fraction_key(fraction):
  return round(float(fraction), 9)


def _by_cell(pooled):
  """{(protocol, task, fraction, arm): [pooled rows sorted by seed]}."""
  cells = {}
  for row in pooled:
    key = (row['protocol'], row['task'], _fraction_key(row['fraction']), row['arm'])
    cells.setdefault(key, []).append(row)
  return {k: sorted(v, key=lambda r: r['seed']) for k, v in cells.items()}


def _cell_statistics(arms, config):
  """{level: {'arms': {arm: intervals}, 'differences': {(a, b): differences}}} of a cell.

  `arms`: {arm: pooled rows, one per seed}. When every arm has the same seeds and
  subjects (a finished cell), one bootstrap scores them all; mid-sweep, each arm
  is bootstrapped over its own subjects and each pair over the subjects and seeds
  both have.
  """
  predictions = {arm: [r['predictions'] for r in rows] for arm, rows in arms.items()}
  seeds = {arm: [r['seed'] for r in rows] for arm, rows in arms.items()}
  pairs = [(a, b) for a, b in COMPARISONS if a in arms and b in arms]
  subject_sets = {tuple(np.unique(p.subject_ids)) for ps in predictions.values() for p in ps}
  whole = len(subject_sets) == 1 and len({tuple(s) for s in seeds.values()}) == 1
  result = {}
  for level in LEVELS:
    if whole:
      result[level] = bootstrap.arm_statistics(predictions, pairs, level,
                                           config.sweep.bootstrap_samples, config.seed)
      continue
    result[level] = {'arms': {arm: bootstrap.bootstrap_intervals(
        ps, level, config.sweep.bootstrap_samples, config.seed) for arm, ps in predictions.items()},
                     'differences': {}}
    for a, b in pairs:
      common = sorted(set(seeds[a]) & set(seeds[b]))
      a_sets = [p for s, p in zip(seeds[a], predictions[a]) if s in common]
      b_sets = [p for s, p in zip(seeds[b], predictions[b]) if s in common]
      if common and len(bootstrap.common_subjects(a_sets + b_sets)):
        result[level]['differences'][a, b] = bootstrap.paired_differences(
            a_sets, b_sets, level, config.sweep.bootstrap_samples, config.seed)
  return result


def _arm_entry(arm, arm_rows, statistics):
  entry = {'seeds': [r['seed'] for r in arm_rows],
           'folds_pooled': min(r['folds_pooled'] for r in arm_rows),
           'folds_planned': max(r['folds_planned'] for r in arm_rows),
           'num_labeled': arm_rows[0]['num_labeled']}
  for level in LEVELS:
    intervals = statistics[level]['arms'][arm]
    entry['num_subjects'] = intervals['num_subjects']
    if level == 'slice':
      entry['num_slices'] = intervals['num_slices']
    entry[level] = {m: intervals[m] for m in plan_lib.METRICS}
  first = arm_rows[0]
  entry['confusion'] = {'slice': first['confusion_matrix'],
                        'subject': first['subject_confusion_matrix'], 'seed': first['seed']}
  entry['per_fold'] = [
      {'seed': r['seed'], 'fold': f['fold'],
       'slice': {m: f[m] for m in plan_lib.METRICS},
       'subject': {m: f[f'subject_{m}'] for m in plan_lib.METRICS},
       'num_test_subjects': f['num_test_subjects'], 'num_test_slices': f['num_test_slices']}
      for r in arm_rows for f in r['fold_rows']]
  entry['per_seed'] = [
      {'seed': r['seed'], 'folds': r['folds'],
       'slice': {m: r[m] for m in plan_lib.METRICS},
       'subject': {m: r[f'subject_{m}'] for m in plan_lib.METRICS}} for r in arm_rows]
  return entry


def _comparison_entry(a, b, arms, statistics):
  if (a, b) not in statistics['slice']['differences']:
    return None  # Mid-sweep, the two arms may share no seed or no fold yet.
  seeds = sorted(set(r['seed'] for r in arms[a]) & set(r['seed'] for r in arms[b]))
  entry = {'a': a, 'b': b, 'name': comparison_name(a, b), 'seeds': seeds, 'verdict': {}}
  b_name = ('the supervised baseline' if b == 'baseline' else
            f'the {plan_lib.ARM_NAMES[b]} floor' if b == 'floor' else plan_lib.ARM_NAMES[b])
  for level in LEVELS:
    differences = statistics[level]['differences'][a, b]
    entry['num_subjects'] = differences['num_subjects']
    entry[level] = {m: {**differences[m], 'outcome': bootstrap.outcome(differences[m])}
                    for m in plan_lib.METRICS}
    entry['verdict'][level] = bootstrap.verdict(
        differences[HEADLINE_METRIC], plan_lib.ARM_NAMES[a], b_name,
        f'{plan_lib.METRIC_TITLES[HEADLINE_METRIC].lower()} {LEVEL_NAMES[level]}')
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
  """The sweep's aggregates (sweep.json), from the per-fold and the pooled rows."""
  cells = _by_cell(pooled)
  summary = {
      'dataset': config.data.name, 'bootstrap_samples': int(config.sweep.bootstrap_samples),
      'bootstrap_seed': int(config.seed), 'confidence': bootstrap.CONFIDENCE,
      'interval': 'percentile interval of a stratified cluster bootstrap over subjects: '
                  'subjects resampled with replacement within their class, with all '
                  'their slices; both arms of a comparison on the same resamples; the '
                  'statistic of a resample is the mean over seeds (intervals are over '
                  'subjects, seeds averaged)',
      'headline': {'level': HEADLINE_LEVEL, 'metric': HEADLINE_METRIC},
      'protocols': {}, 'inflation': []}
  for protocol in config.sweep.protocols:
    folds = plan_lib.protocol_folds(config, protocol)
    result = {'description': plan_lib.PROTOCOL_DESCRIPTIONS[protocol],
              **plan_lib.PROTOCOLS[protocol],
              'num_folds': None if folds == [None] else len(folds), 'tasks': {}}
    if protocol == 'reference':
      result['differences_from_reference'] = plan_lib.REFERENCE_DIFFERENCES
    for task in plan_lib.protocol_tasks(config, protocol):
      test = _test_set(pooled, protocol, task)
      if test is None:
        continue
      task_rows = [r for r in pooled if r['protocol'] == protocol and r['task'] == task]
      entry = {'class_names': task_rows[0]['class_names'], **test,
               'selection': _selection_summary(rows, protocol, task), 'fractions': []}
      for fraction in config.sweep.fractions:
        arms = {arm: cells[protocol, task, _fraction_key(fraction), arm]
                for arm in plan_lib.ARMS
                if (protocol, task, _fraction_key(fraction), arm) in cells}
        if not arms:
          continue
        statistics = _cell_statistics(arms, config)
        fraction_entry = {'fraction': float(fraction),
                          'num_labeled': next(iter(arms.values()))[0]['num_labeled'],
                          'arms': {arm: _arm_entry(arm, arm_rows, statistics)
                                   for arm, arm_rows in arms.items()},
                          'comparisons': {}}
        for a, b in COMPARISONS:
          if a in arms and b in arms:
            comparison = _comparison_entry(a, b, arms, statistics)
            if comparison is not None:
              fraction_entry['comparisons'][f'{a}-{b}'] = comparison
        entry['fractions'].append(fraction_entry)
      result['tasks'][task] = entry
    summary['protocols'][protocol] = result
  if {'honest', 'reference'} <= set(summary['protocols']):
    summary['inflation'] = _inflation(summary['protocols'])
  return summary


def _inflation(protocols):
  """Reference minus honest, per task, fraction and arm (pooled, per slice, in points)."""
  rows = []
  for task, reference in protocols['reference']['tasks'].items():
    honest = protocols['honest']['tasks'].get(task)
    if honest is None:
      continue
    honest_by_fraction = {_fraction_key(e['fraction']): e for e in honest['fractions']}
    for entry in reference['fractions']:
      other = honest_by_fraction.get(_fraction_key(entry['fraction']))
      if other is None:
        continue
      for arm in plan_lib.ARMS:
        if arm not in entry['arms'] or arm not in other['arms']:
          continue
        row = {'task': task, 'fraction': entry['fraction'], 'arm': arm}
        for metric in ('accuracy', 'balanced_accuracy'):
          h = other['arms'][arm]['slice'][metric]['value']
          r = entry['arms'][arm]['slice'][metric]['value']
          row[metric] = {'honest': h, 'reference': r, 'inflation': 100 * (r - h)}
        rows.append(row)
  return rows


