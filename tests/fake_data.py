"""Tiny fake data sets and configs shared by the data, split and batch tests."""

import importlib.util
import pathlib

import numpy as np

from simclr_jax.data import arrays as arrays_lib

from tests import conftest

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASS_NAMES = ['Mild', 'Moderate', 'Non', 'VeryMild']
# Subjects per class, shaped like the Kaggle data (28, 2, 100, 70) but smaller.
SUBJECTS_PER_CLASS = (10, 2, 20, 14)
SLICES_PER_SUBJECT = 4
IMAGE_SIZE = 12


def config(**overrides):
  """Returns configs/default.py's config, shrunk for tests."""
  spec = importlib.util.spec_from_file_location(
      'default_config', REPO / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.image_size = IMAGE_SIZE
  config.data.channels = 3
  config.train.batch_size = 8
  return conftest.with_fields(config, **overrides)


def fake_arrays(seed=0):
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
  return arrays_lib.DatasetArrays(
      images=rng.integers(0, 256, (num_images, 16, 16, 1), dtype=np.uint8),
      labels=np.array(labels, np.int32),
      subject_ids=np.array(subject_ids, np.int64),
      slice_index=np.array(slice_index, np.int32),
      file_names=np.array(file_names),
      class_names=CLASS_NAMES,
      masks=None)


def shuffled(arrays, seed):
  order = np.random.default_rng(seed).permutation(len(arrays))
  return arrays_lib.DatasetArrays(
      images=arrays.images[order], labels=arrays.labels[order],
      subject_ids=arrays.subject_ids[order],
      slice_index=arrays.slice_index[order],
      file_names=arrays.file_names[order], class_names=arrays.class_names)


def file_name_sets(arrays, splits):
  return {name: set(arrays.file_names[rows]) for name, rows in splits.items()}


def clustered_embeddings(rng, train_per_class, test_per_class, num_classes=3, dims=16):
  """Well-separated Gaussian clusters drawn from `rng`: (train_x, train_y, test_x, test_y)."""
  centres = rng.normal(size=(num_classes, dims)) * 5
  train_y = np.repeat(np.arange(num_classes), train_per_class)
  test_y = np.repeat(np.arange(num_classes), test_per_class)
  train_x = centres[train_y] + rng.normal(size=(len(train_y), dims))
  test_x = centres[test_y] + rng.normal(size=(len(test_y), dims))
  return train_x, train_y, test_x, test_y
