"""Tests of train/val/test splits, label subsets and the pretraining rows on fake data."""

import itertools
import logging

import numpy as np
import pytest

from simclr_jax import errors
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


# ---------------------------------------------------------------- Subject budgets.


def _subject_classes(arrays, rows):
  """{subject id: class} of the subjects of `rows`."""
  return dict(zip(arrays.subject_ids[rows].tolist(), arrays.labels[rows].tolist()))


def test_subject_budgets_are_whole_nested_stratified_subjects(caplog):
  arrays = fake_data.fake_arrays()  # 10 / 2 / 20 / 14 subjects of 4 slices per class.
  train = splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1)['train']
  train_classes = _subject_classes(arrays, train)
  sizes = np.bincount(list(train_classes.values()), minlength=len(fake_data.CLASS_NAMES))
  budgets = (1, 2, 3, 4, 8, 16, len(train_classes), 0)
  with caplog.at_level(logging.INFO):
    subsets = [splits_lib.subject_subset(arrays.labels, arrays.subject_ids, train, k, 5)
               for k in budgets]
  assert 'Label budget of 4 subjects' in caplog.text
  for smaller, larger in itertools.pairwise(subsets):
    assert set(smaller) <= set(larger)  # Nested: the 4 subjects lie inside the 8.
  np.testing.assert_array_equal(subsets[-1], train)  # 0: every train subject.
  np.testing.assert_array_equal(subsets[-2], train)
  by_class = np.argsort(-sizes, kind='stable')  # The classes, most train subjects first.
  for k, subset in zip(budgets, subsets):
    assert subset.dtype == np.int64 and np.all(np.diff(subset) > 0)
    chosen = _subject_classes(arrays, subset)
    assert len(chosen) == (k or len(train_classes))
    # Every chosen subject comes with all of its train slices, and only train slices.
    np.testing.assert_array_equal(subset, train[np.isin(arrays.subject_ids[train],
                                                        list(chosen))])
    counts = np.bincount(list(chosen.values()), minlength=len(sizes))
    if 0 < k < np.count_nonzero(sizes):  # Fewer subjects than classes: the largest classes.
      assert set(np.flatnonzero(counts)) == set(by_class[:k])
    else:  # One of every class present, then in proportion (within one of its quota).
      assert np.all(counts[sizes > 0] >= 1)
      assert np.all(np.abs(counts - len(chosen) * sizes / sizes.sum()) < 1)
  # The 8-subject budget of this split, worked by hand: one subject of each class
  # (7 / 1 / 14 / 10 train subjects), then Sainte-Laguë: Non, VeryMild, Non, Mild.
  np.testing.assert_array_equal(sizes, [7, 1, 14, 10])
  assert np.bincount(list(_subject_classes(arrays, subsets[4]).values())).tolist() == [2, 1, 3, 2]


def test_subject_budgets_follow_the_seed_not_the_row_order():
  arrays = fake_data.fake_arrays()
  train = splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1)['train']
  subset = splits_lib.subject_subset(arrays.labels, arrays.subject_ids, train, 8, 5)
  np.testing.assert_array_equal(
      subset, splits_lib.subject_subset(arrays.labels, arrays.subject_ids, train, 8, 5))
  assert not np.array_equal(
      subset, splits_lib.subject_subset(arrays.labels, arrays.subject_ids, train, 8, 6))
  shuffled = fake_data.shuffled(arrays, seed=2)
  shuffled_train = splits_lib.make_splits(shuffled, 'subject', 0, 0.2, 0.1)['train']
  again = splits_lib.subject_subset(shuffled.labels, shuffled.subject_ids, shuffled_train, 8, 5)
  assert set(arrays.file_names[subset]) == set(shuffled.file_names[again])


@pytest.mark.parametrize('k', [33, -1])
def test_a_subject_budget_beyond_the_train_subjects_is_a_one_line_error(k):
  arrays = fake_data.fake_arrays()
  train = splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1)['train']  # 32 subjects.
  with pytest.raises(errors.UserError) as error:
    splits_lib.subject_subset(arrays.labels, arrays.subject_ids, train, k, 0)
  message = str(error.value)
  assert '\n' not in message and 'the 32 subjects of the train split' in message
  assert '--config.labels.subjects' in message and '--config.sweep.subject_budgets' in message
  arrays.subject_ids[train[:3]] = -1
  with pytest.raises(errors.UserError, match=r'unknown subject ids.*labels\.unit=slice'):
    splits_lib.subject_subset(arrays.labels, arrays.subject_ids, train, 4, 0)


def test_budgets_label_name_and_order_themselves():
  slices, subjects = splits_lib.Budget('slice', 0.1), splits_lib.Budget('subject', 4)
  every, one = splits_lib.Budget('subject', 0), splits_lib.Budget('subject', 1)
  assert (slices.label, slices.name, slices.phrase) == ('10 %', 'f0.1', '10 % of the labels')
  assert (subjects.label, subjects.name) == ('4 subjects', 'k4')
  assert (every.label, every.name, every.is_all) == ('all subjects', 'kall', True)
  assert one.label == '1 subject' and splits_lib.ALL_SLICES.is_all and not subjects.is_all
  assert sorted([every, subjects, one], key=lambda b: b.sort_key) == [one, subjects, every]
  assert splits_lib.Budget.from_dict(subjects.to_dict()) == subjects


def test_labeled_rows_follow_the_labels_section():
  arrays = fake_data.fake_arrays()
  train = splits_lib.make_splits(arrays, 'subject', 0, 0.2, 0.1)['train']
  config = fake_data.config(label_fraction=0.5, label_seed=3)
  np.testing.assert_array_equal(splits_lib.labeled_rows(config, arrays, train),
                                splits_lib.label_subset(arrays.labels, train, 0.5, 3))
  config.labels.update(unit='subject', subjects=4, fraction=1.0)
  np.testing.assert_array_equal(
      splits_lib.labeled_rows(config, arrays, train),
      splits_lib.subject_subset(arrays.labels, arrays.subject_ids, train, 4, 3))


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
