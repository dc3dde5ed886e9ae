"""Tests of the batch iterators on tiny fake data."""


import numpy as np
import pytest

from simclr_jax import input_pipeline
from simclr_jax import splits as splits_lib
from tests import fake_data


# ---------------------------------------------------------------- Batches.


def test_stream_walks_epoch_permutations_and_fills_small_subsets():
  positions = np.concatenate([
      input_pipeline.stream_positions(5, 4, seed=0, step=step)
      for step in range(5)])  # 20 positions: four epochs of five.
  for epoch in range(4):
    assert sorted(positions[5 * epoch:5 * (epoch + 1)]) == list(range(5))
  assert input_pipeline.stream_positions(5, 32, seed=0, step=0).shape == (32,)
  assert input_pipeline.steps_per_epoch(10, 4) == 3


def _take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def test_pretrain_batches_resume_at_any_step():
  arrays, config = fake_data.fake_arrays(), fake_data.config(batch_size=4)
  idx = np.arange(0, len(arrays), 7)  # 27 examples: step 6 crosses an epoch.
  continued = _take(input_pipeline.pretrain_batches(
      arrays, idx, config, seed=1, start_step=0), 7)
  resumed = _take(input_pipeline.pretrain_batches(
      arrays, idx, config, seed=1, start_step=5), 2)
  for expected, batch in zip(continued[5:], resumed):
    assert set(batch) == {'image1', 'image2'}
    for key in batch:
      np.testing.assert_array_equal(batch[key], expected[key])
  batch = continued[0]
  assert batch['image1'].shape == (4, fake_data.IMAGE_SIZE, fake_data.IMAGE_SIZE, 3)
  assert batch['image1'].dtype == np.float32
  assert 0.0 <= batch['image1'].min() and batch['image1'].max() <= 1.0
  # Gray repeated to three channels; the two views differ; so do the steps.
  np.testing.assert_array_equal(batch['image1'][..., 0], batch['image1'][..., 2])
  assert not np.array_equal(batch['image1'], batch['image2'])
  assert not np.array_equal(batch['image1'], continued[1]['image1'])
  other_seed = next(input_pipeline.pretrain_batches(
      arrays, idx, config, seed=2, start_step=0))
  assert not np.array_equal(batch['image1'], other_seed['image1'])


@pytest.mark.parametrize('make_batches', [input_pipeline.pretrain_batches,
                                          input_pipeline.supervised_batches])
def test_process_batches_concatenate_to_the_global_batch(make_batches):
  arrays, config = fake_data.fake_arrays(), fake_data.config(batch_size=8)
  idx = np.arange(30)
  global_batches = _take(make_batches(arrays, idx, config, seed=0,
                                      start_step=3), 2)
  local_batches = [
      _take(make_batches(arrays, idx, config, seed=0, start_step=3,
                         process_index=p, process_count=2), 2)
      for p in range(2)]
  for step, global_batch in enumerate(global_batches):
    for key, value in global_batch.items():
      assert local_batches[0][step][key].shape[0] == 4
      np.testing.assert_array_equal(
          np.concatenate([local[step][key] for local in local_batches]), value)
  with pytest.raises(ValueError, match='divisible'):
    make_batches(arrays, idx, config, seed=0, start_step=0, process_count=3)


def test_supervised_batches_pair_images_with_their_labels():
  arrays, config = fake_data.fake_arrays(), fake_data.config(
      batch_size=6, image_size=16, channels=1, train_augment=False)
  idx = np.arange(3, 60, 5)
  images = input_pipeline.preprocess(arrays.images[idx], config)
  seen = set()
  for batch in _take(input_pipeline.supervised_batches(
      arrays, idx, config, seed=0, start_step=0), 2):  # One epoch of 12.
    assert batch['label'].dtype == np.int32
    for image, label in zip(batch['image'], batch['label']):
      (match,) = np.flatnonzero(np.all(images == image, axis=(1, 2, 3)))
      assert label == arrays.labels[idx[match]]
      seen.add(match)
  assert seen == set(range(len(idx)))
  augmented = next(input_pipeline.supervised_batches(
      arrays, idx, fake_data.config(batch_size=6, train_augment=True), seed=0,
      start_step=0))
  assert augmented['image'].shape == (6, fake_data.IMAGE_SIZE, fake_data.IMAGE_SIZE, 3)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_pad_the_last_batch(process_count):
  arrays, config = fake_data.fake_arrays(), fake_data.config()
  idx = np.arange(10, 20)
  expected = input_pipeline.preprocess(arrays.images[idx], config)
  per_process = [
      list(input_pipeline.eval_batches(
          arrays, idx, config, batch_size=4, process_index=p,
          process_count=process_count))
      for p in range(process_count)]
  assert all(len(batches) == 3 for batches in per_process)
  # Reassemble the global batches from the processes' rows.
  images, labels, valid = (
      np.concatenate([np.concatenate([batches[step][key]
                                      for batches in per_process])
                      for step in range(3)])
      for key in ('image', 'label', 'valid'))
  assert valid.dtype == bool
  np.testing.assert_array_equal(valid, np.arange(12) < 10)
  np.testing.assert_array_equal(images[:10], expected)
  np.testing.assert_array_equal(labels[:10], arrays.labels[idx])


def test_preprocess_resizes_and_repeats_channels():
  arrays = fake_data.fake_arrays()
  images = input_pipeline.preprocess(
      arrays.images[:3], fake_data.config(image_size=8, channels=3))
  assert images.shape == (3, 8, 8, 3) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  same_size = input_pipeline.preprocess(
      arrays.images[:3], fake_data.config(image_size=16, channels=1))
  np.testing.assert_allclose(same_size, arrays.images[:3] / 255.0, atol=1e-6)
  with pytest.raises(ValueError, match='channels'):
    input_pipeline.preprocess(arrays.images[:3], fake_data.config(channels=2))
