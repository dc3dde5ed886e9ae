"""The sweep's runs as records, and their out-of-fold predictions in one file (predictions.npz).

Every number, interval and figure of a sweep's report is a function of the sweep's
config and of these records, so the sweep writes them next to results.md and
`study/recompute.py` rebuilds the report from that file alone.

A record is one finished floor, baseline or finetune run: its coordinates
(protocol, task, fold, arm, budget, seed), what it was trained on and how its
checkpoint was chosen (`INFO_FIELDS`), and its test predictions
(`classification.Predictions`, None where the run wrote none; its metrics from
metrics.json then stand in, `METRICS_FIELDS`). Beside the records the file keeps
the plan (every planned run's coordinates, for "k of K folds"), the run counts and
wall times, and each pretraining's curves (`curves.jsonl`: loss, kNN and linear-probe
balanced accuracy on the selection split).

predictions.npz holds one row per test slice of every run, in run order:
`run` (index into meta['runs']), `row` (data set row), `subject_id`,
`slice_index` (the slice's position in its volume, from the data set; -1 unknown),
`label` and `probabilities` (float32 [N, K], the largest task's K, NaN past a
task's classes); and `meta`, the JSON text of everything else (the runs'
coordinates and info, plan, counts, wall times, curves). numpy reads it with
`np.load(path)`; no pickle.
"""

import io
import json

from absl import logging
import numpy as np

from simclr_jax.data import splits as splits_lib
from simclr_jax.metrics import classification
from simclr_jax.study import plan as plan_lib
from simclr_jax.train import curves as curves_lib
from simclr_jax.train import workdirs

PREDICTIONS_FILE = 'predictions.npz'
FORMAT = 1
KEY_FIELDS = ('protocol', 'task', 'fold', 'arm', 'seed')  # And 'budget'.
INFO_FIELDS = ('num_labeled', 'num_labeled_subjects', 'chosen_step', 'selection',
               'selection_split', 'selection_key', 'selection_classes', 'class_names',
               'wall_seconds')
# A run without predictions: what its metrics.json says instead.
METRICS_FIELDS = ('num_test_slices', 'num_test_subjects', 'metrics', 'subject_metrics',
                  'confusion_matrix', 'subject_confusion_matrix')
# A pretraining's curves: the loss, and the monitors on its selection split.
CURVE_KEYS = {'loss': 'train/loss', 'knn': 'knn1_balanced_accuracy',
              'probe': 'probe_balanced_accuracy'}


def _selection(metrics):
  """(split, key, value) of the `selection_<split>_<key>` entry, or (None, None, None)."""
  for name, value in metrics.items():
    if (name.startswith('selection_') and '_' in name[len('selection_'):]
        and isinstance(value, (int, float)) and not isinstance(value, bool)):
      split, key = name[len('selection_'):].split('_', 1)
      return split, key, value
  return None, None, None


def from_workdirs(planned):
  """The records of the finished floor, baseline and finetune runs of a sweep's plan."""
  records = []
  for run in planned:
    if run.arm == 'pretrain' or not run.finished:
      continue
    metrics = workdirs.read_metrics(run.workdir)
    path = workdirs.predictions_path(run.workdir)
    predictions = classification.Predictions.load(path) if path.exists() else None
    split, key, value = _selection(metrics)
    record = {
        'protocol': run.protocol, 'task': run.task, 'fold': run.fold, 'arm': run.arm,
        'budget': run.budget, 'seed': run.seed,
        'num_labeled': metrics.get('num_train_images', run.num_labeled),
        'num_labeled_subjects': metrics.get('num_train_subjects', run.num_labeled_subjects),
        'chosen_step': metrics.get('chosen_step'), 'selection': value,
        'selection_split': split, 'selection_key': key,
        'selection_classes': metrics.get('selection_classes'),
        'class_names': list(metrics['class_names']),
        'wall_seconds': workdirs.read_wall_time(run.workdir),
        'predictions': predictions, 'workdir': run.workdir}
    if predictions is None:
      logging.warning('%s has no %s: left out of the pooled results.', run.workdir,
                      workdirs.PREDICTIONS_FILE)
      record.update({
          'num_test_slices': metrics['num_examples'],
          'num_test_subjects': metrics.get('num_subjects'),
          'metrics': {m: metrics[m] for m in plan_lib.METRICS},
          'subject_metrics': {m: metrics['subject'][m] for m in plan_lib.METRICS},
          'confusion_matrix': metrics['confusion_matrix'],
          'subject_confusion_matrix': metrics['subject']['confusion_matrix']})
    records.append(record)
  return records


