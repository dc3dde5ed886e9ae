"""Batches of a run: endless training streams and one pass of evaluation.

Training batches are a pure function of (seed, step): an endless stream of
per-epoch permutations of the examples, step s taking stream positions
[s * B, (s + 1) * B), and each example's augmentation seeded by its stream
position. A run resumed at step s therefore sees exactly the batches it would
have seen, and P processes each take their rows [p * B / P, (p + 1) * B / P) of
the same global batch.
"""

import math

import numpy as np
import tensorflow as tf

from simclr_jax import augment


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
