"""Input pipeline: load a data set, split it, draw label subsets, make batches.

Every TFDS builder of `simclr_jax.datasets` has one split, `train`, holding the
whole data set. The project's own train/val/test splits are computed here from
the metadata (class, subject id, file name), so that both split schemes work on
any data set:

- `subject` (default): every slice of a person lands in one split. Neighbouring
  axial slices are near-identical, so anything else leaks test people into train.
- `slice`: the reference study's random slice-level split, kept to reproduce it.

Training batches are a pure function of (seed, step): an endless stream of
per-epoch permutations of the examples, step s taking stream positions
[s * B, (s + 1) * B), and each example's augmentation seeded by its stream
position. A run resumed at step s therefore sees exactly the batches it would
have seen, and P processes each take their rows [p * B / P, (p + 1) * B / P) of
the same global batch.
"""

import dataclasses
import math
import os

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import augment
from simclr_jax import datasets
from simclr_jax import neighbours

SPLIT_SCHEMES = ('subject', 'slice')


@dataclasses.dataclass
class DatasetArrays:
  """The whole data set in memory (6,400 x 128 x 128 x 1 uint8 = 105 MB).

  Attributes:
    images: uint8 [N, H, W, 1] at the stored size.
    labels: int32 [N] class indices into `class_names`.
    subject_ids: int64 [N], unique over the data set, -1 where unknown.
    slice_index: int32 [N], -1 where unknown.
    file_names: str [N].
    class_names: names of the classes, indexed by label.
    masks: uint8 [N, H, W, 1], 1 where the class signal lies (synthetic_mri
      only), else None.
  """
  images: np.ndarray
  labels: np.ndarray
  subject_ids: np.ndarray
  slice_index: np.ndarray
  file_names: np.ndarray
  class_names: list[str]
  masks: np.ndarray | None = None

  def __len__(self):
    return len(self.labels)


def _class_counts(labels, class_names):
  """Returns 'name count, ...' for logging."""
  counts = np.bincount(labels, minlength=len(class_names))
  return ', '.join(f'{name} {count}' for name, count in zip(class_names, counts))


def load_arrays(config):
  """Builds the TFDS data set on first use and loads all of it into memory.

  Args:
    config: reads `dataset` (e.g. 'alzheimer_mri', 'synthetic_mri/small'),
      `data_dir`, `dataset_path`, `image_size` and `skip_unreadable`.

  Returns:
    A `DatasetArrays` of the builder's single `train` split, in its stored order.
  """
  builder = datasets.get_builder(
      config.dataset,
      data_dir=config.data_dir,
      dataset_path=config.dataset_path,
      image_size=config.image_size,
      skip_unreadable=config.skip_unreadable)
  builder.download_and_prepare()
  data = tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))
  class_names = list(builder.info.features['label'].names)
  arrays = DatasetArrays(
      images=data['image'],
      labels=data['label'].astype(np.int32),
      subject_ids=data['subject_id'].astype(np.int64),
      slice_index=data['slice_index'].astype(np.int32),
      file_names=np.array([name.decode('utf-8') for name in data['file_name']]),
      class_names=class_names,
      masks=data.get('mask'))
  logging.info(
      'Loaded %s: %d images of %s; per class: %s.', config.dataset,
      len(arrays), 'x'.join(map(str, arrays.images.shape[1:])),
      _class_counts(arrays.labels, class_names))
  if _subject_id_source(config) == 'recovered':
    arrays.subject_ids = recovered_subject_ids(arrays, config, builder.data_dir)
  return arrays


def _subject_id_source(config):
  source = config.get('subject_ids', 'dataset')
  if source == 'auto':
    # synthetic_mri's ids are ground truth; alzheimer_mri's are inferred from the
    # file numbering, which the audit shows to be wrong for part of each subject;
    # image_folder has none.
    return 'dataset' if config.dataset.startswith('synthetic_mri') else 'recovered'
  if source not in ('dataset', 'recovered'):
    raise ValueError(f'Unknown subject_ids {source!r}; set --config.subject_ids to '
                     'auto, dataset or recovered.')
  return source


