"""The rows of a sweep's report: one per finished run (per fold), and one per pooled cell.

A run's row is scored from its test predictions (`records.py`): the confusion
metrics (accuracy, balanced accuracy, macro-F1) and those of the probabilities
(ROC AUC, sensitivity and specificity of a binary task, Brier score, expected
calibration error; `metrics/calibration.py`), per slice and per subject (one
prediction per person, the mean of the slices' probabilities). Under
cross-validation a cell's folds are pooled: their out-of-fold predictions are
joined and scored again (`pool_rows`). These are results.csv's lines; the
aggregates and intervals are `results.py`'s.
"""

import collections
import dataclasses

import numpy as np

from simclr_jax.data import splits as splits_lib
from simclr_jax.metrics import bootstrap
from simclr_jax.metrics import calibration
from simclr_jax.metrics import classification
from simclr_jax.study import plan as plan_lib

# Every metric of a run, per slice and (subject_) per subject: the confusion metrics,
# then those of the probabilities ('sensitivity' and 'specificity' of binary tasks only).
METRICS = bootstrap.ALL_METRICS
METRIC_COLUMNS = METRICS + tuple(f'subject_{m}' for m in METRICS)
# budget: '10 %', '4 subjects' or 'all subjects'; budget_unit and budget_size: its
# `splits.Budget` (slice and a fraction, or subject and k, 0 for all); num_labeled: slices.
CSV_COLUMNS = ('protocol', 'task', 'arm', 'budget', 'budget_unit', 'budget_size', 'seed',
               'fold', 'folds_pooled', 'num_labeled', 'num_labeled_subjects',
               'num_test_slices', 'num_test_subjects', *METRIC_COLUMNS, 'chosen_step',
               'selection', 'wall_seconds')


def task_metrics(num_classes):
  """The metrics of a task: all of METRICS for two classes, else all but sensitivity
  and specificity."""
  return tuple(m for m in METRICS
               if num_classes == 2 or m not in ('sensitivity', 'specificity'))


# ----------------------------------------------------------------------------- rows


def prediction_scores(predictions, num_classes):
  """The metric columns of a prediction set (None where a task has no such metric),
  its sizes and its confusion matrices, per slice and per subject."""
  metrics = classification.prediction_metrics(predictions, num_classes)
  subjects = classification.subject_level(predictions)
  names = [m for m in task_metrics(num_classes) if m in calibration.METRICS]
  row = {m: None for m in METRIC_COLUMNS}
  # Rows grouped by subject (each weighing 1: the same values) keep the AUC's tables small.
  units = np.unique(predictions.subject_ids, return_inverse=True)[1].ravel()
  for prefix, source, scored, unit in (('', metrics, predictions, units),
                                       ('subject_', metrics['subject'], subjects, None)):
    row.update({f'{prefix}{m}': source[m] for m in plan_lib.METRICS})
    values = calibration.probability_metrics(scored.labels, scored.probabilities, units=unit,
                                             metrics=names)
    row.update({f'{prefix}{m}': float(v) for m, v in values.items()})
  row.update(num_test_slices=metrics['num_examples'], num_test_subjects=metrics['num_subjects'],
             confusion_matrix=metrics['confusion_matrix'],
             subject_confusion_matrix=metrics['subject']['confusion_matrix'])
  return row


def _recorded_scores(record):
  """The metric columns of a run without predictions, from its metrics.json (`records`)."""
  row = {m: None for m in METRIC_COLUMNS}
  row.update(record['metrics'])
  row.update({f'subject_{m}': v for m, v in record['subject_metrics'].items()})
  row.update({k: record[k] for k in ('num_test_slices', 'num_test_subjects',
                                     'confusion_matrix', 'subject_confusion_matrix')})
  return row


def collect_rows(records):
  """One dict per finished floor, baseline or finetune run (the per-fold rows of results.csv).

  Each row holds the CSV columns, scored from the run's predictions (a run without
  them: its metrics.json's), and, for the report, the `predictions` (or None),
  confusion matrices, class names and selection details.
  """
  rows = []
  for record in records:
    predictions = record['predictions']
    scores = (_recorded_scores(record) if predictions is None else
              prediction_scores(predictions, len(record['class_names'])))
    rows.append({
        **{k: record[k] for k in ('protocol', 'task', 'arm', 'budget', 'seed', 'fold',
                                  'num_labeled', 'num_labeled_subjects', 'chosen_step',
                                  'selection', 'wall_seconds', 'selection_split',
                                  'selection_key', 'selection_classes', 'class_names')},
        'budget_unit': record['budget'].unit, 'budget_size': record['budget'].size,
        'folds_pooled': 1, **scores, 'predictions': predictions,
        'workdir': record.get('workdir')})
  return rows


def _cell_key(row):
  return row['protocol'], row['task'], row['arm'], row['budget'], row['seed']


def _concatenate(predictions):
  return classification.Predictions(
      *(np.concatenate([getattr(p, f.name) for p in predictions])
        for f in dataclasses.fields(classification.Predictions)))


def planned_folds(plan):
  """{(protocol, task, arm, budget, seed): planned folds} of `records.plan_entries`."""
  counts = collections.Counter(
      (e['protocol'], e['task'], e['arm'], splits_lib.Budget.from_dict(e['budget']), e['seed'])
      for e in plan)
  return dict(counts)


def pool_rows(rows, plan):
  """One pooled row per (protocol, task, arm, budget, seed): its folds' predictions joined.

  Under cross-validation each subject is in exactly one fold's test split, so the
  concatenation of the finished folds' test predictions holds every subject once
  (each subject of those folds). A protocol without folds has one run per cell,
  which is its own pooled row. Metrics are recomputed from the pooled predictions.

  Args:
    rows: `collect_rows`' rows.
    plan: `records.plan_entries` of the sweep (for the planned folds of each cell).

  Returns:
    Rows like `collect_rows`'s with fold 'pooled' (None without folds),
    folds_pooled and folds_planned; rows without predictions are left out.
  """
  planned = planned_folds(plan)
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
    walls = [r['wall_seconds'] for r in group if r['wall_seconds'] is not None]
    pooled.append({
        **{k: group[0][k] for k in ('protocol', 'task', 'arm', 'budget', 'budget_unit',
                                    'budget_size', 'seed', 'selection_split',
                                    'selection_key')},
        'fold': 'pooled' if cross_validated else None, 'folds_pooled': len(group),
        'folds_planned': planned.get(key, 0) or len(group),
        'folds': [r['fold'] for r in group],
        'num_labeled': int(round(np.mean([r['num_labeled'] for r in group]))),
        'num_labeled_subjects': _mean([r['num_labeled_subjects'] for r in group]),
        **prediction_scores(predictions, len(class_names)),
        'chosen_step': None if cross_validated else group[0]['chosen_step'],
        'selection': None if cross_validated else group[0]['selection'],
        'wall_seconds': float(sum(walls)) if walls else None,
        'class_names': class_names, 'predictions': predictions, 'fold_rows': group,
    })
  return pooled


def _mean(values):
  """The rounded mean of the values that are known, or None."""
  values = [v for v in values if v is not None]
  return int(round(np.mean(values))) if values else None
