"""Classification metrics: per slice and per subject, from confusion matrices.

clu.metrics averages per-batch values; balanced accuracy and macro-F1 need the
whole confusion matrix, so evaluation collects predictions on the host and the
metrics come from confusion matrices here (`metrics_of_confusions` is the one
implementation, also for the bootstrap's stacks of matrices). `Predictions` holds
a classifier's probabilities for rows of the data set; `subject_level` turns them
into one prediction per person (the mean of the slices, or ClinicaDL's soft vote
weighted by slice position, `position_scores`). `knn_monitor` scores embeddings
by kNN votes.
"""

import dataclasses

from etils import epath
import numpy as np
import scipy.special

from simclr_jax.metrics import neighbours


def metrics_of_confusions(matrices):
  """Accuracy, balanced accuracy and macro-F1 of confusion matrices [..., K, K].

  Balanced accuracy averages the recall of the classes present in the labels (a
  split without a class is not penalised for it), macro-F1 the F1 of the classes
  present in the labels or the predictions (scikit-learn's convention). The one
  implementation: `metrics_from_confusion` reports these for one matrix.

  Returns:
    {metric: float64 array [...]}.
  """
  matrices = np.asarray(matrices, np.float64)
  support = matrices.sum(-1)
  predicted = matrices.sum(-2)
  correct = np.diagonal(matrices, axis1=-2, axis2=-1)
  total = support.sum(-1)
  present = support > 0
  recall = np.divide(correct, support, out=np.zeros_like(correct), where=present)
  precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
  denominator = precision + recall
  f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(correct),
                 where=denominator > 0)
  counted = present | (predicted > 0)
  safe = lambda n: np.maximum(n, 1)
  return {
      'accuracy': np.where(total > 0, correct.sum(-1) / safe(total), 0.0),
      'balanced_accuracy': np.where(present.any(-1), (recall * present).sum(-1)
                                    / safe(present.sum(-1)), 0.0),
      'macro_f1': np.where(total > 0, (f1 * counted).sum(-1) / safe(counted.sum(-1)), 0.0),
  }


def softmax(logits):
  """Class probabilities of logits [..., K], computed in float64 on the host."""
  return scipy.special.softmax(np.asarray(logits, np.float64), axis=-1)


def confusion_matrix(labels, predictions, num_classes):
  """Counts [true class, predicted class]."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def metrics_from_confusion(matrix):
  """Accuracy, balanced accuracy, macro-F1 and per-class recall of a confusion matrix.

  Balanced accuracy averages the recall of the classes present in the labels (a
  split without a class is not penalised for it); macro-F1 averages the F1 of the
  classes present in the labels or the predictions (scikit-learn's convention: a
  class predicted but absent scores 0).
  """
  matrix = np.asarray(matrix, np.float64)
  support = matrix.sum(axis=1)
  present = support > 0
  recall = np.divide(np.diag(matrix), support, out=np.zeros_like(support), where=present)
  total = matrix.sum()
  return {
      **{name: float(value) for name, value in metrics_of_confusions(matrix).items()},
      'per_class_recall': [float(r) if p else None for r, p in zip(recall, present)],
      'num_examples': int(total),
  }


def classification_metrics(labels, predictions, num_classes):
  """Every reported classification metric, plus the confusion matrix as a list."""
  matrix = confusion_matrix(labels, predictions, num_classes)
  result = metrics_from_confusion(matrix)
  result['confusion_matrix'] = matrix.tolist()
  return result


def knn_monitor(train_embeddings, train_labels, query_embeddings, query_labels,
                ks, num_classes):
  """kNN accuracy of embeddings (cosine), as the reference monitored pretraining.

  Returns:
    {'knn{k}_accuracy': ..., 'knn{k}_balanced_accuracy': ...} for each k that is
    not larger than the memory bank.
  """
  ks = [k for k in ks if k <= len(train_labels)]
  if not ks:
    return {}
  # One neighbour search with the largest k; each k votes on its first k neighbours.
  indices, similarities = neighbours.nearest_neighbours(
      query_embeddings, train_embeddings, k=max(ks), metric='cosine')
  neighbour_labels = np.asarray(train_labels)[indices]
  result = {}
  for k in ks:
    predictions = neighbours.knn_vote(neighbour_labels[:, :k], similarities[:, :k],
                                      num_classes)
    m = metrics_from_confusion(confusion_matrix(query_labels, predictions, num_classes))
    result[f'knn{k}_accuracy'] = m['accuracy']
    result[f'knn{k}_balanced_accuracy'] = m['balanced_accuracy']
  return result


@dataclasses.dataclass
class Predictions:
  """A classifier's class probabilities for rows of the data set, with their truth."""
  rows: np.ndarray  # int64 [n] rows of the data set.
  subject_ids: np.ndarray  # int64 [n].
  labels: np.ndarray  # int32 [n] true classes (of the run's task).
  probabilities: np.ndarray  # float32 [n, K].

  def save(self, path):
    """Writes the arrays as .npz (a local path or a URL)."""
    with epath.Path(path).open('wb') as f:
      np.savez(f, **dataclasses.asdict(self))

  @classmethod
  def load(cls, path):
    with epath.Path(path).open('rb') as f:
      arrays = np.load(f)
      return cls(**{field.name: arrays[field.name] for field in dataclasses.fields(cls)})


