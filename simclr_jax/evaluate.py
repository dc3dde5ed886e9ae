"""Classification metrics, the kNN monitor and the confusion matrix.

clu.metrics averages per-batch values; balanced accuracy and macro-F1 need the
whole confusion matrix, so evaluation collects predictions on the host and computes
these here from the confusion matrix (a few lines of numpy).
"""

import numpy as np

from simclr_jax import neighbours


def confusion_matrix(labels, predictions, num_classes):
  """Counts [true class, predicted class]."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def metrics_from_confusion(matrix):
  """Accuracy, balanced accuracy, macro-F1 and per-class recall of a confusion matrix.

  Classes absent from the labels are left out of the balanced accuracy and of the
  macro-F1, so a split without a class is not penalised for it.
  """
  matrix = np.asarray(matrix, np.float64)
  support = matrix.sum(axis=1)
  predicted = matrix.sum(axis=0)
  correct = np.diag(matrix)
  present = support > 0
  recall = np.divide(correct, support, out=np.zeros_like(correct), where=present)
  precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
  denominator = precision + recall
  f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(correct),
                 where=denominator > 0)
  total = matrix.sum()
  return {
      'accuracy': float(correct.sum() / total) if total else 0.0,
      'balanced_accuracy': float(recall[present].mean()) if present.any() else 0.0,
      'macro_f1': float(f1[present].mean()) if present.any() else 0.0,
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