def recovered_subject_ids(arrays, config, cache_dir=None):
  """Subject ids recovered from chains of near-duplicate slices (see neighbours).

  Neighbouring axial slices of one person are near-identical, so mutual
  near-duplicates chain a person's slices into one group. On the Kaggle data this
  finds exactly 200 groups of 32 slices (the audit reports the agreement with the
  file-numbering ids). Groups never span classes. The result is cached beside the
  TFDS data set, since it takes seconds to compute.
  """
  threshold = float(config.get('subject_grouping_threshold', 0.98))
  k = int(config.get('subject_grouping_k', 10))
  size = int(config.get('subject_grouping_size', 64))
  cache = None
  if cache_dir:
    cache = os.path.join(cache_dir, f'recovered_subjects_t{threshold}_k{k}_s{size}.npy')
    if os.path.exists(cache):
      ids = np.load(cache)
      if len(ids) == len(arrays):
        return ids
  features = neighbours.pixel_features(arrays.images, size)
  groups = neighbours.group_near_duplicates(features, threshold, k=k)
  _, ids = np.unique(np.stack([groups, arrays.labels]), axis=1, return_inverse=True)
  ids = ids.reshape(-1).astype(np.int64)
  sizes = np.bincount(ids)
  logging.info('Recovered %d subject groups from near-duplicate slices (median size %d, '
               'largest %d).', len(sizes), int(np.median(sizes)), int(sizes.max()))
  if cache:
    tmp = cache + '.tmp.npy'
    np.save(tmp, ids)
    os.replace(tmp, cache)  # Never a half-written cache file.
  return ids


# ---------------------------------------------------------------- Splits.


def _split_sizes(num_units, test_fraction, val_fraction):
  """Returns (test, val) counts of one class's subjects (or slices).

  Test gets round(test_fraction * n) but at least one, val gets val_fraction of
  the rest but at least one where the class has three or more, and train always
  keeps at least one.

  Args:
    num_units: subjects (or slices) of the class, at least one.
    test_fraction: share of the class in test.
    val_fraction: share of the class's non-test units in val.
  """
  num_test = max(1, round(test_fraction * num_units)) if test_fraction else 0
  num_test = min(num_test, num_units - 1)
  num_rest = num_units - num_test
  num_val = round(val_fraction * num_rest) if val_fraction else 0
  if val_fraction and num_units >= 3:
    num_val = max(1, num_val)
  num_val = min(num_val, num_rest - 1)
  return num_test, num_val