def subject_level(predictions, position_weights=None, positions=None):
  """Per-person predictions: the mean of the slice probabilities of each subject.

  Soft voting as in ClinicaDL's slice-level models: with `position_weights`, a
  subject's probabilities are the weighted mean of its slices' probabilities,
  each slice weighted by its position's weight (ClinicaDL: the position's
  validation (balanced) accuracy, `position_scores`; a weight of 0 leaves the
  position out). By default every slice counts equally (the plain mean).

  Args:
    predictions: slice-level `Predictions`.
    position_weights: optional float [P], non-negative, one weight per slice position.
    positions: int [n], the position (0 to P - 1) of each row; with `position_weights`.

  Returns:
    Predictions with one row per subject (rows: the subject's first row; label:
    its slices' majority class), sorted by subject id.

  Raises:
    ValueError: positions and weights that do not fit, or a subject whose slices
      all have weight 0.
  """
  subjects, first, inverse = np.unique(predictions.subject_ids, return_index=True,
                                       return_inverse=True)
  inverse = inverse.ravel()
  num_classes = predictions.probabilities.shape[1]
  probabilities = np.zeros((len(subjects), num_classes))
  if position_weights is None:
    if positions is not None:
      raise ValueError('positions are given without position_weights.')
    counts = np.bincount(inverse, minlength=len(subjects)).astype(np.float64)
    np.add.at(probabilities, inverse, predictions.probabilities)
  else:
    weights = _slice_weights(position_weights, positions, len(inverse))
    counts = np.bincount(inverse, weights=weights, minlength=len(subjects))
    if (counts <= 0).any():
      raise ValueError(f'Subjects {subjects[counts <= 0][:5].tolist()} have no slice at a '
                       'position of positive weight.')
    np.add.at(probabilities, inverse,
              np.asarray(predictions.probabilities, np.float64) * weights[:, None])
  label_counts = np.zeros((len(subjects), num_classes), np.int64)
  np.add.at(label_counts, (inverse, predictions.labels), 1)
  return Predictions(rows=predictions.rows[first], subject_ids=subjects,
                     labels=label_counts.argmax(1).astype(np.int32),
                     probabilities=(probabilities / counts[:, None]).astype(np.float32))


def _slice_weights(position_weights, positions, num_rows):
  """float64 [n]: each row's position weight, checked."""
  position_weights = np.asarray(position_weights, np.float64)
  if positions is None:
    raise ValueError('position_weights need positions (the position of each row).')
  positions = np.asarray(positions)
  if position_weights.ndim != 1 or positions.shape != (num_rows,):
    raise ValueError(f'Expected position_weights [P] and positions [{num_rows}], got '
                     f'{position_weights.shape} and {positions.shape}.')
  if not np.all(np.isfinite(position_weights)) or (position_weights < 0).any():
    raise ValueError('position_weights must be finite and non-negative.')
  if num_rows and (positions.min() < 0 or positions.max() >= len(position_weights)):
    raise ValueError(f'positions must lie in 0..{len(position_weights) - 1}.')
  return position_weights[positions]


def position_scores(predictions, positions, num_positions, metric='balanced_accuracy'):
  """float64 [P]: the metric of each slice position's rows (validation predictions).

  ClinicaDL's soft-voting weights: pass the result as `subject_level`'s
  `position_weights`. A position without rows scores 0.
  """
  positions = np.asarray(positions)
  num_classes = predictions.probabilities.shape[1]
  cells = (positions * num_classes + predictions.labels) * num_classes + (
      predictions.probabilities.argmax(-1))
  matrices = np.bincount(cells, minlength=num_positions * num_classes**2).reshape(
      num_positions, num_classes, num_classes)
  return metrics_of_confusions(matrices)[metric]


def prediction_metrics(predictions, num_classes, position_weights=None, positions=None):
  """Slice-level classification metrics, and the subject-level ones under 'subject'.

  `position_weights` and `positions`: the subject vote's weighting (`subject_level`).
  """
  result = classification_metrics(predictions.labels, predictions.probabilities.argmax(-1),
                                  num_classes)
  subjects = subject_level(predictions, position_weights, positions)
  result['subject'] = classification_metrics(subjects.labels,
                                             subjects.probabilities.argmax(-1), num_classes)
  result['num_subjects'] = int(len(subjects.subject_ids))
  return result
