"""The sweep's reports: rows of the finished runs, pooled predictions, intervals, verdicts.

Reads only the finished runs' `metrics.json` and `test_predictions.npz` (through
`runs.py`), so the reports can be written mid-sweep; writes results.csv,
results.md, sweep.json, label_fraction_curve.png, confusion_matrices.png and
gradcam_grid.png.

The unit of the study is the (protocol, task, arm, fraction, seed) cell. Under
cross-validation its runs are the folds, and concatenating their test
predictions gives one out-of-fold prediction of every subject (the "pooled"
rows); every aggregate, interval and verdict is computed from these pooled
predictions (`stats.py`: a stratified, paired bootstrap over subjects, seeds
averaged). A verdict follows the 95 % interval of the paired difference, never
the point estimate alone.
"""

import csv
import dataclasses
import io
import math

from absl import logging
import jax
import numpy as np

from simclr_jax import data as data_lib
from simclr_jax import evaluate
from simclr_jax import explain
from simclr_jax import plots
from simclr_jax import runs
from simclr_jax import stats
from simclr_jax import sweep_plan

CSV_COLUMNS = ('protocol', 'task', 'arm', 'fraction', 'seed', 'fold', 'folds_pooled',
               'num_labeled', 'num_test_slices', 'num_test_subjects', 'accuracy',
               'balanced_accuracy', 'macro_f1', 'subject_accuracy',
               'subject_balanced_accuracy', 'subject_macro_f1', 'chosen_step', 'selection',
               'wall_seconds')
