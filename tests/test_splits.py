"""Tests of train/val/test splits, label subsets and the pretraining rows on fake data."""

import itertools
import logging

import numpy as np
import pytest

from simclr_jax.data import splits as splits_lib
from tests import fake_data


# ---------------------------------------------------------------- Splits.


@pytest.mark.parametrize('scheme', ['subject', 'slice'])
def test_splits_are_deterministic_and_independent_of_row_order(scheme):
  arrays = fake_data.fake_arrays()
  splits = splits_lib.make_splits(arrays, scheme, 3, 0.2, 0.1)
  again = splits_lib.make_splits(arrays, scheme, 3, 0.2, 0.1)
  for name in splits:
    np.testing.assert_array_equal(splits[name], again[name])
    assert splits[name].dtype == np.int64
    assert np.all(np.diff(splits[name]) > 0)  # Sorted, no duplicates.
  shuffled = fake_data.shuffled(arrays, seed=1)
  assert (fake_data.file_name_sets(arrays, splits) == fake_data.file_name_sets(
      shuffled, splits_lib.make_splits(shuffled, scheme, 3, 0.2, 0.1)))
  other_seed = splits_lib.make_splits(arrays, scheme, 4, 0.2, 0.1)
  assert not np.array_equal(splits['test'], other_seed['test'])


def test_subject_split_keeps_subjects_together_and_stratifies(caplog):
  arrays = fake_data.fake_arrays()
  with caplog.at_level(logging.WARNING):
    splits = splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1)
  all_rows = np.concatenate(list(splits.values()))
  np.testing.assert_array_equal(np.sort(all_rows), np.arange(len(arrays)))
  subjects = {name: set(arrays.subject_ids[rows])
              for name, rows in splits.items()}
  assert not subjects['train'] & subjects['val']
  assert not subjects['train'] & subjects['test']
  assert not subjects['val'] & subjects['test']
  for label, num_subjects in enumerate(fake_data.SUBJECTS_PER_CLASS):
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
  arrays = fake_data.fake_arrays()
  splits = splits_lib.make_splits(arrays, 'slice', 0, 0.2, 0.0)
  assert len(splits['val']) == 0
  for label, num_subjects in enumerate(fake_data.SUBJECTS_PER_CLASS):
    num_slices = num_subjects * fake_data.SLICES_PER_SUBJECT
    assert np.sum(arrays.labels[splits['test']] == label) == round(
        0.2 * num_slices)
  # Unlike the subject split, subjects straddle train and test.
  assert (set(arrays.subject_ids[splits['train']]) &
          set(arrays.subject_ids[splits['test']]))


def test_subject_split_with_unknown_subjects_names_the_fix():
  arrays = fake_data.fake_arrays()
  arrays.subject_ids[:5] = -1
  with pytest.raises(ValueError, match=r'split\.scheme=slice'):
    splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1)
  splits_lib.make_splits(arrays, 'slice', 0, 0.2, 0.1)  # Works.


def test_bad_split_arguments_raise():
  arrays = fake_data.fake_arrays()
  with pytest.raises(ValueError, match='split_scheme'):
    splits_lib.make_splits(arrays, 'patient', 0, 0.2, 0.1)
  with pytest.raises(ValueError, match='test_fraction'):
    splits_lib.make_splits(arrays, 'subject', 0, 1.0, 0.1)


# ---------------------------------------------------------------- Label subsets.


def test_label_subsets_are_nested_stratified_and_deterministic(caplog):
  arrays = fake_data.fake_arrays()
  train = splits_lib.make_splits(arrays, 'slice', 0, 0.2, 0.1)['train']
  fractions = (0.01, 0.1, 0.2, 0.5, 1.0)
  with caplog.at_level(logging.INFO):
    subsets = [splits_lib.label_subset(arrays.labels, train, fraction, 5)
               for fraction in fractions]
  assert 'Label fraction 0.01' in caplog.text
  for smaller, larger in itertools.pairwise(subsets):
    assert set(smaller) < set(larger)
  np.testing.assert_array_equal(subsets[-1], train)
  train_counts = np.bincount(arrays.labels[train])
  for fraction, subset in zip(fractions, subsets):
    assert set(subset) <= set(train)
    counts = np.bincount(arrays.labels[subset], minlength=len(fake_data.CLASS_NAMES))
    np.testing.assert_array_equal(
        counts, np.maximum(1, np.round(fraction * train_counts)))
    np.testing.assert_array_equal(
        subset, splits_lib.label_subset(arrays.labels, train, fraction, 5))
  assert not np.array_equal(
      subsets[1], splits_lib.label_subset(arrays.labels, train, 0.1, 6))


