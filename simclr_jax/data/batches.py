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
- Partners. With `config.pretrain.positive_pairs=subject` (MICLe, Azizi et al.
  2021) the second view of each pair is made from a partner row: a slice of the
  same subject at most `positive_max_slice_distance` slices away, itself
  included, drawn on the host (`SubjectPartners`, seeded by (seed, step)) and
  sent as the step's 'partner' input. The default ('image') sends none, so its
  steps are unchanged.
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
# Stream of the partner draws: np.random seeds [seed, step, this], apart from the
# epoch permutations' [seed, epoch] and their fillers' [seed, epoch, 1].
_PARTNER_STREAM = 0x9A1
# config.pretrain.positive_pairs: two views of one image (SimCLR) or of one subject (MICLe).
POSITIVE_PAIRS = ('image', 'subject')


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


class SubjectPartners:
  """Same-subject partners of a run's rows (MICLe): slices at most `max_distance` apart.

  The candidates of the row at position p of `rows` are the rows of `rows` (so
  never another split's) of its subject whose slice index differs from its own by
  at most `max_distance`, itself included; with 0, itself only. Sorted by
  (subject, slice), a row's candidates are one contiguous range of the sorted
  rows, kept as its start and length.
  """

  def __init__(self, subject_ids, slice_index, rows, max_distance):
    """Builds the candidate ranges once.

    Args:
      subject_ids: int [N] subject of each data-set row (-1 unknown).
      slice_index: int [N] slice position of each data-set row (-1 unknown).
      rows: int [R] the run's rows (`TrainingRows.rows`).
      max_distance: int >= 0, the largest slice distance of a partner.

    Raises:
      errors.UserError: some row has no subject id or no slice position.
    """
    rows = np.asarray(rows, np.int64)
    subjects = np.asarray(subject_ids)[rows]
    slices = np.asarray(slice_index)[rows].astype(np.int64)
    unknown = int(np.sum((subjects < 0) | (slices < 0)))
    if unknown:
      raise errors.UserError(
          '--config.pretrain.positive_pairs=subject needs subject ids and slice positions, '
          f'which {unknown} of the {len(rows)} training images lack; set '
          '--config.pretrain.positive_pairs=image.')
    _, group = np.unique(subjects, return_inverse=True)
    # One sort key: a subject's slices +- max_distance never reach another subject's keys.
    key = group.reshape(-1).astype(np.int64) * (slices.max(initial=0) + max_distance + 1) + slices
    order = np.argsort(key, kind='stable')
    self.sorted_rows = rows[order]
    if max_distance == 0:  # Itself only, even beside another scan's slice of that index.
      self.start, self.count = np.argsort(order), np.ones(len(rows), np.int64)
    else:
      self.start = np.searchsorted(key[order], key - max_distance, side='left')
      self.count = np.searchsorted(key[order], key + max_distance, side='right') - self.start

  def candidates(self, position):
    """The data-set rows the row at `position` of the run's rows may pair with."""
    return self.sorted_rows[self.start[position]:self.start[position] + self.count[position]]

  def draw(self, positions, seed, step):
    """One partner of each of `positions`, uniform over its candidates; seeded by (seed, step)."""
    rng = np.random.default_rng([seed, step, _PARTNER_STREAM])
    return self.sorted_rows[self.start[positions] + rng.integers(0, self.count[positions])]


@dataclasses.dataclass
class TrainingRows:
  """Which rows of the data set a run trains on, and how its batches walk them."""
  rows: np.ndarray  # int64 row indices into the data set (the train split or a subset).
  batch_size: int  # Global batch size (`train_batch_size`).
  seed: int
  partners: SubjectPartners | None = None  # positive_pairs=subject: each row's partners.

  @property
  def steps_per_epoch(self):
    return steps_per_epoch(len(self.rows), self.batch_size)

  def step_inputs(self, step):
    """The data-set rows and stream positions of global batch `step` (0-based).

    With `partners`, also 'partner': the data-set row of each row's second view.
    """
    positions = batch_positions(len(self.rows), self.batch_size, self.seed, step)
    stream = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    inputs = {'row': self.rows[positions].astype(np.int32), 'position': stream.astype(np.int32)}
    if self.partners is not None:
      inputs['partner'] = self.partners.draw(positions, self.seed, step).astype(np.int32)
    return inputs


