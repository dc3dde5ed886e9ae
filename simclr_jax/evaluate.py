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

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from simclr_jax import input_pipeline
from simclr_jax import augment
from simclr_jax import models
from simclr_jax import neighbours
from simclr_jax import sharding
from simclr_jax import state as state_lib
from simclr_jax import stats


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
      **{name: float(value) for name, value in stats.metrics_of_confusions(matrix).items()},
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


def predict(infer, state, device_data, idx, batch_size):
  """`infer(state, data, inputs)` over the data set's rows `idx`, in padded global batches.

  The outputs stay on the devices until every batch has run: one transfer at the end.

  Returns:
    numpy outputs of the rows of `idx`, in order (the padding dropped).
  """
  rows, count = input_pipeline.eval_rows(idx, batch_size)
  outputs = [infer(state, device_data.arrays, device_data.inputs({'row': rows[i:i + batch_size]}))
             for i in range(0, len(rows), batch_size)]
  return np.concatenate(sharding.to_host(outputs))[:count]


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


def subject_level(predictions):
  """Per-person predictions: the mean of the slice probabilities of each subject.

  Returns:
    Predictions with one row per subject (rows: the subject's first row; label:
    its slices' majority class), sorted by subject id.
  """
  subjects, first, inverse = np.unique(predictions.subject_ids, return_index=True,
                                       return_inverse=True)
  num_classes = predictions.probabilities.shape[1]
  counts = np.bincount(inverse, minlength=len(subjects)).astype(np.float64)
  probabilities = np.zeros((len(subjects), num_classes))
  np.add.at(probabilities, inverse, predictions.probabilities)
  label_counts = np.zeros((len(subjects), num_classes), np.int64)
  np.add.at(label_counts, (inverse, predictions.labels), 1)
  return Predictions(rows=predictions.rows[first], subject_ids=subjects,
                     labels=label_counts.argmax(1).astype(np.int32),
                     probabilities=(probabilities / counts[:, None]).astype(np.float32))


def prediction_metrics(predictions, num_classes):
  """Slice-level classification metrics, and the subject-level ones under 'subject'."""
  result = classification_metrics(predictions.labels, predictions.probabilities.argmax(-1),
                                  num_classes)
  subjects = subject_level(predictions)
  result['subject'] = classification_metrics(subjects.labels,
                                             subjects.probabilities.argmax(-1), num_classes)
  result['num_subjects'] = int(len(subjects.subject_ids))
  return result


@dataclasses.dataclass
class ClassifierEvaluator:
  """Slice- and subject-level classification metrics of a classifier on rows `idx`."""
  infer: Callable[[Any, np.ndarray], np.ndarray]  # (state, idx) -> logits [len(idx), K].
  idx: np.ndarray
  labels: np.ndarray  # Labels of the whole data set (of the run's task).
  subject_ids: np.ndarray  # Subject ids of the whole data set.
  num_classes: int

  def predict(self, state):
    return Predictions(rows=np.asarray(self.idx, np.int64),
                       subject_ids=self.subject_ids[self.idx], labels=self.labels[self.idx],
                       probabilities=softmax(self.infer(state, self.idx)).astype(np.float32))

  def run(self, state):
    return prediction_metrics(self.predict(state), self.num_classes)


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

  def __init__(self, device_data, train_idx, config, mesh, key=None):
    self.device_data, self.batch_size = device_data, config.batch_size
    num = config.precise_bn_batches * config.batch_size
    order = np.random.default_rng(config.seed).permutation(train_idx)
    usable = max(config.batch_size,
                 min(num, len(order)) // config.batch_size * config.batch_size)
    self.idx = np.resize(order, usable).astype(np.int32)  # Repeats when fewer than a batch.

    def stats_step(state, data, inputs):
      images, _ = input_pipeline.DeviceData.images(data, inputs)
      return batch_stats_of(state, augment.model_input(images, config.image_size,
                                                       config.channels))

    make = lambda: jax.jit(stats_step, out_shardings=sharding.replicated_sharding(mesh))
    self.step = make() if key is None else state_lib.memoized('batch_stats', (key, mesh), make)

  def __call__(self, state):
    batches = [self.step(state, self.device_data.arrays,
                         self.device_data.inputs({'row': self.idx[i:i + self.batch_size]}))
               for i in range(0, len(self.idx), self.batch_size)]
    mean = jax.tree.map(lambda *s: sum(s) / len(s), *batches)
    return state.replace(batch_stats=mean)


def batch_stats_of(state, images):
  """The BatchNorm statistics of one batch of model inputs in training mode."""
  # From zero running averages, one update leaves (1 - momentum) * the batch's own.
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  _, updates = state.apply_fn({'params': state.params, 'batch_stats': zeros}, images,
                              train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(0)})
  return jax.tree.map(lambda s: s / (1.0 - models.BN_MOMENTUM), updates['batch_stats'])
