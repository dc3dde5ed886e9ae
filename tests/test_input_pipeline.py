"""Tests of splits, label subsets and batch iterators on tiny fake data."""

import importlib.util
import itertools
import logging
import pathlib

import numpy as np
import pytest

from simclr_jax import input_pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASS_NAMES = ['Mild', 'Moderate', 'Non', 'VeryMild']
# Subjects per class, shaped like the Kaggle data (28, 2, 100, 70) but smaller.
SUBJECTS_PER_CLASS = (10, 2, 20, 14)
SLICES_PER_SUBJECT = 4
IMAGE_SIZE = 12


def _config(**overrides):
  """Returns configs/default.py's config, shrunk for tests."""
  spec = importlib.util.spec_from_file_location(
      'default_config', REPO / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.image_size = IMAGE_SIZE
  config.channels = 3
  config.batch_size = 8
  config.update(overrides)
  return config


def _fake_arrays(seed=0):
  """Returns random images of subjects with SLICES_PER_SUBJECT slices each."""
  rng = np.random.default_rng(seed)
  labels, subject_ids, slice_index, file_names = [], [], [], []
  subject = 0
  for label, num_subjects in enumerate(SUBJECTS_PER_CLASS):
    for _ in range(num_subjects):
      for k in range(SLICES_PER_SUBJECT):
        labels.append(label)
        subject_ids.append(1000 + subject)
        slice_index.append(k)
        file_names.append(f'{CLASS_NAMES[label]}_{subject}_{k}.jpg')
      subject += 1
  num_images = len(labels)
  return input_pipeline.DatasetArrays(
      images=rng.integers(0, 256, (num_images, 16, 16, 1), dtype=np.uint8),
      labels=np.array(labels, np.int32),
      subject_ids=np.array(subject_ids, np.int64),
      slice_index=np.array(slice_index, np.int32),
      file_names=np.array(file_names),
      class_names=CLASS_NAMES,
      masks=None)


def _shuffled(arrays, seed):
  order = np.random.default_rng(seed).permutation(len(arrays))
  return input_pipeline.DatasetArrays(
      images=arrays.images[order], labels=arrays.labels[order],
      subject_ids=arrays.subject_ids[order],
      slice_index=arrays.slice_index[order],
      file_names=arrays.file_names[order], class_names=arrays.class_names)


def _file_name_sets(arrays, splits):
  return {name: set(arrays.file_names[rows]) for name, rows in splits.items()}


# ---------------------------------------------------------------- Splits.


@pytest.mark.parametrize('scheme', ['subject', 'slice'])
def test_splits_are_deterministic_and_independent_of_row_order(scheme):
  arrays = _fake_arrays()
  splits = input_pipeline.make_splits(arrays, scheme, 3, 0.2, 0.1)
  again = input_pipeline.make_splits(arrays, scheme, 3, 0.2, 0.1)
  for name in splits:
    np.testing.assert_array_equal(splits[name], again[name])
    assert splits[name].dtype == np.int64
    assert np.all(np.diff(splits[name]) > 0)  # Sorted, no duplicates.
  shuffled = _shuffled(arrays, seed=1)
  assert (_file_name_sets(arrays, splits) == _file_name_sets(
      shuffled, input_pipeline.make_splits(shuffled, scheme, 3, 0.2, 0.1)))
  other_seed = input_pipeline.make_splits(arrays, scheme, 4, 0.2, 0.1)
  assert not np.array_equal(splits['test'], other_seed['test'])


def test_subject_split_keeps_subjects_together_and_stratifies(caplog):
  arrays = _fake_arrays()
  with caplog.at_level(logging.WARNING):
    splits = input_pipeline.make_splits(arrays, 'subject', 0, 0.2, 0.1)
  all_rows = np.concatenate(list(splits.values()))
  np.testing.assert_array_equal(np.sort(all_rows), np.arange(len(arrays)))
  subjects = {name: set(arrays.subject_ids[rows])
              for name, rows in splits.items()}
  assert not subjects['train'] & subjects['val']
  assert not subjects['train'] & subjects['test']
  assert not subjects['val'] & subjects['test']
  for label, num_subjects in enumerate(SUBJECTS_PER_CLASS):
    test_subjects = len(set(arrays.subject_ids[splits['test']][
        arrays.labels[splits['test']] == label]))
    val_subjects = len(set(arrays.subject_ids[splits['val']][
        arrays.labels[splits['val']] == label]))
    assert test_subjects == max(1, round(0.2 * num_subjects))
    assert np.any(arrays.labels[splits['train']] == label)
    if num_subjects >= 3:
      assert val_subjects >= 1
  # The two-subject class: one in test, one in train, none in val, and a warning.
  assert not np.any(arrays.labels[splits['val']] == 1)
  assert 'Moderate' in caplog.text


def test_slice_split_sizes_are_stratified_80_20():
  arrays = _fake_arrays()
  splits = input_pipeline.make_splits(arrays, 'slice', 0, 0.2, 0.0)
  assert len(splits['val']) == 0
  for label, num_subjects in enumerate(SUBJECTS_PER_CLASS):
    num_slices = num_subjects * SLICES_PER_SUBJECT
    assert np.sum(arrays.labels[splits['test']] == label) == round(
        0.2 * num_slices)
  # Unlike the subject split, subjects straddle train and test.
  assert (set(arrays.subject_ids[splits['train']]) &
          set(arrays.subject_ids[splits['test']]))


def test_subject_split_with_unknown_subjects_names_the_fix():
  arrays = _fake_arrays()
  arrays.subject_ids[:5] = -1
  with pytest.raises(ValueError, match='split_scheme=slice'):
    input_pipeline.make_splits(arrays, 'subject', 0, 0.2, 0.1)
  input_pipeline.make_splits(arrays, 'slice', 0, 0.2, 0.1)  # Works.


def test_bad_split_arguments_raise():
  arrays = _fake_arrays()
  with pytest.raises(ValueError, match='split_scheme'):
    input_pipeline.make_splits(arrays, 'patient', 0, 0.2, 0.1)
  with pytest.raises(ValueError, match='test_fraction'):
    input_pipeline.make_splits(arrays, 'subject', 0, 1.0, 0.1)


# ---------------------------------------------------------------- Label subsets.


def test_label_subsets_are_nested_stratified_and_deterministic(caplog):
  arrays = _fake_arrays()
  train = input_pipeline.make_splits(arrays, 'slice', 0, 0.2, 0.1)['train']
  fractions = (0.01, 0.1, 0.2, 0.5, 1.0)
  with caplog.at_level(logging.INFO):
    subsets = [input_pipeline.label_subset(arrays.labels, train, fraction, 5)
               for fraction in fractions]
  assert 'Label fraction 0.01' in caplog.text
  for smaller, larger in itertools.pairwise(subsets):
    assert set(smaller) < set(larger)
  np.testing.assert_array_equal(subsets[-1], train)
  train_counts = np.bincount(arrays.labels[train])
  for fraction, subset in zip(fractions, subsets):
    assert set(subset) <= set(train)
    counts = np.bincount(arrays.labels[subset], minlength=len(CLASS_NAMES))
    np.testing.assert_array_equal(
        counts, np.maximum(1, np.round(fraction * train_counts)))
    np.testing.assert_array_equal(
        subset, input_pipeline.label_subset(arrays.labels, train, fraction, 5))
  assert not np.array_equal(
      subsets[1], input_pipeline.label_subset(arrays.labels, train, 0.1, 6))


@pytest.mark.parametrize('fraction', [0.0, -0.1, 1.5])
def test_label_subset_rejects_fractions_outside_0_1(fraction):
  with pytest.raises(ValueError, match=r'label_fraction'):
    input_pipeline.label_subset(np.zeros(10, np.int32), np.arange(10),
                                fraction, 0)


def test_pretrain_indices_add_test_only_when_asked(caplog):
  splits = {'train': np.array([0, 4]), 'val': np.array([2]),
            'test': np.array([1, 3])}
  np.testing.assert_array_equal(
      input_pipeline.pretrain_indices(splits, include_test=False), [0, 2, 4])
  with caplog.at_level(logging.WARNING):
    rows = input_pipeline.pretrain_indices(splits, include_test=True)
  np.testing.assert_array_equal(rows, [0, 1, 2, 3, 4])
  assert 'transductive' in caplog.text


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
  arrays, config = _fake_arrays(), _config(batch_size=4)
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
  assert batch['image1'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
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
  arrays, config = _fake_arrays(), _config(batch_size=8)
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
  arrays, config = _fake_arrays(), _config(
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
      arrays, idx, _config(batch_size=6, train_augment=True), seed=0,
      start_step=0))
  assert augmented['image'].shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_pad_the_last_batch(process_count):
  arrays, config = _fake_arrays(), _config()
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
  arrays = _fake_arrays()
  images = input_pipeline.preprocess(
      arrays.images[:3], _config(image_size=8, channels=3))
  assert images.shape == (3, 8, 8, 3) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  same_size = input_pipeline.preprocess(
      arrays.images[:3], _config(image_size=16, channels=1))
  np.testing.assert_allclose(same_size, arrays.images[:3] / 255.0, atol=1e-6)
  with pytest.raises(ValueError, match='channels'):
    input_pipeline.preprocess(arrays.images[:3], _config(channels=2))


# ---------------------------------------------------------------- TFDS.


def test_load_arrays_of_synthetic_mri(tmp_path):
  datasets = pytest.importorskip('simclr_jax.datasets')
  if not hasattr(datasets, 'get_builder'):
    pytest.skip('simclr_jax.datasets.get_builder is not written yet.')
  config = _config(dataset='synthetic_mri/small', data_dir=str(tmp_path),
                   image_size=32)
  arrays = input_pipeline.load_arrays(config)
  num_images = len(arrays)
  assert num_images > 0
  assert arrays.images.dtype == np.uint8 and arrays.images.ndim == 4
  assert arrays.images.shape[-1] == 1
  assert arrays.labels.shape == (num_images,)
  assert arrays.labels.max() < len(arrays.class_names)
  assert arrays.subject_ids.shape == (num_images,)
  assert np.all(arrays.subject_ids >= 0)
  assert arrays.file_names.shape == (num_images,)
  assert isinstance(arrays.file_names[0], str)
  assert arrays.masks is not None and arrays.masks.shape == arrays.images.shape
  splits = input_pipeline.make_splits(arrays, 'subject', 0, 0.2, 0.1)
  assert sum(len(rows) for rows in splits.values()) == num_images


def test_load_arrays_rejects_an_unknown_dataset(tmp_path):
  datasets = pytest.importorskip('simclr_jax.datasets')
  if not hasattr(datasets, 'get_builder'):
    pytest.skip('simclr_jax.datasets.get_builder is not written yet.')
  with pytest.raises(ValueError, match='no_such_dataset'):
    input_pipeline.load_arrays(
        _config(dataset='no_such_dataset', data_dir=str(tmp_path)))
