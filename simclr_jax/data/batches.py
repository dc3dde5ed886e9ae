"""Batches of a run: which rows each step reads, and the model inputs made on the devices.

The host only decides which rows of the data set each step reads; the images
travel as uint8 with one channel and become model inputs inside the jitted step
(`augment.py`: crops, flips, jitter, resizing, gray to 3 channels):

- Rows. Epoch e of a run is a permutation of its rows, seeded by (seed, e); step
  j of the epoch reads the batch [j B, (j + 1) B) of it. The epoch's last batch,
  when partial, is completed with rows drawn (seeded, without replacement) from
  the epoch's other rows, so no batch holds an image twice. The batches are a
  pure function of (seed, step), so a run resumed at step s sees exactly the
  batches it would have seen.
- Views. Each example's augmentation key is folded from the run's key and the
  example's stream position (step * B + i), so views are a pure function of
  (seed, step, example) as well.
- Images. When the data set fits (`config.data.on_device`), it is put on the
  devices once and every step gathers its rows there; otherwise each process
  gathers its rows on the host and sends them (uint8) with the step's inputs.
  The step sees the same uint8 batch either way.

P processes each feed their rows [p B / P, (p + 1) B / P) of the same global batch.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.data import augment
from simclr_jax import errors
from simclr_jax.parallel import sharding

# Stream of the augmentation keys: the run's key folded with this constant, apart
# from the dropout keys (jax.random.split of the same seed).
_AUGMENT_STREAM = 0x5EED
# Data sets up to this size live on the devices (the Kaggle set is 105 MB as uint8).
_DEVICE_DATA_MAX_BYTES = 2 * 2**30


def steps_per_epoch(num_examples, batch_size):
  """Returns the number of batches that cover `num_examples` once."""
  return math.ceil(num_examples / batch_size)


def train_batch_size(num_examples, batch_size, num_devices=1):
  """The batch size a run trains with: `batch_size`, or fewer if there are fewer images.

  A batch never holds an image twice, so with fewer images than `batch_size`
  (a small label fraction) the batch is every image, rounded down to a
  multiple of the device count.
  """
  if num_examples >= batch_size:
    return batch_size
  return max(num_devices, num_examples // num_devices * num_devices)


def batch_positions(num_examples, batch_size, seed, step):
  """Positions (into the run's rows) of global batch `step`: distinct, in [0, num_examples).

  See the module docstring: epoch permutations seeded by (seed, epoch), the last
  partial batch of an epoch completed from the epoch's other rows.

  Args:
    num_examples: number of rows the run draws from, at least `batch_size`.
    batch_size: global batch size.
    seed: seed of the order.
    step: global step (0-based).

  Returns:
    int64 [batch_size] positions.
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, j = divmod(step, per_epoch)
  permutation = _epoch_permutation(num_examples, seed, epoch)
  positions = permutation[j * batch_size:(j + 1) * batch_size]
  missing = batch_size - len(positions)
  if missing:
    others = permutation[:j * batch_size]
    fill = np.random.default_rng([seed, epoch, 1]).choice(len(others), missing,
                                                          replace=False)
    positions = np.concatenate([positions, others[fill]])
  return positions


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples, seed, epoch):
  # Every step of an epoch reads the same permutation: computed once per epoch.
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
  permutation.flags.writeable = False
  return permutation


@dataclasses.dataclass
class TrainingRows:
  """Which rows of the data set a run trains on, and how its batches walk them."""
  rows: np.ndarray  # int64 row indices into the data set (the train split or a subset).
  batch_size: int  # Global batch size (`train_batch_size`).
  seed: int

  @property
  def steps_per_epoch(self):
    return steps_per_epoch(len(self.rows), self.batch_size)

  def step_inputs(self, step):
    """The data-set rows and stream positions of global batch `step` (0-based)."""
    positions = batch_positions(len(self.rows), self.batch_size, self.seed, step)
    stream = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    return {'row': self.rows[positions].astype(np.int32), 'position': stream.astype(np.int32)}