class DeviceDataset:
  """The data set's uint8 images and labels for the jitted steps, on the devices if they fit.

  `inputs(...)` turns per-step host inputs (rows, positions) into what the steps
  take; `images(data, inputs)` inside a step returns the uint8 batch and its labels.
  """

  def __init__(self, arrays, mesh, on_device='auto', labels=None):
    self.mesh = mesh
    fits = arrays.images.nbytes + arrays.labels.nbytes <= _DEVICE_DATA_MAX_BYTES
    # The config's field is a string: 'False' from the command line means False.
    self.on_device = fits if on_device == 'auto' else on_device in (True, 'True', 'true')
    labels = arrays.labels if labels is None else labels  # The run's task's labels.
    self._images, self._labels = arrays.images, np.asarray(labels, np.int32)
    self.arrays = ({'images': sharding.replicate(self._images, mesh),
                    'labels': sharding.replicate(self._labels, mesh)}
                   if self.on_device else None)

  def inputs(self, host_inputs, batch_axis=0, runs=False):
    """Per-process host inputs {'row', 'position', ...} -> global arrays for a step.

    `host_inputs` hold the GLOBAL batch (every process computes the same); each
    process contributes its rows along `batch_axis`, and the host gathers the
    images of those rows when the data set is not on the devices. `runs`: the
    leading axis is a group's runs, split over the mesh's `run` axis if it has one.
    """
    local = sharding.local_rows(host_inputs, batch_axis)
    if not self.on_device:
      local = dict(local, image=self._images[local['row']], label=self._labels[local['row']])
      if 'partner' in local:
        local['partner_image'] = self._images[local['partner']]
    return sharding.to_global(local, sharding.data_sharding(self.mesh, batch_axis, runs))

  @staticmethod
  def images(data, inputs):
    """Inside a step: (uint8 [..., H, W, 1] images, int32 labels) of the inputs' rows.

    With a 'partner' input (positive_pairs=subject) the images are a pair: (the
    rows' images, their partners' images).
    """
    if data is None:
      images, labels = inputs['image'], inputs['label']
      partners = inputs.get('partner_image')
    else:
      images, labels = data['images'][inputs['row']], data['labels'][inputs['row']]
      partners = data['images'][inputs['partner']] if 'partner' in inputs else None
    return (images, labels) if partners is None else ((images, partners), labels)


def augment_key(seed):
  """The run's augmentation key (each example's views fold in its stream position)."""
  return jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM)


def pretrain_batch(images, positions, key, config):
  """Two SimCLR views of each image: {'image1', 'image2'} [B, S, S, C]; jittable.

  `images`: uint8 [B, H, W, 1], both views made from each image; or the pair
  (images, partner images) of `DeviceDataset.images` under positive_pairs=subject,
  view 2 made from the partner. Either way view v of example i draws from the key
  of (stream position i, v), so a partner equal to its row gives the SimCLR views.
  """
  sources = images if isinstance(images, tuple) else (images, images)
  views = {}
  for view, source in zip((1, 2), sources):
    keys = augment.view_keys(key, positions, view)
    views[f'image{view}'] = augment.augment_batch(keys, source, config.augment,
                                                  config.data.image_size, config.data.channels)
  return views


def supervised_image(images, positions, key, config):
  """Labeled images as model inputs, crop-augmented if `config.augment.labeled`; jittable."""
  if config.augment.labeled:
    return augment.augment_batch(augment.view_keys(key, positions, 0), images,
                                 config.augment, config.data.image_size, config.data.channels)
  return augment.model_input(images, config.data.image_size, config.data.channels)


def simclr_batch(images, labels, positions, key, values, *, config):
  """Two augmented views of each uint8 image (or image and partner), the SimCLR batch; jittable."""
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