@pytest.mark.parametrize('fraction', [0.0, -0.1, 1.5])
def test_label_subset_rejects_fractions_outside_0_1(fraction):
  with pytest.raises(ValueError, match=r'label_fraction'):
    splits_lib.label_subset(np.zeros(10, np.int32), np.arange(10),
                                fraction, 0)


def test_pretrain_indices_add_test_only_when_asked(caplog):
  splits = {'train': np.array([0, 4]), 'val': np.array([2]),
            'test': np.array([1, 3])}
  np.testing.assert_array_equal(
      splits_lib.pretrain_indices(splits, include_test=False), [0, 2, 4])
  with caplog.at_level(logging.WARNING):
    rows = splits_lib.pretrain_indices(splits, include_test=True)
  np.testing.assert_array_equal(rows, [0, 1, 2, 3, 4])
  assert 'transductive' in caplog.text


# ---------------------------------------------------------------- Cross-validation folds.


def test_folds_test_every_subject_once_stratified_with_validation_from_training():
  arrays = fake_data.fake_arrays()  # 10 / 2 / 20 / 14 subjects per class.
  folds = [splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1, num_folds=4, fold=k)
           for k in range(4)]
  test_subjects = [set(arrays.subject_ids[f['test']]) for f in folds]
  every = set(arrays.subject_ids)
  assert set.union(*test_subjects) == every
  assert sum(len(s) for s in test_subjects) == len(every)  # Each subject tested once.
  for split in folds:
    named = {name: set(arrays.subject_ids[rows]) for name, rows in split.items()}
    assert not (named['train'] & named['val'] or named['train'] & named['test']
                or named['val'] & named['test'])
    assert named['train'] | named['val'] | named['test'] == every
    assert named['val']  # Validation subjects come from the fold's training subjects.
  # Stratified: every class with at least 4 subjects is in every fold's test split.
  for label, num_subjects in enumerate(fake_data.SUBJECTS_PER_CLASS):
    counts = [len(np.unique(arrays.subject_ids[f['test']][arrays.labels[f['test']] == label]))
              for f in folds]
    if num_subjects >= 4:
      assert min(counts) >= 1 and max(counts) - min(counts) <= 1
  # The folds do not depend on the order of the rows.
  shuffled = fake_data.shuffled(arrays, seed=3)
  again = splits_lib.make_splits(shuffled, 'subject', 0, 0.2, 0.1, num_folds=4, fold=2)
  assert fake_data.file_name_sets(arrays, folds[2]) == fake_data.file_name_sets(shuffled, again)


def test_bad_fold_settings_name_the_fix():
  arrays = fake_data.fake_arrays()
  with pytest.raises(ValueError, match='--config.split.fold'):
    splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1, num_folds=3, fold=3)
  with pytest.raises(ValueError, match='--config.split.num_folds'):
    splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1, num_folds=1000, fold=0)


def test_a_users_class_of_one_subject_is_an_error_before_cross_validation():
  arrays = fake_data.fake_arrays()
  moderate = arrays.labels == 1
  # The class's two subjects become one.
  arrays.subject_ids[moderate] = arrays.subject_ids[moderate][0]
  config = fake_data.config(num_folds=5, fold=0, split_scheme='subject')
  for dataset in splits_lib.USER_FOLDERS:
    config.data.name = dataset
    with pytest.raises(ValueError, match='Class Moderate has 1 subject.*--config.split.num_folds'):
      splits_lib.load_splits(config, arrays)
  # One split by test_fraction, the slice scheme and the shipped data sets go on.
  splits_lib.load_splits(config, arrays, scheme='slice')
  config.split.num_folds = None
  splits_lib.load_splits(config, arrays)
  config.update(dataset='alzheimer_mri', num_folds=5)
  splits = splits_lib.load_splits(config, arrays)
  assert len(splits['test']) > 0