class DeviceDataset:
  """The data set's uint8 images and labels for the jitted steps, on the devices if they fit.

  `inputs(...)` turns per-step host inputs (rows, positions) into what the steps
  take; `images(data, inputs)` inside a step returns the uint8 batch and its labels.
  """

  def __init__(self, arrays, mesh, on_device='auto', labels=None):
    self.mesh = mesh
    fits = arrays.images.nbytes + arrays.labels.nbytes <= _DEVICE_DATA_MAX_BYTES
    self.on_device = fits if on_device == 'auto' else bool(on_device)
    labels = arrays.labels if labels is None else labels  # The run's task's labels.
    self._images, self._labels = arrays.images, np.asarray(labels, np.int32)
    self.arrays = ({'images': sharding.replicate(self._images, mesh),
                    'labels': sharding.replicate(self._labels, mesh)}
                   if self.on_device else None)

  def inputs(self, host_inputs, batch_axis=0):
    """Per-process host inputs {'row', 'position', ...} -> global arrays for a step.

    `host_inputs` hold the GLOBAL batch (every process computes the same); each
    process contributes its rows along `batch_axis`, and the host gathers the
    images of those rows when the data set is not on the devices.
    """
    local = sharding.local_rows(host_inputs, batch_axis)
    if not self.on_device:
      local = dict(local, image=self._images[local['row']], label=self._labels[local['row']])
    return sharding.to_global(local, sharding.data_sharding(self.mesh, batch_axis))

  @staticmethod
  def images(data, inputs):
    """Inside a step: (uint8 [..., H, W, 1] images, int32 labels) of the inputs' rows."""
    if data is None:
      return inputs['image'], inputs['label']
    return data['images'][inputs['row']], data['labels'][inputs['row']]


def augment_key(seed):
  """The run's augmentation key (each example's views fold in its stream position)."""
  return jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM)


def pretrain_batch(images, positions, key, config):
  """Two SimCLR views of each image: {'image1', 'image2'} [B, S, S, C]; jittable."""
  views = {}
  for view in (1, 2):
    keys = augment.view_keys(key, positions, view)
    views[f'image{view}'] = augment.augment_batch(keys, images, config.augment,
                                                  config.data.image_size, config.data.channels)
  return views


def supervised_image(images, positions, key, config):
  """Labeled images as model inputs, crop-augmented if `config.augment.labeled`; jittable."""
  if config.augment.labeled:
    return augment.augment_batch(augment.view_keys(key, positions, 0), images,
                                 config.augment, config.data.image_size, config.data.channels)
  return augment.model_input(images, config.data.image_size, config.data.channels)


def simclr_batch(images, labels, positions, key, values, *, config):
  """Two augmented views of each uint8 image, the SimCLR batch; jittable."""
  del labels, values  # Unused: pretraining is self-supervised.
  return pretrain_batch(images, positions, key, config)


def labeled_batch(images, labels, positions, key, values, *, config):
  """Model inputs, labels and class weights of a labeled batch; jittable."""
  return {'image': supervised_image(images, positions, key, config),
          'label': labels, 'weight': jnp.asarray(values['class_weights'])[labels]}


def eval_rows(idx, batch_size):
  """`idx` padded to whole batches of `batch_size` (copies of its first row) and its size."""
  idx = np.asarray(idx, np.int64)
  padded = steps_per_epoch(len(idx), batch_size) * batch_size
  return sharding.pad_rows(idx, padded).astype(np.int32), len(idx)


def preprocess(images_uint8, config):
  """Model inputs without augmentation (evaluation, predict): numpy [n, S, S, C] in [0, 1].

  The same `augment.model_input` the evaluation steps apply on the devices.
  """
  if config.data.channels not in (1, 3):
    raise errors.UserError(f'config.data.channels must be 1 or 3, got {config.data.channels}.')
  return np.asarray(_model_input(jnp.asarray(images_uint8), config.data.image_size,
                                 config.data.channels))


_model_input = jax.jit(augment.model_input, static_argnums=(1, 2))
