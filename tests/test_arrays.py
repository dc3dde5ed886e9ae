"""Tests of loading a TFDS data set into arrays."""

import numpy as np
import pytest

from simclr_jax.data import arrays as arrays_lib
from simclr_jax.data import splits as splits_lib
from simclr_jax.data.datasets import alzheimer_mri
from simclr_jax.data.datasets import synthetic_mri
from tests import fake_data


def test_load_arrays_of_synthetic_mri(tmp_path):
  config = fake_data.config(dataset='synthetic_mri/small', data_dir=str(tmp_path),
                   image_size=32)
  arrays = arrays_lib.load_arrays(config)
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
  splits = splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1)
  assert sum(len(rows) for rows in splits.values()) == num_images


def test_load_arrays_rejects_an_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match='no_such_dataset'):
    arrays_lib.load_arrays(
        fake_data.config(dataset='no_such_dataset', data_dir=str(tmp_path)))


def test_binary_task_is_the_negative_class_against_every_other():
  arrays = fake_data.fake_arrays()
  config = fake_data.config(task='binary', binary_negative_class='Non')
  labels, class_names = arrays_lib.task_labels(arrays, config)
  assert class_names == ['Non', 'Demented']
  np.testing.assert_array_equal(labels, (arrays.labels != 2).astype(np.int32))
  same, names = arrays_lib.task_labels(arrays, fake_data.config(task='four_class'))
  assert same is arrays.labels and names == list(arrays.class_names)
  with pytest.raises(ValueError, match='--config.labels.binary_negative_class'):
    arrays_lib.task_labels(arrays, fake_data.config(task='binary'))  # No Non_Demented here.


def test_three_class_task_merges_mild_and_moderate():
  arrays = fake_data.fake_arrays()
  config = fake_data.config(task='three_class')
  with pytest.raises(ValueError, match=r"class 'Mild'.*--config\.labels\.task=four_class"):
    arrays_lib.task_labels(arrays, config)  # Classes without the CDR names are refused.
  arrays.class_names = list(alzheimer_mri.CLASS_NAMES)  # Mild, Moderate, Non, Very_Mild.
  labels, class_names = arrays_lib.task_labels(arrays, config)
  assert class_names == ['Non_Demented', 'Very_Mild_Demented', 'Mild_or_Moderate_Demented']
  assert labels.dtype == np.int32
  expected = {'Mild_Demented': 2, 'Moderate_Demented': 2, 'Non_Demented': 0,
              'Very_Mild_Demented': 1}
  for label, name in enumerate(arrays.class_names):
    assert np.all(labels[arrays.labels == label] == expected[name]), name
  # Every subject keeps one class; the merged class holds both source classes' subjects.
  assert np.bincount(labels).tolist() == [
      fake_data.SLICES_PER_SUBJECT * n for n in (20, 14, 10 + 2)]
  # A data set without any class of a group cannot make the three classes.
  keep = arrays.labels != 3
  arrays.labels, arrays.class_names = arrays.labels[keep], arrays.class_names[:3]
  with pytest.raises(ValueError, match='needs a class Very_Mild_Demented'):
    arrays_lib.task_labels(arrays, config)


def test_synthetic_data_has_the_classes_every_task_needs():
  for task in arrays_lib.TASKS:  # The embedded data set's class names are the Kaggle ones.
    arrays = fake_data.fake_arrays()
    arrays.class_names = list(synthetic_mri.CLASS_NAMES)
    labels, class_names = arrays_lib.task_labels(arrays, fake_data.config(task=task))
    assert len(class_names) == {'four_class': 4, 'three_class': 3, 'binary': 2}[task]
    assert set(np.unique(labels)) == set(range(len(class_names)))
