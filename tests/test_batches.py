"""Tests of the training rows, the device data and the model inputs on tiny fake data."""

import functools

import jax
import numpy as np
import pytest

from simclr_jax.train import evaluators
from simclr_jax.data import batches
from simclr_jax.parallel import sharding
from tests import fake_data


def test_epochs_are_permutations_and_no_batch_holds_an_image_twice():
  for num_examples, batch_size in ((5, 4), (12, 4), (27, 8), (32, 32)):
    per_epoch = batches.steps_per_epoch(num_examples, batch_size)
    for epoch in range(3):
      epoch_batches = [batches.batch_positions(num_examples, batch_size, 0, step)
                       for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
      for batch in epoch_batches:
        assert len(batch) == batch_size and len(set(batch)) == batch_size
        assert batch.min() >= 0 and batch.max() < num_examples
      # Every image is seen in every epoch; only the last batch's filler repeats.
      seen = np.concatenate(epoch_batches)
      assert set(seen) == set(range(num_examples))
      assert len(seen) - num_examples == per_epoch * batch_size - num_examples
  epochs = [np.concatenate([batches.batch_positions(12, 4, 0, s) for s in range(e, e + 3)])
            for e in (0, 3)]
  assert not np.array_equal(epochs[0], epochs[1])  # Each epoch its own order.
  assert batches.steps_per_epoch(10, 4) == 3


def test_train_batch_size_is_every_image_when_there_are_fewer():
  assert batches.train_batch_size(100, 32) == 32
  assert batches.train_batch_size(17, 32) == 17
  assert batches.train_batch_size(17, 32, num_devices=2) == 16
  assert batches.train_batch_size(1, 32, num_devices=2) == 2


def _pretrain_views(arrays, inputs, config, on_device=True):
  mesh = sharding.create_mesh()
  data = batches.DeviceDataset(arrays, mesh, on_device)

  @jax.jit
  def views(data_arrays, step_inputs, key):
    images, _ = batches.DeviceDataset.images(data_arrays, step_inputs)
    return batches.pretrain_batch(images, step_inputs['position'], key, config)

  return sharding.to_host(views(data.arrays, data.inputs(inputs),
                                batches.augment_key(config.seed)))


def test_batches_resume_at_any_step_and_views_follow_seed_step_and_example():
  arrays, config = fake_data.fake_arrays(), fake_data.config(batch_size=4)
  rows = batches.TrainingRows(np.arange(0, len(arrays), 7), 4, seed=1)
  continued = [rows.step_inputs(step) for step in range(8)]  # Step 6 crosses an epoch.
  resumed = batches.TrainingRows(np.arange(0, len(arrays), 7), 4, seed=1)
  for step in (5, 6, 7):
    for key in ('row', 'position'):
      np.testing.assert_array_equal(resumed.step_inputs(step)[key], continued[step][key])
  batch = _pretrain_views(arrays, continued[0], config)
  assert set(batch) == {'image1', 'image2'}
  assert batch['image1'].shape == (4, fake_data.IMAGE_SIZE, fake_data.IMAGE_SIZE, 3)
  assert batch['image1'].dtype == np.float32
  assert 0.0 <= batch['image1'].min() and batch['image1'].max() <= 1.0
  # Gray repeated to three channels; the two views differ; so do the steps and seeds.
  np.testing.assert_array_equal(batch['image1'][..., 0], batch['image1'][..., 2])
  assert not np.array_equal(batch['image1'], batch['image2'])
  assert not np.array_equal(batch['image1'], _pretrain_views(arrays, continued[1],
                                                             config)['image1'])
  other_seed = fake_data.config(batch_size=4, seed=2)
  assert not np.array_equal(batch['image1'],
                            _pretrain_views(arrays, continued[0], other_seed)['image1'])
  # The same views whether the data set lives on the devices or on the host.
  on_host = _pretrain_views(arrays, continued[0], config, on_device=False)
  for key in batch:
    np.testing.assert_array_equal(on_host[key], batch[key])


def test_process_rows_concatenate_to_the_global_batch(monkeypatch):
  rows = batches.TrainingRows(np.arange(30), 8, seed=0)
  global_inputs = {k: np.stack([rows.step_inputs(s)[k] for s in (3, 4)])
                   for k in ('row', 'position')}
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  parts = []
  for p in range(2):
    monkeypatch.setattr(jax, 'process_index', functools.partial(lambda p: p, p))
    parts.append(sharding.local_rows(global_inputs, batch_axis=1))
  for key, value in global_inputs.items():
    assert parts[0][key].shape == (2, 4)
    np.testing.assert_array_equal(np.concatenate([part[key] for part in parts], axis=1),
                                  value)


def test_supervised_batches_pair_images_with_their_labels():
  arrays = fake_data.fake_arrays()
  config = fake_data.config(batch_size=6, image_size=16, channels=1, train_augment=False)
  rows = batches.TrainingRows(np.arange(3, 60, 5), 6, seed=0)
  mesh = sharding.create_mesh()
  data = batches.DeviceDataset(arrays, mesh)

  @jax.jit
  def batch_of(data_arrays, step_inputs, key):
    images, labels = batches.DeviceDataset.images(data_arrays, step_inputs)
    return batches.supervised_image(images, step_inputs['position'], key,
                                           config), labels

  expected = batches.preprocess(arrays.images[rows.rows], config)
  seen = set()
  for step in range(2):  # One epoch of 12.
    images, labels = sharding.to_host(batch_of(data.arrays, data.inputs(rows.step_inputs(step)),
                                               batches.augment_key(0)))
    assert labels.dtype == np.int32
    for image, label in zip(images, labels):
      (match,) = np.flatnonzero(np.all(expected == image, axis=(1, 2, 3)))
      assert label == arrays.labels[rows.rows[match]]
      seen.add(match)
  assert seen == set(range(len(rows.rows)))


def test_evaluation_pads_the_last_batch_and_returns_the_rows_in_order():
  rows, count = batches.eval_rows(np.arange(10, 20), 4)
  assert count == 10 and len(rows) == 12
  np.testing.assert_array_equal(rows[:10], np.arange(10, 20))
  np.testing.assert_array_equal(rows[10:], [10, 10])
  arrays = fake_data.fake_arrays()
  data = batches.DeviceDataset(arrays, sharding.create_mesh())

  @jax.jit
  def labels_of(state, data_arrays, inputs):
    del state
    return batches.DeviceDataset.images(data_arrays, inputs)[1]

  idx = np.array([40, 3, 17, 99, 5, 61, 8])
  np.testing.assert_array_equal(evaluators.infer_rows(labels_of, None, data, idx, batch_size=4),
                                arrays.labels[idx])


def test_preprocess_resizes_and_repeats_channels():
  arrays = fake_data.fake_arrays()
  images = batches.preprocess(
      arrays.images[:3], fake_data.config(image_size=8, channels=3))
  assert images.shape == (3, 8, 8, 3) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  same_size = batches.preprocess(
      arrays.images[:3], fake_data.config(image_size=16, channels=1))
  np.testing.assert_allclose(same_size, arrays.images[:3] / 255.0, atol=1e-6)
  with pytest.raises(ValueError, match='channels'):
    batches.preprocess(arrays.images[:3], fake_data.config(channels=2))
