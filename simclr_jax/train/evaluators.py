"""The evaluators a training run calls, batched inference on the devices, precise BatchNorm.

An evaluator has one method, `run(state) -> {name: value}`: `ClassifierEvaluator`
(classification metrics of a split) and `KnnEvaluator` (the pretraining's kNN
monitor). `PreciseBatchStats` is a hook a run may apply before evaluating.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.data import batches
from simclr_jax.data import augment
from simclr_jax.model import resnet
from simclr_jax.parallel import sharding
from simclr_jax.metrics import classification
from simclr_jax.metrics import probe


# ----------------------------------------------------------------------------- evaluators


def infer_rows(infer, state, device_data, idx, batch_size, on_device=False):
  """`infer(state, data, inputs)` over the data set's rows `idx`, in padded global batches.

  The outputs stay on the devices until every batch has run: one transfer at the end,
  or none with `on_device` (one process: the kNN monitor searches them there).

  Returns:
    The outputs of the rows of `idx`, in order (the padding dropped): numpy, or a
    device array with `on_device` where there is one process.
  """
  rows, count = batches.eval_rows(idx, batch_size)
  outputs = [infer(state, device_data.arrays, device_data.inputs({'row': rows[i:i + batch_size]}))
             for i in range(0, len(rows), batch_size)]
  if on_device and jax.process_count() == 1:
    return jnp.concatenate(outputs)[:count]
  return np.concatenate(sharding.to_host(outputs))[:count]


@dataclasses.dataclass
class ClassifierEvaluator:
  """Slice- and subject-level classification metrics of a classifier on rows `idx`."""
  infer: Callable[[Any, np.ndarray], np.ndarray]  # (state, idx) -> logits [len(idx), K].
  idx: np.ndarray
  labels: np.ndarray  # Labels of the whole data set (of the run's task).
  subject_ids: np.ndarray  # Subject ids of the whole data set.
  num_classes: int

  def predictions(self, state):
    return classification.Predictions(rows=np.asarray(self.idx, np.int64),
                       subject_ids=self.subject_ids[self.idx], labels=self.labels[self.idx],
                       probabilities=classification.softmax(self.infer(state, self.idx)).astype(np.float32))

  def run(self, state):
    return classification.prediction_metrics(self.predictions(state), self.num_classes)


@dataclasses.dataclass
class KnnEvaluator:
  """The pretraining's monitors: kNN and linear-probe accuracy of the embeddings of `idx`.

  Both learn from the embeddings of `memory_idx` (the labeled training split): the
  kNN vote of the cosine neighbours (as the reference monitored), and the closed-form
  ridge probe of `metrics/probe.py` (how linearly the classes separate).
  """
  infer: Callable[..., Any]  # (state, idx, on_device) -> embeddings.
  idx: np.ndarray
  memory_idx: np.ndarray
  labels: np.ndarray  # Labels of the whole data set.
  ks: tuple[int, ...]
  num_classes: int

  def run(self, state):
    # The embeddings stay on the devices: the search and the probe run there, labels
    # come back.
    memory = self.infer(state, self.memory_idx, on_device=True)
    queries = self.infer(state, self.idx, on_device=True)
    result = classification.knn_monitor(memory, self.labels[self.memory_idx], queries,
                                        self.labels[self.idx], self.ks, self.num_classes)
    result.update(probe.probe_monitor(memory, self.labels[self.memory_idx], queries,
                                      self.labels[self.idx], self.num_classes))
    return result


class PreciseBatchStats:
  """Before an evaluation: BatchNorm statistics recomputed with the current weights.

  The mean over `num_batches` batches (of `config.train.batch_size` unaugmented
  training images, a fixed seeded draw) of each batch's statistics, as
  detectron2's PreciseBN. Running averages lag behind fast-moving weights and
  describe augmented crops; on short runs they can make the evaluated network
  answer one class while the same weights with fresh statistics do not.
  """

  def __init__(self, device_data, train_idx, config, mesh, cache=None, key=None):
    self.device_data, self.batch_size = device_data, config.train.batch_size
    num = config.eval.precise_bn_batches * config.train.batch_size
    order = np.random.default_rng(config.seed).permutation(train_idx)
    usable = max(config.train.batch_size,
                 min(num, len(order)) // config.train.batch_size * config.train.batch_size)
    self.idx = np.resize(order, usable).astype(np.int32)  # Repeats when fewer than a batch.

    def stats_step(state, data, inputs):
      images, _ = batches.DeviceDataset.images(data, inputs)
      return batch_stats_of(state, augment.model_input(images, config.data.image_size,
                                                       config.data.channels))

    make = lambda: jax.jit(stats_step, out_shardings=sharding.replicated_sharding(mesh))
    self.step = make() if cache is None else cache.get('batch_stats', (key, mesh), make)

  def __call__(self, state):
    per_batch = [self.step(state, self.device_data.arrays,
                         self.device_data.inputs({'row': self.idx[i:i + self.batch_size]}))
               for i in range(0, len(self.idx), self.batch_size)]
    mean = jax.tree.map(lambda *s: sum(s) / len(s), *per_batch)
    return state.replace(batch_stats=mean)


def batch_stats_of(state, images):
  """The BatchNorm statistics of one batch of model inputs in training mode."""
  # From zero running averages, one update leaves (1 - momentum) * the batch's own.
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  _, updates = state.apply_fn({'params': state.params, 'batch_stats': zeros}, images,
                              train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(0)})
  return jax.tree.map(lambda s: s / (1.0 - resnet.BN_MOMENTUM), updates['batch_stats'])
