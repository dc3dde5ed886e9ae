"""Evaluation: metrics, the evaluators a training run calls, precise BatchNorm.

clu.metrics averages per-batch values; balanced accuracy and macro-F1 need the
whole confusion matrix, so evaluation collects predictions on the host and computes
these here from the confusion matrix (a few lines of numpy).

An evaluator has one method, `run(state) -> {name: value}`: `ClassifierEvaluator`
(classification metrics of a split) and `KnnEvaluator` (the pretraining's kNN
monitor). `PreciseBatchStats` is a hook a run may apply before evaluating.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import input_pipeline
from simclr_jax import models
from simclr_jax import neighbours
from simclr_jax import sharding


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


# ----------------------------------------------------------------------------- evaluators


def predict(infer_step, state, arrays, idx, config, mesh):
  """`infer_step(state, images)` over the rows `idx`, in padded global batches.

  Returns:
    numpy outputs of the rows of `idx`, in order (the padding dropped).
  """
  outputs = []
  batches = input_pipeline.eval_batches(
      arrays, idx, config, batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  for batch in sharding.prefetch(batches, sharding.data_sharding(mesh)):
    out, valid = sharding.to_host((infer_step(state, batch['image']), batch['valid']))
    outputs.append(out[valid])
  return np.concatenate(outputs)


@dataclasses.dataclass
class ClassifierEvaluator:
  """Classification metrics of a classifier on the rows `idx` of the data set."""
  infer: Callable[[Any, np.ndarray], np.ndarray]  # (state, idx) -> logits [len(idx), K].
  idx: np.ndarray
  labels: np.ndarray  # Labels of the whole data set.
  num_classes: int

  def run(self, state):
    logits = self.infer(state, self.idx)
    return classification_metrics(self.labels[self.idx], logits.argmax(-1),
                                  self.num_classes)


@dataclasses.dataclass
class KnnEvaluator:
  """kNN accuracy of the embeddings of `idx` against those of `memory_idx` (labeled)."""
  infer: Callable[[Any, np.ndarray], np.ndarray]  # (state, idx) -> embeddings.
  idx: np.ndarray
  memory_idx: np.ndarray
  labels: np.ndarray  # Labels of the whole data set.
  ks: tuple[int, ...]
  num_classes: int

  def run(self, state):
    return knn_monitor(self.infer(state, self.memory_idx), self.labels[self.memory_idx],
                       self.infer(state, self.idx), self.labels[self.idx], self.ks,
                       self.num_classes)


class PreciseBatchStats:
  """Before an evaluation: BatchNorm statistics recomputed with the current weights.

  The mean over `num_batches` batches (of `config.batch_size` unaugmented
  training images, a fixed seeded draw) of each batch's statistics, as
  detectron2's PreciseBN. Running averages lag behind fast-moving weights and
  describe augmented crops; on short runs they can make the evaluated network
  answer one class while the same weights with fresh statistics do not.
  """

  def __init__(self, arrays, train_idx, config, mesh):
    self.arrays, self.config, self.mesh = arrays, config, mesh
    num = config.precise_bn_batches * config.batch_size
    order = np.random.default_rng(config.seed).permutation(train_idx)
    usable = max(config.batch_size,
                 min(num, len(order)) // config.batch_size * config.batch_size)
    self.idx = np.resize(order, usable)  # Repeats the images when fewer than one batch.
    self.step = jax.jit(_batch_stats_step,
                        in_shardings=(sharding.replicated_sharding(mesh),
                                      sharding.data_sharding(mesh)),
                        out_shardings=sharding.replicated_sharding(mesh))

  def __call__(self, state):
    batches = input_pipeline.eval_batches(
        self.arrays, self.idx, self.config, batch_size=self.config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    total, count = None, 0
    for batch in sharding.prefetch(batches, sharding.data_sharding(self.mesh)):
      stats = self.step(state, batch['image'])
      total = stats if total is None else jax.tree.map(jnp.add, total, stats)
      count += 1
    return state.replace(batch_stats=jax.tree.map(lambda s: s / count, total))


def _batch_stats_step(state, images):
  """The BatchNorm statistics of one batch in training mode."""
  # From zero running averages, one update leaves (1 - momentum) * the batch's own.
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  _, updates = state.apply_fn({'params': state.params, 'batch_stats': zeros}, images,
                              train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(0)})
  return jax.tree.map(lambda s: s / (1.0 - models.BN_MOMENTUM), updates['batch_stats'])