def make_splits(arrays, scheme, seed, test_fraction, val_fraction):
  """Splits the data set into train, val and test, stratified by class.

  The split depends only on (seed, sorted subject ids or file names), not on the
  order of the rows, so it is the same however the data set was loaded.

  Args:
    arrays: the `DatasetArrays` to split.
    scheme: 'subject' keeps each person's slices in one split (per class,
      round(test_fraction * n_subjects) but at least one subject goes to test,
      then val_fraction of the rest to val); 'slice' splits slices at random,
      as the reference study did (it leaks near-identical neighbouring slices of
      a person across the split).
    seed: seed of the split.
    test_fraction: share of each class's subjects (or slices) in test.
    val_fraction: share of each class's remaining subjects (or slices) in val.

  Returns:
    {'train', 'val', 'test'}: sorted int64 row indices into `arrays`.

  Raises:
    ValueError: for an unknown scheme, fractions outside [0, 1), or the subject
      scheme on a data set whose subject ids are unknown.
  """
  if scheme not in SPLIT_SCHEMES:
    raise ValueError(
        f'Unknown split_scheme {scheme!r}; set it to one of {SPLIT_SCHEMES}.')
  for name, fraction in (('test_fraction', test_fraction),
                         ('val_fraction', val_fraction)):
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f'{name} must be in [0, 1), got {fraction}; set '
                       f'config.{name} accordingly.')
  num_classes = len(arrays.class_names)

  if scheme == 'subject':
    num_unknown = int(np.sum(arrays.subject_ids < 0))
    if num_unknown:
      raise ValueError(
          f'{num_unknown} images have unknown subject ids (-1), so a subject '
          'split cannot keep a person\'s slices together; recover subject '
          'groups with the audit\'s subject grouping '
          '(simclr_jax.neighbours.group_near_duplicates) or set '
          'config.split_scheme=slice.')
    # np.unique sorts the ids, which makes the split independent of row order.
    subjects, row_subject = np.unique(arrays.subject_ids, return_inverse=True)
    label_counts = np.zeros((len(subjects), num_classes), np.int64)
    np.add.at(label_counts, (row_subject, arrays.labels), 1)
    subject_labels = label_counts.argmax(axis=1)  # A subject's class.
    units = 'subjects'
  else:
    row_subject = np.arange(len(arrays))
    subject_labels = arrays.labels
    units = 'slices'

  split_of_unit = np.zeros(len(subject_labels), np.int8)  # 0 train, 1 val, 2 test.
  for label, class_name in enumerate(arrays.class_names):
    members = np.flatnonzero(subject_labels == label)
    if scheme == 'slice':  # Sorted by file name: independent of row order.
      members = members[np.argsort(arrays.file_names[members], kind='stable')]
    if not len(members):
      continue
    members = np.random.default_rng([seed, label]).permutation(members)
    num_test, num_val = _split_sizes(len(members), test_fraction, val_fraction)
    split_of_unit[members[:num_test]] = 2
    split_of_unit[members[num_test:num_test + num_val]] = 1
    if (test_fraction and not num_test) or (val_fraction and not num_val):
      logging.warning(
          'Class %s has %d %s, too few for train, val and test: %d train, '
          '%d val, %d test.', class_name, len(members), units,
          len(members) - num_test - num_val, num_val, num_test)

  split_of_row = split_of_unit[row_subject]
  splits = {name: np.flatnonzero(split_of_row == code).astype(np.int64)
            for code, name in enumerate(('train', 'val', 'test'))}
  for name, rows in splits.items():
    logging.info('%s split (%s scheme): %d images; per class: %s.', name,
                 scheme, len(rows),
                 _class_counts(arrays.labels[rows], arrays.class_names))
  return splits