def plan_entries(planned):
  """The coordinates of every planned floor, baseline and finetune run (JSON-ready)."""
  return [{**{k: getattr(run, k) for k in KEY_FIELDS}, 'budget': run.budget.to_dict()}
          for run in planned if run.arm in plan_lib.ARMS]


def pretraining_curves(planned):
  """[{'protocol', 'fold', 'split', 'lines': [{'step', 'loss' | 'knn' | 'probe'}]}] per pretraining.

  From each pretraining's curves.jsonl: the training loss, and the kNN (k = 1) and
  linear-probe balanced accuracy on its selection split (the fold's validation
  subjects under the honest protocol). Pretrainings without curves are left out.
  """
  result = []
  for run in planned:
    if run.arm != 'pretrain':
      continue
    split = run.config.eval.selection_split
    lines = []
    for line in curves_lib.read_curves(run.workdir):
      values = {name: line[key if name == 'loss' else f'{split}/{key}']
                for name, key in CURVE_KEYS.items()
                if (key if name == 'loss' else f'{split}/{key}') in line}
      if values:
        lines.append({'step': int(line['step']), **values})
    if lines:
      result.append({'protocol': run.protocol, 'fold': run.fold, 'split': split,
                     'task': run.config.labels.task, 'lines': lines})
  return result


# ----------------------------------------------------------------------------- the file


def json_ready(value):
  """`value` with budgets, sets, tuples and numpy scalars made JSON types."""
  if isinstance(value, splits_lib.Budget):
    return value.to_dict()
  if isinstance(value, dict):
    return {str(k): json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set)):
    return [json_ready(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def to_bytes(records, slice_index, meta):
  """predictions.npz's bytes (the module docstring).

  Args:
    records: `from_workdirs`' records.
    slice_index: int [rows of the data set], each row's slice position (-1 unknown).
    meta: JSON-ready extras: 'plan', 'num_runs', 'wall_seconds', 'curves'.
  """
  runs, parts = [], []
  with_predictions = [r['predictions'] for r in records if r['predictions'] is not None]
  num_classes = max([p.probabilities.shape[1] for p in with_predictions] or [1])
  for index, record in enumerate(records):
    info = {k: v for k, v in record.items() if k not in ('predictions', 'workdir')}
    predictions = record['predictions']
    info['num_rows'] = 0 if predictions is None else int(len(predictions.labels))
    runs.append(json_ready(info))
    if predictions is not None:
      probabilities = np.full((len(predictions.labels), num_classes), np.nan, np.float32)
      probabilities[:, :predictions.probabilities.shape[1]] = predictions.probabilities
      parts.append((np.full(len(predictions.labels), index, np.int32), predictions,
                    probabilities))
  column = lambda get, dtype: (np.concatenate([get(p) for p in parts]).astype(dtype)
                               if parts else np.zeros(0, dtype))
  rows = column(lambda p: p[1].rows, np.int64)
  arrays = {
      'run': column(lambda p: p[0], np.int32), 'row': rows.astype(np.int32),
      'subject_id': column(lambda p: p[1].subject_ids, np.int64),
      'slice_index': np.asarray(slice_index)[rows].astype(np.int32),
      'label': column(lambda p: p[1].labels, np.int16),
      'probabilities': (np.concatenate([p[2] for p in parts]) if parts
                        else np.zeros((0, num_classes), np.float32)),
      'meta': np.array(json.dumps({'format': FORMAT, 'runs': runs, **json_ready(meta)},
                                  sort_keys=True))}
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  return buffer.getvalue()


def load(path):
  """(records, meta) of a predictions.npz: the records as `from_workdirs` gives them.

  The records' predictions are the stored ones (float32 probabilities, bit for
  bit); their 'workdir' is None.
  """
  with open(path, 'rb') as f:
    data = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
  meta = json.loads(str(data.pop('meta')))
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path} has format {meta.get("format")}, not {FORMAT}.')
  records, start = [], 0
  for info in meta.pop('runs'):
    record = dict(info)
    record['budget'] = splits_lib.Budget.from_dict(info['budget'])
    stop = start + record.pop('num_rows')
    record['predictions'] = None
    if stop > start:
      num_classes = len(record['class_names'])
      record['predictions'] = classification.Predictions(
          rows=data['row'][start:stop].astype(np.int64),
          subject_ids=data['subject_id'][start:stop],
          labels=data['label'][start:stop].astype(np.int32),
          probabilities=np.ascontiguousarray(data['probabilities'][start:stop, :num_classes]))
      record['slice_index'] = data['slice_index'][start:stop]
    record['workdir'] = None
    records.append(record)
    start = stop
  return records, meta