# SimCLR - baseline carries the study's question; each learned arm - the floor says
# whether it learned more than a look-up of the labeled images' pixels.
COMPARISONS = (('finetune', 'baseline'), ('finetune', 'floor'), ('baseline', 'floor'))
LEVELS = stats.LEVELS
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
  return f'{sweep_plan.ARM_NAMES[a]} − {sweep_plan.ARM_NAMES[b]}'


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
  row = {m: metrics[m] for m in sweep_plan.METRICS}
  row.update({f'subject_{m}': metrics['subject'][m] for m in sweep_plan.METRICS})
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
    metrics = runs.read_metrics(run.workdir)
    path = runs.predictions_path(run.workdir)
    predictions = evaluate.Predictions.load(path) if path.exists() else None
    if predictions is None:
      logging.warning('%s has no %s: left out of the pooled results.', run.workdir,
                      runs.PREDICTIONS_FILE)
    split, key, value = _selection(metrics)
    rows.append({
        'protocol': run.protocol, 'task': run.task, 'arm': run.arm,
        'fraction': run.fraction, 'seed': run.seed, 'fold': run.fold, 'folds_pooled': 1,
        'num_labeled': metrics.get('num_train_images', run.num_labeled),
        'num_test_slices': metrics['num_examples'],
        'num_test_subjects': metrics.get('num_subjects'),
        **_metric_columns(metrics),
        'chosen_step': metrics.get('chosen_step'), 'selection': value,
        'wall_seconds': runs.read_wall_time(run.workdir),
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
  return evaluate.Predictions(
      *(np.concatenate([getattr(p, f.name) for p in predictions])
        for f in dataclasses.fields(evaluate.Predictions)))


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
    if run.arm in sweep_plan.ARMS:
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
    metrics = evaluate.prediction_metrics(predictions, len(class_names))
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
      result[level] = stats.arm_statistics(predictions, pairs, level,
                                           config.bootstrap_samples, config.seed)
      continue
    result[level] = {'arms': {arm: stats.bootstrap_intervals(
        ps, level, config.bootstrap_samples, config.seed) for arm, ps in predictions.items()},
                     'differences': {}}
    for a, b in pairs:
      common = sorted(set(seeds[a]) & set(seeds[b]))
      a_sets = [p for s, p in zip(seeds[a], predictions[a]) if s in common]
      b_sets = [p for s, p in zip(seeds[b], predictions[b]) if s in common]
      if common and len(stats.common_subjects(a_sets + b_sets)):
        result[level]['differences'][a, b] = stats.paired_differences(
            a_sets, b_sets, level, config.bootstrap_samples, config.seed)
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
    entry[level] = {m: intervals[m] for m in sweep_plan.METRICS}
  first = arm_rows[0]
  entry['confusion'] = {'slice': first['confusion_matrix'],
                        'subject': first['subject_confusion_matrix'], 'seed': first['seed']}
  entry['per_fold'] = [
      {'seed': r['seed'], 'fold': f['fold'],
       'slice': {m: f[m] for m in sweep_plan.METRICS},
       'subject': {m: f[f'subject_{m}'] for m in sweep_plan.METRICS},
       'num_test_subjects': f['num_test_subjects'], 'num_test_slices': f['num_test_slices']}
      for r in arm_rows for f in r['fold_rows']]
  entry['per_seed'] = [
      {'seed': r['seed'], 'folds': r['folds'],
       'slice': {m: r[m] for m in sweep_plan.METRICS},
       'subject': {m: r[f'subject_{m}'] for m in sweep_plan.METRICS}} for r in arm_rows]
  return entry


def _comparison_entry(a, b, arms, statistics):
  if (a, b) not in statistics['slice']['differences']:
    return None  # Mid-sweep, the two arms may share no seed or no fold yet.
  seeds = sorted(set(r['seed'] for r in arms[a]) & set(r['seed'] for r in arms[b]))
  entry = {'a': a, 'b': b, 'name': comparison_name(a, b), 'seeds': seeds, 'verdict': {}}
  b_name = ('the supervised baseline' if b == 'baseline' else
            f'the {sweep_plan.ARM_NAMES[b]} floor' if b == 'floor' else sweep_plan.ARM_NAMES[b])
  for level in LEVELS:
    differences = statistics[level]['differences'][a, b]
    entry['num_subjects'] = differences['num_subjects']
    entry[level] = {m: {**differences[m], 'outcome': stats.outcome(differences[m])}
                    for m in sweep_plan.METRICS}
    entry['verdict'][level] = stats.verdict(
        differences[HEADLINE_METRIC], sweep_plan.ARM_NAMES[a], b_name,
        f'{sweep_plan.METRIC_TITLES[HEADLINE_METRIC].lower()} {LEVEL_NAMES[level]}')
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
  subjects = evaluate.subject_level(predictions)
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
      'dataset': config.dataset, 'bootstrap_samples': int(config.bootstrap_samples),
      'bootstrap_seed': int(config.seed), 'confidence': stats.CONFIDENCE,
      'interval': 'percentile interval of a stratified cluster bootstrap over subjects: '
                  'subjects resampled with replacement within their class, with all '
                  'their slices; both arms of a comparison on the same resamples; the '
                  'statistic of a resample is the mean over seeds (intervals are over '
                  'subjects, seeds averaged)',
      'headline': {'level': HEADLINE_LEVEL, 'metric': HEADLINE_METRIC},
      'protocols': {}, 'inflation': []}
  for protocol in config.protocols:
    folds = sweep_plan.protocol_folds(config, protocol)
    result = {'description': sweep_plan.PROTOCOL_DESCRIPTIONS[protocol],
              **sweep_plan.PROTOCOLS[protocol],
              'num_folds': None if folds == [None] else len(folds), 'tasks': {}}
    if protocol == 'reference':
      result['differences_from_reference'] = sweep_plan.REFERENCE_DIFFERENCES
    for task in config.tasks:
      test = _test_set(pooled, protocol, task)
      if test is None:
        continue
      task_rows = [r for r in pooled if r['protocol'] == protocol and r['task'] == task]
      entry = {'class_names': task_rows[0]['class_names'], **test,
               'selection': _selection_summary(rows, protocol, task), 'fractions': []}
      for fraction in config.fractions:
        arms = {arm: cells[protocol, task, _fraction_key(fraction), arm]
                for arm in sweep_plan.ARMS
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
  summary['answer'] = answer_sentences(summary, config)
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
      for arm in sweep_plan.ARMS:
        if arm not in entry['arms'] or arm not in other['arms']:
          continue
        row = {'task': task, 'fraction': entry['fraction'], 'arm': arm}
        for metric in ('accuracy', 'balanced_accuracy'):
          h = other['arms'][arm]['slice'][metric]['value']
          r = entry['arms'][arm]['slice'][metric]['value']
          row[metric] = {'honest': h, 'reference': r, 'inflation': 100 * (r - h)}
        rows.append(row)
  return rows


# ----------------------------------------------------------------------------- answer


def _few_label_fractions(config):
  few = [f for f in config.fractions if f <= FEW_LABELS_MAX_FRACTION + 1e-9]
  return sorted(few) if few else [min(config.fractions)]


def _and(items):
  items = list(items)
  if len(items) <= 1:
    return ''.join(items)
  return ', '.join(items[:-1]) + ' and ' + items[-1]


def _simclr_comparisons(summary, protocol, fractions):
  """[(task, fraction, comparison or None)] of SimCLR − baseline at `fractions`."""
  result = summary['protocols'].get(protocol)
  found = []
  for task, entry in (result or {}).get('tasks', {}).items():
    by_fraction = {_fraction_key(e['fraction']): e for e in entry['fractions']}
    for fraction in fractions:
      fraction_entry = by_fraction.get(_fraction_key(fraction), {})
      found.append((task, fraction,
                    fraction_entry.get('comparisons', {}).get('finetune-baseline')))
  return found


def _outcome_counts(comparisons):
  outcomes = [c[HEADLINE_LEVEL][HEADLINE_METRIC]['outcome'] for _, _, c in comparisons]
  return {o: outcomes.count(o) for o in ('ahead', 'behind', 'no difference detectable')}


def _counts_text(counts, total, noun, the='the'):
  """'ahead in 1 and not detectably different in 2 of the 3 {noun}' (zero counts left out)."""
  parts = [f'{name} in {counts[outcome]}' for outcome, name in (
      ('ahead', 'ahead'), ('behind', 'behind'),
      ('no difference detectable', 'not detectably different')) if counts[outcome]]
  return f'{_and(parts)} of {the} {total} {noun}'


def answer_sentences(summary, config):
  """The report's opening: three sentences generated from the intervals.

  1. Does SimCLR beat the supervised baseline at few labels (the fractions up to
     FEW_LABELS_MAX_FRACTION), by the headline level and metric? 2. Under which
     protocol, and what the reference protocol says. 3. How sure: the intervals.
  """
  protocol = ANSWER_PROTOCOL if ANSWER_PROTOCOL in summary['protocols'] else config.protocols[0]
  fractions = _few_label_fractions(config)
  fraction_text = _and(sweep_plan.percent_label(f) for f in fractions)
  what = (f'{sweep_plan.METRIC_TITLES[HEADLINE_METRIC].lower()} '
          f'{LEVEL_NAMES[HEADLINE_LEVEL]}')
  found = _simclr_comparisons(summary, protocol, fractions)
  done = [c for c in found if c[2] is not None]
  if not done:
    return [f'Not answered yet: no SimCLR and baseline runs of the {protocol} protocol '
            f'have finished at {fraction_text} of the labels.',
            f'The {protocol} protocol is {sweep_plan.PROTOCOL_DESCRIPTIONS[protocol]}.',
            'The intervals follow once both arms have finished runs.']
  differences = [c[HEADLINE_LEVEL][HEADLINE_METRIC]['difference'] for _, _, c in done]
  span = (f'{min(differences):+.1f}' if len(differences) == 1 else
          f'{min(differences):+.1f} to {max(differences):+.1f}')
  counts = _outcome_counts(done)
  tasks = _and(task.replace('_', '-') for task in config.tasks
               if any(t == task for t, _, _ in done))
  where = f'with few labels ({fraction_text}; {tasks} task{"s" if "and" in tasks else ""})'
  if counts['ahead'] == len(done):
    first = (f'Yes: {where}, SimCLR fine-tuning beats the supervised baseline here, by '
             f'{span} points of {what}.')
  elif counts['behind'] == len(done):
    first = (f'No, the reverse: {where}, SimCLR fine-tuning is behind the supervised '
             f'baseline here, by {span} points of {what}.')
  elif counts['no difference detectable'] == len(done):
    first = (f'Not detectably: {where}, SimCLR fine-tuning and the supervised baseline '
             f'differ by {span} points of {what}, which this many subjects cannot tell '
             'apart from no difference.')
  else:
    first = (f'Not consistently: {where}, SimCLR fine-tuning is '
             f'{_counts_text(counts, len(done), "comparisons with the supervised baseline")}'
             f' ({span} points of {what}).')
  result = summary['protocols'][protocol]
  if result['num_folds']:
    how = (f'{result["num_folds"]}-fold cross-validation grouped by subject, every subject '
           'tested once, out of fold, checkpoints chosen on validation subjects')
  else:
    how = sweep_plan.PROTOCOL_DESCRIPTIONS[protocol]
  second = f'That is under the {protocol} protocol ({how})'
  other = 'reference' if protocol != 'reference' else None
  other_done = ([c for c in _simclr_comparisons(summary, other, fractions) if c[2]]
                if other in summary['protocols'] else [])
  if other_done:
    second += ('; under the reference protocol\'s slice split SimCLR is '
               + _counts_text(_outcome_counts(other_done), len(other_done),
                              'comparisons', the='the same'))
    floor = [r for r in summary['inflation'] if r['arm'] == 'floor']
    if floor:
      row = max(floor, key=lambda r: (r['task'] == config.tasks[0], r['fraction']))
      second += (f', and its raw-pixel 1-NN, which learns nothing, scores '
                 f'{100 * row["accuracy"]["reference"]:.1f} % accuracy against '
                 f'{100 * row["accuracy"]["honest"]:.1f} % under the honest protocol '
                 f'({row["task"].replace("_", "-")}, {sweep_plan.percent_label(row["fraction"])}'
                 ' of the labels): the slice split rewards finding a person\'s other slices')
  elif other is not None and other not in summary['protocols']:
    second += '; the reference protocol was not run'
  second += '.'
  num_subjects = max(c['num_subjects'] for _, _, c in done)
  seeds = max(len(c['seeds']) for _, _, c in done)
  intervals = '; '.join(
      f'{task.replace("_", "-")} {sweep_plan.percent_label(fraction)}: '
      f'[{c[HEADLINE_LEVEL][HEADLINE_METRIC]["low"]:+.1f}, '
      f'{c[HEADLINE_LEVEL][HEADLINE_METRIC]["high"]:+.1f}]'
      for task, fraction, c in done)
  third = (f'How sure: the 95 % intervals of SimCLR − baseline over the {num_subjects} '
           f'test subjects (stratified bootstrap over subjects, '
           f'{summary["bootstrap_samples"]} resamples, {seeds} seed'
           f'{"s" if seeds > 1 else ""}{" averaged" if seeds > 1 else ""}) are {intervals} '
           'points')
  incomplete = len(found) - len(done)
  partial = [c for t, f, c in done if _partial(summary, protocol, t, f)]
  if incomplete or partial:
    third += (f', with {incomplete + len(partial)} of the {len(found)} comparisons still '
              'waiting for runs')
  third += '; an interval that contains 0 means no difference was detected.'
  return [first, second, third]


def _partial(summary, protocol, task, fraction):
  entry = next(e for e in summary['protocols'][protocol]['tasks'][task]['fractions']
               if _fraction_key(e['fraction']) == _fraction_key(fraction))
  return any(arm['folds_pooled'] < arm['folds_planned'] for arm in entry['arms'].values())


# ----------------------------------------------------------------------------- markdown


def _interval(value):
  """'45.1 [40.2, 50.3]' of a {'value', 'low', 'high'} fraction."""
  return f'{100 * value["value"]:.1f} [{100 * value["low"]:.1f}, {100 * value["high"]:.1f}]'


def _difference(value):
  return f'{value["difference"]:+.1f} [{value["low"]:+.1f}, {value["high"]:+.1f}]'


def _fraction_label(entry, cross_validated):
  per_fold = ' per fold' if cross_validated else ''
  return f'{sweep_plan.percent_label(entry["fraction"])} ({entry["num_labeled"]:,}{per_fold})'


def _table(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] * 2 + ['---:'] * (len(header) - 2)) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return lines


def _folds_note(arm):
  if arm['folds_pooled'] < arm['folds_planned']:
    return f' ({arm["folds_pooled"]} of {arm["folds_planned"]} folds)'
  return ''


def _scores_table(entry, cross_validated):
  header = ['labeled', 'arm', 'subjects', 'slices']
  for metric in REPORT_METRICS:
    header += [f'{sweep_plan.METRIC_TITLES[metric]} {LEVEL_NAMES[level]}' for level in LEVELS]
  header.append('seeds')
  rows = []
  for fraction_entry in entry['fractions']:
    for arm_name, arm in fraction_entry['arms'].items():
      cells = [_fraction_label(fraction_entry, cross_validated),
               sweep_plan.ARM_NAMES[arm_name] + _folds_note(arm),
               f'{arm["num_subjects"]:,}', f'{arm["num_slices"]:,}']
      for metric in REPORT_METRICS:
        cells += [_interval(arm[level][metric]) for level in LEVELS]
      cells.append(str(len(arm['seeds'])))
      rows.append(cells)
  return _table(header, rows)


def _comparisons_table(entry, cross_validated):
  header = ['labeled', 'comparison', 'subjects']
  for metric in REPORT_METRICS:
    header += [f'{sweep_plan.METRIC_TITLES[metric]} {LEVEL_NAMES[level]}' for level in LEVELS]
  header.append(f'verdict ({sweep_plan.METRIC_TITLES[HEADLINE_METRIC].lower()} '
                f'{LEVEL_NAMES[HEADLINE_LEVEL]})')
  rows = []
  for fraction_entry in entry['fractions']:
    for comparison in fraction_entry['comparisons'].values():
      cells = [_fraction_label(fraction_entry, cross_validated), comparison['name'],
               f'{comparison["num_subjects"]:,}']
      for metric in REPORT_METRICS:
        cells += [_difference(comparison[level][metric]) for level in LEVELS]
      cells.append(comparison[HEADLINE_LEVEL][HEADLINE_METRIC]['outcome'])
      rows.append(cells)
  return _table(header, rows) if rows else []


def _per_fold_table(entry, num_folds):
  header = ['labeled', 'arm', 'seed'] + [f'fold {k}' for k in range(num_folds)] + ['pooled']
  rows = []
  for fraction_entry in entry['fractions']:
    for arm_name, arm in fraction_entry['arms'].items():
      for seed in arm['seeds']:
        by_fold = {f['fold']: f for f in arm['per_fold'] if f['seed'] == seed}
        cells = [sweep_plan.percent_label(fraction_entry['fraction']),
                 sweep_plan.ARM_NAMES[arm_name], str(seed)]
        for k in range(num_folds):
          f = by_fold.get(k)
          cells.append('-' if f is None else
                       f'{100 * f["slice"]["balanced_accuracy"]:.1f} / '
                       f'{100 * f["subject"]["balanced_accuracy"]:.1f}')
        pooled = next(p for p in arm['per_seed'] if p['seed'] == seed)
        cells.append(f'{100 * pooled["slice"]["balanced_accuracy"]:.1f} / '
                     f'{100 * pooled["subject"]["balanced_accuracy"]:.1f}')
        rows.append(cells)
  return _table(header, rows)


def _selection_lines(selection):
  lines = []
  for group in selection['missing']:
    folds = [f for f in group['folds'] if f is not None]
    where = (f'of fold{"s" if len(folds) > 1 else ""} {_and(str(f) for f in folds)} '
             if folds else '')
    key = (group['key'] or 'selection metric').replace('_', ' ')
    lines.append(
        f'Missing classes in model selection: the {group["split"]} split {where}holds no '
        f'subject of {_and(group["missing"])}, so the selection metric ({group["split"]} '
        f'{key}) averages over {_and(group["averaged_over"])} only '
        f'({group["num_runs"]} of the {selection["num_trained_runs"]} trained runs).')
  return lines


def _md_verdicts(entry, cross_validated):
  lines = []
  for fraction_entry in entry['fractions']:
    comparison = fraction_entry['comparisons'].get('finetune-baseline')
    if comparison is None:
      lines.append(f'- {_fraction_label(fraction_entry, cross_validated)}: not both '
                   'SimCLR and the baseline have finished yet.')
      continue
    lines.append(f'- {_fraction_label(fraction_entry, cross_validated)}: '
                 f'{comparison["verdict"][HEADLINE_LEVEL]} Per slice: '
                 f'{comparison["verdict"]["slice"]}')
  return lines


def results_markdown(summary, config, figures=()):
  """results.md: the answer, the figures, then per protocol and task the tables."""
  lines = ['# Does SimCLR pretraining beat supervised training at few labels?', '',
           '**Answer.** ' + ' '.join(summary['answer']), '']
  if 'label_fraction_curve.png' in figures:
    lines += ['![Balanced accuracy and accuracy against the label fraction, per protocol '
              'and task, with 95 % intervals over subjects](label_fraction_curve.png)', '']
  fraction_note = ('labeled images per fold (the training subjects\' slices at that '
                   'fraction, nested and stratified)')
  lines += [
      f'Data: `{config.dataset}`; model {config.model} (width {config.width:g}, '
      f'{config.encoder_output}), {config.image_size} px, {config.channels} channel(s), '
      f'batch {config.batch_size}; SimCLR pretraining {config.pretrain_num_epochs} epochs '
      f'(SAM: {config.sam}, rho {config.sam_rho:g}); fine-tuning and baseline up to '
      f'{config.num_epochs} epochs'
      + (f', capped at about {config.max_steps_per_run} steps per run'
         if config.max_steps_per_run else '') + '. Arms: SimCLR (the pretrained encoder '
      'fine-tuned), baseline (the same classifier trained from scratch on the same labeled '
      'images), raw-pixel 1-NN (1-nearest-neighbour by correlation of the pixels, '
      f'area-downsampled to {config.floor_image_size or "the stored"} px, from the same '
      'labeled images, no training: the floor a learned model must clear).', '',
      'How to read the numbers. Test scores in %, pooled over the folds: under '
      'cross-validation every subject is tested once, by the fold that held it out, and '
      'the scores are those of all these out-of-fold predictions together. Per slice: '
      'every test slice counts; per subject: one prediction per person, the mean of the '
      'slices\' class probabilities. Brackets: 95 % percentile intervals of a stratified '
      'cluster bootstrap over subjects '
      f'({summary["bootstrap_samples"]:,} resamples, seeded by config.seed = '
      f'{summary["bootstrap_seed"]}): subjects are drawn with replacement within their '
      'class (each class keeps its number of subjects), each with all of their slices; '
      'both arms of a comparison are scored on the same draws (paired: same subjects, '
      'same labeled subsets); where several seeds ran, the statistic of a draw is the '
      'mean over the seeds, so the intervals are over subjects with seeds averaged, not '
      'over seeds. Differences are in points (a − b). Verdicts follow the intervals: '
      '"ahead" when the whole interval is above 0, "behind" when it is below 0, else no '
      f'difference detectable at this sample size. "Labeled": {fraction_note}.', '']
  wall = summary.get('wall_seconds')
  if wall:
    lines += [f'Wall time: {duration(wall["runs_total"])} summed over the '
              f'{summary["num_runs"]["finished"]} finished runs of '
              f'{summary["num_runs"]["planned"]} planned ({duration(wall["pretraining"])} '
              f'of it pretraining, {duration(wall["floor"])} the raw-pixel floor)'
              + ('' if wall['last_invocation'] is None else
                 f'; the last invocation of the sweep took '
                 f'{duration(wall["last_invocation"])}') + '.', '']
  for protocol, result in summary['protocols'].items():
    cross_validated = bool(result['num_folds'])
    description = result['description']
    lines += [f'## Protocol `{protocol}`', '',
              f'{description[0].upper()}{description[1:]}.', '']
    if protocol == 'reference':
      lines += [f'Still otherwise than the reference: {sweep_plan.REFERENCE_DIFFERENCES}.', '']
    if not result['tasks']:
      lines += ['No run of this protocol has finished yet.', '']
    for task, entry in result['tasks'].items():
      class_names = entry['class_names']
      pooled = (f'pooled over {entry["folds_pooled"]} of {entry["folds_planned"]} folds'
                if cross_validated else 'one split')
      per_class = ', '.join(f'{n} {c}' for n, c in zip(entry['subjects_per_class'],
                                                        class_names))
      lines += [f'### `{protocol}`, task `{task}` ({len(class_names)} classes)', '',
                f'Test: {entry["num_test_subjects"]:,} subjects ({per_class}), '
                f'{entry["num_test_slices"]:,} slices, {pooled}. Always answering the '
                f'majority class scores {100 * entry["majority_share"]:.1f} % accuracy '
                f'per slice and {100 * entry["subject_majority_share"]:.1f} % per subject; '
                f'chance balanced accuracy is {100 / len(class_names):.1f} %.', '',
                '#### Test scores (%, 95 % interval)', '']
      lines += _scores_table(entry, cross_validated) + ['']
      lines += ['#### Paired comparisons (a − b, points, 95 % interval)', '']
      lines += _comparisons_table(entry, cross_validated) + ['']
      lines += _md_verdicts(entry, cross_validated) + ['']
      if cross_validated:
        lines += ['#### Balanced accuracy per fold (%, per slice / per subject)', '']
        lines += _per_fold_table(entry, result['num_folds']) + ['']
      selection = _selection_lines(entry['selection'])
      if selection:
        lines += selection + ['']
  if 'confusion_matrices.png' in figures:
    lines += ['## Confusion matrices', '',
              '![Pooled out-of-fold confusion matrices of each arm, per slice and per '
              'subject](confusion_matrices.png)', '']
  if 'gradcam_grid.png' in figures:
    lines += ['## Where the SimCLR model looks', '',
              '![Grad-CAM of the most confident test image of each predicted class]'
              '(gradcam_grid.png)', '']
  if summary['inflation']:
    lines += ['## Honest vs reference protocol: how much the reference\'s choices inflate '
              'the scores', '',
              'Pooled test scores per slice under each protocol and the difference '
              '(reference − honest, in points): what the reference\'s numbers owe to its '
              'slice split, transductive pretraining and test-set selection (different '
              'test sets, so no paired interval).', '']
    rows = []
    for row in summary['inflation']:
      cells = [row['task'], sweep_plan.percent_label(row['fraction']),
               sweep_plan.ARM_NAMES[row['arm']]]
      for metric in ('accuracy', 'balanced_accuracy'):
        m = row[metric]
        cells += [f'{100 * m["honest"]:.1f}', f'{100 * m["reference"]:.1f}',
                  f'{m["inflation"]:+.1f}']
      rows.append(cells)
    lines += _table(['task', 'labeled', 'arm', 'accuracy honest', 'accuracy reference',
                     'inflation (pts)', 'bal. acc. honest', 'bal. acc. reference',
                     'inflation (pts)'], rows)
    lines.append('')
  return '\n'.join(lines)


def results_csv(rows):
  """results.csv: one line per finished run (per fold), then the pooled lines."""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction='ignore',
                          lineterminator='\r\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ('' if row[k] is None else row[k]) for k in CSV_COLUMNS})
  return out.getvalue()


# ----------------------------------------------------------------------------- writing


def _json_ready(value):
  """`value` with sets, tuples and numpy scalars made JSON types."""
  if isinstance(value, dict):
    return {str(k): _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set)):
    return [_json_ready(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def _wall_seconds(planned, rows):
  walls = [r['wall_seconds'] for r in rows if r['wall_seconds'] is not None]
  floor = [r['wall_seconds'] for r in rows
           if r['arm'] == 'floor' and r['wall_seconds'] is not None]
  pretrain = [runs.read_wall_time(run.workdir) for run in planned if run.arm == 'pretrain']
  pretrain = [wall for wall in pretrain if wall is not None]
  return {'runs_total': float(sum(walls) + sum(pretrain)), 'pretraining': float(sum(pretrain)),
          'floor': float(sum(floor))}, len(pretrain)


def write_reports(config, workdir, planned, arrays, elapsed=None, figures=True):
  """Writes results.csv, results.md, sweep.json and (with figures) the three PNGs.

  Reports cover the finished runs, so they can be written mid-sweep. Every process
  reads the runs and computes the Grad-CAM heatmaps (restoring is collective);
  only process 0 writes files.

  Returns:
    The aggregates (sweep.json's content).
  """
  rows = collect_rows(planned)
  pooled = pool_rows(rows, planned)
  summary = aggregate(config, rows, pooled)
  wall, num_pretrained = _wall_seconds(planned, rows)
  summary['wall_seconds'] = {**wall, 'last_invocation': elapsed}
  summary['num_runs'] = {
      'finished': len(rows) + num_pretrained, 'planned': len(planned),
      **{f'{arm}_finished': sum(r['arm'] == arm for r in rows) for arm in sweep_plan.ARMS},
      'pretrain_finished': num_pretrained}
  writer = jax.process_index() == 0
  written = set()
  if figures and pooled:
    if writer:
      plots.plot_label_fraction_curves(
          summary, runs.output_path(workdir, 'label_fraction_curve.png'))
      written.add('label_fraction_curve.png')
      if write_confusion_matrices(config, summary,
                                  runs.output_path(workdir, 'confusion_matrices.png')):
        written.add('confusion_matrices.png')
    if write_gradcam_grid(config, rows, arrays,
                          runs.output_path(workdir, 'gradcam_grid.png')) is not None:
      written.add('gradcam_grid.png')
  if writer:
    # Figures of an earlier, complete report stay linked while runs are added.
    present = {name for name in FIGURES if runs.output_path(workdir, name).exists()}
    cross_validated = [r for r in pooled if r['fold'] == 'pooled']
    runs.write_text(runs.output_path(workdir, 'results.csv'),
                    results_csv(rows + sorted(cross_validated, key=_csv_order)))
    runs.write_text(runs.output_path(workdir, 'results.md'),
                    results_markdown(summary, config, written | present))
    runs.write_json(runs.output_path(workdir, 'sweep.json'), _json_ready(summary))
  return summary


def _csv_order(row):
  return (row['protocol'], row['task'], row['fraction'], row['seed'],
          sweep_plan.ARMS.index(row['arm']))


def write_confusion_matrices(config, summary, path):
  """Pooled confusion matrices of the first protocol with folds (honest): every task.

  Rows: task x the smallest and the largest fraction; columns: arm x level (per
  slice, per subject); the first seed's pooled out-of-fold predictions.

  Returns:
    Whether a figure was written.
  """
  protocols = summary['protocols']
  protocol = next((p for p in protocols if protocols[p]['num_folds']), config.protocols[0])
  grid, class_rows = [], []
  for task, entry in protocols[protocol]['tasks'].items():
    fractions = entry['fractions']
    for fraction_entry in ([fractions[0], fractions[-1]] if len(fractions) > 1
                           else fractions):
      row = []
      for arm in sweep_plan.ARMS:
        arm_entry = fraction_entry['arms'].get(arm)
        for level in LEVELS:
          if arm_entry is None:
            row.append(None)
            continue
          value = arm_entry[level][HEADLINE_METRIC]['value']
          title = (f'{sweep_plan.ARM_NAMES[arm]}, {LEVEL_NAMES[level]}\n{task}, '
                   f'{sweep_plan.percent_label(fraction_entry["fraction"])} labels, '
                   f'bal. acc. {100 * value:.1f} %')
          row.append((arm_entry['confusion'][level], title, entry['class_names']))
      grid.append(row)
      class_rows.append(entry['class_names'])
  if not grid:
    return False
  plots.plot_confusion_grid(
      grid, class_rows[0], path,
      title=f'Pooled out-of-fold test confusion matrices, protocol {protocol} (first seed; '
            'rows: task and label fraction)')
  return True


def write_gradcam_grid(config, rows, arrays, path):
  """Grad-CAM of the best SimCLR run at the largest fraction, on its own fold's test split.

  The run: the first protocol's and first task's SimCLR (finetune) runs at their
  largest fraction, the one with the best selection-split score (never chosen on
  test unless the protocol does); its test split is that of its fold. Every
  process computes the heatmaps (restoring is collective); process 0 draws.

  Returns:
    The figure (process 0), or None.
  """
  protocol, task = config.protocols[0], config.tasks[0]
  candidates = [r for r in rows if r['protocol'] == protocol and r['task'] == task
                and r['arm'] == 'finetune']
  if not candidates:
    return None
  largest = max(r['fraction'] for r in candidates)
  candidates = [r for r in candidates if math.isclose(r['fraction'], largest)]
  best = max(candidates, key=lambda r: (r['selection'] if r['selection'] is not None
                                        else -math.inf, -r['seed'],
                                        -(r['fold'] or 0)))
  run_config, model, variables = runs.restore_for_inference(best['workdir'])
  test_idx = sweep_plan.protocol_splits(config, protocol, arrays, best['fold'])['test']
  labels, class_names = data_lib.task_labels(arrays, sweep_plan.task_config(config, task))
  explanation = explain.explain(model, variables, arrays.images[test_idx], run_config,
                                config.cam_method, config.cam_layer,
                                batch_size=config.eval_batch_size)
  if jax.process_index() != 0:
    return None
  fold = '' if best['fold'] is None else f', fold {best["fold"]}'
  selection = ''
  if best['selection'] is not None:
    key = str(best['selection_key']).replace('_', ' ')
    selection = f', best {best["selection_split"]} {key} {100 * best["selection"]:.1f} %'
  return explain.write_gradcam_grid(
      path, arrays.images[test_idx], explanation, arrays.file_names[test_idx], class_names,
      f'{explain.CAM_NAMES[config.cam_method]} ({config.cam_layer})',
      f'SimCLR fine-tuned on {sweep_plan.percent_label(largest)} of the labels, protocol '
      f'{protocol}, task {task}{fold}, seed {best["seed"]}{selection}:\n'
      'the most confident image of each predicted class among its test subjects', labels=labels[test_idx])