def label_subset(labels, train_idx, fraction, seed):
  """Returns the labeled subset of the train split used at `fraction`.

  Stratified and nested: each class's train images are put in one fixed random
  order (seeded by (seed, class)), and a fraction takes its first
  round(fraction * n_class) images, at least one. So the 1 % subset lies inside
  the 10 % subset, which lies inside the 20 % subset, and so on.

  Args:
    labels: int [N] labels of the whole data set.
    train_idx: int row indices of the train split.
    fraction: share of each class's train images, in (0, 1].
    seed: seed of the per-class order.

  Returns:
    Sorted int64 row indices, a subset of `train_idx`.

  Raises:
    ValueError: if `fraction` is outside (0, 1].
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'label_fraction must be in (0, 1], got {fraction}; set '
                     'config.label_fraction to e.g. 0.01, 0.1 or 1.0.')
  train_idx = np.sort(np.asarray(train_idx, np.int64))
  train_labels = labels[train_idx]
  chosen, counts = [], {}
  for label in np.unique(train_labels):
    members = train_idx[train_labels == label]
    order = np.random.default_rng([seed, label]).permutation(members)
    count = max(1, round(fraction * len(members)))
    chosen.append(order[:count])
    counts[int(label)] = count
  logging.info('Label fraction %g: %d of %d train images; per class label: %s.',
               fraction, sum(counts.values()), len(train_idx), counts)
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def pretrain_indices(splits, include_test):
  """Returns the rows SimCLR pretrains on: train + val, and test if asked.

  Args:
    splits: the output of `make_splits`.
    include_test: the reference's transductive setting (test images seen,
      without labels, during pretraining).
  """
  parts = [splits['train'], splits['val']]
  if include_test:
    logging.warning(
        'PRETRAINING ON TEST IMAGES (include_test_in_pretrain=True): this is '
        'the reference study\'s transductive setting; test metrics are then '
        'not those of unseen images.')
    parts.append(splits['test'])
  return np.sort(np.concatenate(parts)).astype(np.int64)


# ---------------------------------------------------------------- Batches.


def steps_per_epoch(num_examples, batch_size):
  """Returns the number of batches that cover `num_examples` once."""
  return math.ceil(num_examples / batch_size)


def _local_batch_size(batch_size, process_count):
  if batch_size % process_count:
    raise ValueError(
        f'The batch size {batch_size} is not divisible by the process count '
        f'{process_count}; set config.batch_size to a multiple of it.')
  return batch_size // process_count


def _check_channels(config):
  if config.channels not in (1, 3):
    raise ValueError(
        f'config.channels must be 1 or 3, got {config.channels}.')


def _model_input(images, config):
  """Resizes to config.image_size and repeats gray to config.channels.

  Args:
    images: uint8 (or float in [0, 1]) [..., H, W, 1] tf.Tensor.
    config: reads `image_size` and `channels`.

  Returns:
    float32 [..., image_size, image_size, channels] in [0, 1].
  """
  images = tf.image.convert_image_dtype(images, tf.float32)
  size = config.image_size
  if tuple(images.shape[-3:-1]) != (size, size):
    images = tf.image.resize(
        images, [size, size], method='bilinear', antialias=True)
  if images.shape[-1] == 1 and config.channels != 1:
    images = tf.repeat(images, config.channels, axis=-1)
  return tf.clip_by_value(images, 0.0, 1.0)


def preprocess(images_uint8, config):
  """Returns model inputs without augmentation (evaluation, predict mode).

  Args:
    images_uint8: uint8 [n, H, W, 1].
    config: reads `image_size` and `channels` (1, or 3 by repeating gray).

  Returns:
    float32 numpy [n, image_size, image_size, channels] in [0, 1].
  """
  _check_channels(config)
  return _model_input(tf.convert_to_tensor(images_uint8), config).numpy()


def stream_positions(num_examples, batch_size, seed, step):
  """Returns the example positions (into idx) of global batch `step`.

  The stream is the concatenation of per-epoch permutations of
  range(num_examples), epoch e's seeded by (seed, e); step s takes stream
  positions [s * batch_size, (s + 1) * batch_size), crossing epochs as needed.

  Args:
    num_examples: number of examples the stream permutes.
    batch_size: global batch size.
    seed: seed of the order.
    step: global step.

  Returns:
    int64 [batch_size] positions in [0, num_examples).
  """
  stream = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, offsets = np.divmod(stream, num_examples)
  positions = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    in_epoch = epochs == epoch
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    positions[in_epoch] = permutation[offsets[in_epoch]]
  return positions


def _training_batches(arrays, idx, config, make_example, *, seed, start_step,
                      process_index, process_count):
  """Endless per-process batches of make_example(image, label, example_seed).

  Args:
    arrays: the `DatasetArrays`.
    idx: rows of `arrays` to draw from.
    config: reads `batch_size`.
    make_example: tf function of (uint8 image [H, W, 1], int32 label,
      int64 [2] example seed) returning a dict of tensors.
    seed: seed of the order and of the augmentations.
    start_step: global step of the first batch.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing each global batch.

  Returns:
    An iterator of numpy dicts, one per step from `start_step`.
  """
  idx = np.asarray(idx, np.int64)
  if not len(idx):
    raise ValueError('Cannot make training batches from zero examples.')
  batch_size = config.batch_size
  local_batch_size = _local_batch_size(batch_size, process_count)
  local_rows = slice(process_index * local_batch_size,
                     (process_index + 1) * local_batch_size)

  def local_batches():
    """Yields (global stream position, position in idx) of this process' rows."""
    step = start_step
    while True:
      stream = np.arange(step * batch_size, (step + 1) * batch_size)
      positions = stream_positions(len(idx), batch_size, seed, step)
      yield stream[local_rows], positions[local_rows]
      step += 1

  images = tf.constant(arrays.images[idx])
  labels = tf.constant(arrays.labels[idx].astype(np.int32))
  base_seed = tf.constant([seed, 0], tf.int64)

  def example(stream_position, position):
    # Seeding by stream position makes each example's views a function of (seed, step).
    example_seed = tf.random.experimental.stateless_fold_in(
        base_seed, stream_position)
    return make_example(images[position], labels[position], example_seed)

  index_spec = tf.TensorSpec([local_batch_size], tf.int64)
  dataset = tf.data.Dataset.from_generator(
      local_batches, output_signature=(index_spec, index_spec))
  dataset = dataset.unbatch()
  dataset = dataset.map(
      example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(local_batch_size, drop_remainder=True)
  dataset = dataset.prefetch(tf.data.AUTOTUNE)
  return dataset.as_numpy_iterator()


def _view(image, example_seed, view, config):
  """Returns augmented view number `view` of an image as model input."""
  view_seed = tf.random.experimental.stateless_fold_in(example_seed, view)
  image = augment.simclr_view(
      image, view_seed, config.augment, config.image_size)
  return _model_input(image, config)


def pretrain_batches(arrays, idx, config, *, seed, start_step,
                     process_index=0, process_count=1):
  """Endless per-process batches of two SimCLR views of each image.

  Args:
    arrays: the `DatasetArrays`.
    idx: rows to pretrain on (see `pretrain_indices`).
    config: reads `batch_size` (global), `image_size`, `channels`, `augment`.
    seed: seed of the order and of the views.
    start_step: global step of the first batch (the step a run resumes at).
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing each global batch.

  Returns:
    An iterator of {'image1', 'image2'}: float32 [b, S, S, C] numpy arrays,
    b = batch_size // process_count.
  """
  _check_channels(config)

  def make_example(image, label, example_seed):
    del label  # Unused: pretraining is self-supervised.
    return {'image1': _view(image, example_seed, 1, config),
            'image2': _view(image, example_seed, 2, config)}

  return _training_batches(
      arrays, idx, config, make_example, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count)


def supervised_batches(arrays, idx, config, *, seed, start_step,
                       process_index=0, process_count=1):
  """Endless per-process batches of labeled images (finetune, baseline).

  Images get the SimCLR view augmentation of `config.augment` (the reference's
  random resized crop by default) if `config.train_augment`, else none.

  Args:
    arrays: the `DatasetArrays`.
    idx: labeled rows to train on (see `label_subset`).
    config: reads `batch_size` (global), `image_size`, `channels`,
      `train_augment`, `augment`.
    seed: seed of the order and of the augmentation.
    start_step: global step of the first batch (the step a run resumes at).
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing each global batch.

  Returns:
    An iterator of {'image': float32 [b, S, S, C], 'label': int32 [b]} numpy
    dicts, b = batch_size // process_count.
  """
  _check_channels(config)

  def make_example(image, label, example_seed):
    if config.train_augment:
      image = _view(image, example_seed, 0, config)
    return {'image': _model_input(image, config), 'label': label}

  return _training_batches(
      arrays, idx, config, make_example, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count)


def eval_batches(arrays, idx, config, *, batch_size, process_index=0,
                 process_count=1):
  """One pass over `idx` in order, without augmentation.

  The last global batch is padded to `batch_size` with copies of the first
  example, marked `valid=False`, so every batch has the same shape and every
  process the same number of batches.

  Args:
    arrays: the `DatasetArrays`.
    idx: rows to evaluate.
    config: reads `image_size` and `channels`.
    batch_size: global batch size.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing each global batch.

  Returns:
    A finite iterator of {'image': float32 [b, S, S, C], 'label': int32 [b],
    'valid': bool [b]} numpy dicts, b = batch_size // process_count.
  """
  _check_channels(config)
  idx = np.asarray(idx, np.int64)
  local_batch_size = _local_batch_size(batch_size, process_count)
  num_batches = steps_per_epoch(len(idx), batch_size)
  padded = np.arange(num_batches * batch_size)
  valid = padded < len(idx)
  padded[~valid] = 0
  local_rows = slice(process_index * local_batch_size,
                     (process_index + 1) * local_batch_size)
  local_positions = padded.reshape(num_batches, batch_size)[:, local_rows]
  local_valid = valid.reshape(num_batches, batch_size)[:, local_rows]

  images = tf.constant(arrays.images[idx])
  labels = tf.constant(arrays.labels[idx].astype(np.int32))

  def batch(positions, valid):
    return {'image': _model_input(tf.gather(images, positions), config),
            'label': tf.gather(labels, positions),
            'valid': valid}

  dataset = tf.data.Dataset.from_tensor_slices((local_positions, local_valid))
  dataset = dataset.map(
      batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.prefetch(tf.data.AUTOTUNE)
  return dataset.as_numpy_iterator()
