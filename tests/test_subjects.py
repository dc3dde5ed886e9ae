"""Tests of the recovered subject ids and their cache."""

import dataclasses
import logging

import numpy as np

from simclr_jax.data import subjects
from tests import fake_data


def _chains(num_subjects=6, slices=5, size=16, seed=0):
  """Fake data in which each subject's slices are near-identical (a slow drift)."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (num_subjects, 1, size, size, 1)).astype(np.float32)
  drift = rng.normal(0, 2, (num_subjects, slices, size, size, 1)).cumsum(axis=1)
  images = np.clip(base + drift, 0, 255).astype(np.uint8).reshape(-1, size, size, 1)
  arrays = fake_data.fake_arrays()
  n = len(images)
  return dataclasses.replace(
      arrays, images=images, labels=np.repeat(np.arange(num_subjects) % 2, slices).astype(np.int32),
      subject_ids=np.full(n, -1, np.int64), slice_index=np.tile(np.arange(slices), num_subjects),
      file_names=np.array([f'img_{i}.jpg' for i in range(n)]), class_names=['a', 'b'])


def test_recovered_groups_are_cached_and_recomputed_for_other_files(tmp_path, caplog):
  arrays = _chains()
  config = fake_data.config(subject_grouping_size=16, subject_grouping_threshold=0.9,
                            subject_grouping_k=4)
  ids = subjects.recovered_subject_ids(arrays, config, str(tmp_path))
  assert len(np.unique(ids)) == 6  # One group per subject.
  cached = subjects.recovered_subject_ids(
      dataclasses.replace(arrays, images=np.zeros_like(arrays.images)), config, str(tmp_path))
  np.testing.assert_array_equal(cached, ids)  # Same files: read from the cache.
  renamed = dataclasses.replace(arrays, images=np.zeros_like(arrays.images),
                                file_names=np.array([f'other_{i}.jpg'
                                                     for i in range(len(arrays))]))
  with caplog.at_level(logging.INFO):
    recomputed = subjects.recovered_subject_ids(renamed, config, str(tmp_path))
  assert 'computed from other files' in caplog.text
  # Recomputed from the (blank) images, not read back: blank images link nothing.
  assert len(np.unique(recomputed)) == len(arrays)
