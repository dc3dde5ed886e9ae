"""Train / val / test splits, label subsets and the pretraining rows, from metadata.

Both split schemes work on any data set:

- `subject` (default): every slice of a person lands in one split. Neighbouring
  axial slices are near-identical, so anything else leaks test people into train.
- `slice`: the reference study's random slice-level split, kept to reproduce it.

A finetune or baseline run labels part of the train split, by its label budget
(`Budget`): a share of each class's train slices (`labels.unit=slice`,
`label_subset`), or k train subjects with all their slices (`labels.unit=subject`,
`subject_subset`), as a clinic labels people, not slices. Both are stratified by
class, nested (a smaller budget's rows lie inside a larger one's) and seeded.

Splits depend only on (seed, sorted subject ids or file names), never on the
order of the rows.
"""

import dataclasses
import warnings

from absl import logging
import numpy as np
from sklearn import model_selection

from simclr_jax.data import arrays as arrays_lib
from simclr_jax import errors

SPLIT_SCHEMES = ('subject', 'slice')
LABEL_UNITS = ('slice', 'subject')


@dataclasses.dataclass(frozen=True)
class Budget:
  """A label budget: how much of the train split a finetune or baseline run labels.

  The one representation of a budget: runs, workdir names, results.csv, results.md
  and the figures all read it from here.

  Attributes:
    unit: 'slice' (a share of each class's train slices) or 'subject' (k train
      subjects, each with all of their slices).
    size: slice: the share, in (0, 1]; subject: k >= 1, or 0 for every train subject.
  """
  unit: str
  size: float | int

  @classmethod
  def of_labels(cls, labels):
    """The budget of a config's `labels` section (unit, fraction, subjects)."""
    if labels.get('unit', 'slice') == 'subject':
      return cls('subject', int(labels.get('subjects') or 0))
    return cls('slice', float(labels.fraction))

  @property
  def is_all(self):
    """Whether the budget labels the whole train split (100 %, or all subjects)."""
    return self.size == 0 if self.unit == 'subject' else self.size >= 1.0

  @property
  def label(self):
    """'10 %', '4 subjects', '1 subject' or 'all subjects'."""
    if self.unit == 'slice':
      return f'{100 * self.size:g} %'
    if self.is_all:
      return 'all subjects'
    return f'{self.size} subject{"" if self.size == 1 else "s"}'

  @property
  def phrase(self):
    """The budget in a sentence: '10 % of the labels', 'the labels of 4 subjects'."""
    if self.unit == 'slice':
      return f'{self.label} of the labels'
    return f'the labels of {"all training subjects" if self.is_all else self.label}'

  @property
  def name(self):
    """Its part of a run's workdir name: 'f0.1' (a fraction), 'k4' or 'kall' (subjects)."""
    if self.unit == 'slice':
      return f'f{self.size:g}'
    return 'kall' if self.is_all else f'k{self.size}'

  @property
  def sort_key(self):
    """Smallest first within a unit, the whole train split last."""
    return LABEL_UNITS.index(self.unit), self.is_all, self.size

  def to_dict(self):
    return {'unit': self.unit, 'size': self.size, 'label': self.label}

  @classmethod
  def from_dict(cls, value):
    return cls(value['unit'], value['size'])


ALL_SLICES = Budget('slice', 1.0)


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


def make_splits(arrays, scheme, seed, test_fraction, val_fraction, num_folds=None,
                fold=0):
  """Splits the data set into train, val and test, stratified by class.

  The split depends only on (seed, sorted subject ids or file names), not on the
  order of the rows, so it is the same however the data set was loaded.

  With `num_folds` K, test is fold `fold` of a stratified K-fold partition of the
  subjects (or slices): scikit-learn's StratifiedGroupKFold over the rows, grouped
  by subject, so every subject is in the test split of exactly one fold and each
  fold holds about 1/K of every class's subjects; `test_fraction` is not used. A
  class with fewer subjects than folds is absent from some folds' test splits.

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
    num_folds: None for one split by `test_fraction`, or K >= 2 for K folds.
    fold: the fold (0 .. K - 1) whose subjects are the test split.

  Returns:
    {'train', 'val', 'test'}: sorted int64 row indices into `arrays`.

  Raises:
    ValueError: for an unknown scheme, fractions outside [0, 1), or the subject
      scheme on a data set whose subject ids are unknown.
  """
  if scheme not in SPLIT_SCHEMES:
    raise errors.UserError(
        f'Unknown split_scheme {scheme!r}; set it to one of {SPLIT_SCHEMES}.')
  for name, fraction in (('test_fraction', test_fraction),
                         ('val_fraction', val_fraction)):
    if not 0.0 <= fraction < 1.0:
      raise errors.UserError(f'{name} must be in [0, 1), got {fraction}; set '
                             f'config.{name} accordingly.')
  num_classes = len(arrays.class_names)

  if scheme == 'subject':
    num_unknown = int(np.sum(arrays.subject_ids < 0))
    if num_unknown:
      raise errors.UserError(
          f'{num_unknown} images have unknown subject ids (-1), so a subject '
          'split cannot keep a person\'s slices together; recover subject '
          'groups with the audit\'s subject grouping '
          '(simclr_jax.metrics.neighbours.group_near_duplicates) or set '
          '--config.split.scheme=slice.')
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
  if num_folds:
    split_of_unit[_fold_units(arrays, row_subject, num_folds, fold, seed)] = 2
    test_fraction = 0.0
  for label, class_name in enumerate(arrays.class_names):
    members = np.flatnonzero((subject_labels == label) & (split_of_unit == 0))
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
                 arrays_lib.class_counts(arrays.labels[rows], arrays.class_names))
  return splits


def _fold_units(arrays, row_subject, num_folds, fold, seed):
  """The units (subjects, or slices) of test fold `fold` of a stratified group K-fold."""
  if not 2 <= num_folds <= len(np.unique(row_subject)):
    raise errors.UserError(
        f'num_folds={num_folds} needs 2 to {len(np.unique(row_subject))} subjects; set '
        '--config.split.num_folds to e.g. 5 (or None for one split by test_fraction).')
  if not 0 <= fold < num_folds:
    raise errors.UserError(f'fold={fold} is not one of the {num_folds} folds; set '
                           f'--config.split.fold to 0 .. {num_folds - 1}.')
  # A canonical row order (by subject, then file name): the folds do not depend
  # on the order the data set was loaded in.
  order = np.lexsort((arrays.file_names, row_subject))
  folds = model_selection.StratifiedGroupKFold(n_splits=num_folds, shuffle=True,
                                               random_state=seed)
  with warnings.catch_warnings():
    # A class with fewer subjects than folds (Moderate_Demented: 2) is logged below.
    warnings.simplefilter('ignore', UserWarning)
    _, test_rows = list(folds.split(order, arrays.labels[order], row_subject[order]))[fold]
  units = np.unique(row_subject[order[test_rows]])
  for label, class_name in enumerate(arrays.class_names):
    class_units = np.unique(row_subject[arrays.labels == label])
    if 0 < len(class_units) < num_folds:
      logging.warning('Class %s has %d subjects for %d folds: %d of them in fold %d\'s '
                      'test split, none in %d folds.', class_name, len(class_units),
                      num_folds, np.isin(class_units, units).sum(), fold,
                      num_folds - len(class_units))
  return units


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
    raise errors.UserError(f'label_fraction must be in (0, 1], got {fraction}; set '
                           'config.labels.fraction to e.g. 0.01, 0.1 or 1.0.')
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


def subject_order(labels, subject_ids, train_idx, seed):
  """The train split's subjects in the order that subject budgets take them.

  Each subject's class is the class of most of its slices. Each class's subjects
  are put in one fixed random order (seeded by (seed, class), as `label_subset`
  orders slices), and the classes take turns: first one subject of every class
  present (the class with most train subjects first, ties by label), then always
  the next subject of the class with the largest n_c / (taken_c + 0.5), where n_c is
  the class's train subjects and taken_c those taken so far (Sainte-Laguë's
  proportional allocation; ties go to the larger class, then the lower label). A
  budget of k subjects takes the first k: stratified by class (every class present
  once k reaches the number of classes, then in proportion), and nested (the 4
  subjects lie inside the 8).

  Args:
    labels: int [N] labels of the whole data set (its own classes).
    subject_ids: int [N] subject ids of the whole data set.
    train_idx: int row indices of the train split.
    seed: seed of the per-class orders.

  Returns:
    (subject ids, their classes): int64 [S] and int64 [S] in budget order.

  Raises:
    UserError: if a train row's subject id is unknown (-1).
  """
  train_idx = np.sort(np.asarray(train_idx, np.int64))
  row_ids = subject_ids[train_idx]
  if np.any(row_ids < 0):
    raise errors.UserError(
        f'{int(np.sum(row_ids < 0))} train images have unknown subject ids (-1), so labels '
        'cannot be budgeted in subjects; set --config.data.subject_ids=recovered, or '
        '--config.labels.unit=slice (a sweep: --config.sweep.label_unit=slice).')
  subjects, row_subject = np.unique(row_ids, return_inverse=True)
  counts = np.zeros((len(subjects), int(labels.max(initial=0)) + 1), np.int64)
  np.add.at(counts, (row_subject, labels[train_idx]), 1)
  classes = counts.argmax(axis=1)
  queues = {int(c): np.random.default_rng([seed, int(c)]).permutation(subjects[classes == c])
            for c in np.unique(classes)}
  sizes = {c: len(queue) for c, queue in queues.items()}
  taken = dict.fromkeys(queues, 0)
  order, order_classes = [], []

  def take(c):
    order.append(queues[c][taken[c]])
    order_classes.append(c)
    taken[c] += 1

  for c in sorted(queues, key=lambda c: (-sizes[c], c)):  # One of each class first.
    take(c)
  while len(order) < len(subjects):  # Then Sainte-Laguë over the classes with subjects left.
    take(max((c for c in queues if taken[c] < sizes[c]),
             key=lambda c: (sizes[c] / (taken[c] + 0.5), sizes[c], -c)))
  return np.asarray(order, np.int64), np.asarray(order_classes, np.int64)


def subject_subset(labels, subject_ids, train_idx, num_subjects, seed):
  """Returns the labeled rows of a budget of `num_subjects` train subjects.

  The first `num_subjects` subjects of `subject_order` (stratified by class, nested,
  seeded), each with all of its train slices; 0 takes every train subject.

  Args:
    labels: int [N] labels of the whole data set (its own classes).
    subject_ids: int [N] subject ids of the whole data set.
    train_idx: int row indices of the train split.
    num_subjects: k >= 1, or 0 for all.
    seed: seed of the per-class orders.

  Returns:
    Sorted int64 row indices, a subset of `train_idx`.

  Raises:
    UserError: if k is negative or more than the train split's subjects (a budget
      is never quietly shrunk: a sweep would run the same subset twice).
  """
  train_idx = np.sort(np.asarray(train_idx, np.int64))
  order, classes = subject_order(labels, subject_ids, train_idx, seed)
  if not 0 <= num_subjects <= len(order):
    raise errors.UserError(
        f'A label budget of {num_subjects} subjects does not fit the {len(order)} subjects '
        f'of the train split; set --config.labels.subjects (a sweep: '
        f'--config.sweep.subject_budgets) to 1 .. {len(order)}, or 0 for all of them.')
  count = num_subjects or len(order)
  rows = train_idx[np.isin(subject_ids[train_idx], order[:count])]
  logging.info('Label budget of %s: %d of %d train images; subjects per class label: %s.',
               Budget('subject', num_subjects).label, len(rows), len(train_idx),
               {int(c): int(n) for c, n in zip(*np.unique(classes[:count], return_counts=True))})
  return rows


def budget_subset(arrays, train_idx, budget, seed):
  """The labeled rows of `budget` (a `Budget`): `label_subset` or `subject_subset`."""
  if budget.unit == 'subject':
    return subject_subset(arrays.labels, arrays.subject_ids, train_idx, budget.size, seed)
  return label_subset(arrays.labels, train_idx, budget.size, seed)


def labeled_rows(config, arrays, train_idx):
  """The labeled rows of a finetune or baseline run: its `labels` section's budget and seed."""
  return budget_subset(arrays, train_idx, Budget.of_labels(config.labels), config.labels.seed)


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


# A user's folder of images or volumes: a class that cannot be cross-validated is an
# error there. The shipped data sets keep theirs with a warning (the Kaggle set's 2
# Moderate_Demented subjects; the one of the small synthetic set that tests use).
USER_FOLDERS = ('image_folder', 'nifti_folder')


def check_classes_can_be_cross_validated(arrays):
  """Raises a UserError for a class of fewer than 2 subjects (known subject ids only).

  Under subject cross-validation a class's only subject is tested by the one fold
  whose training never saw the class: its scores would measure nothing.
  """
  for label, class_name in enumerate(arrays.class_names):
    subjects = np.unique(arrays.subject_ids[arrays.labels == label])
    if len(subjects) == 1 and subjects[0] >= 0:
      raise errors.UserError(
          f'Class {class_name} has 1 subject: subject cross-validation needs at least 2 '
          'per class (one to train on, one to test); add subjects of that class, remove '
          'its folder, or set --config.split.num_folds=None for one split by test_fraction.')


def load_splits(config, arrays, scheme=None):
  """The splits of `arrays` that `config` asks for (split_scheme, split_seed, fractions).

  Every mode that needs a run's splits (training, predict's test split, the
  sweep's floor, the audit) calls this one function. `scheme` overrides
  `config.split.scheme` (the audit compares both schemes).
  """
  scheme = scheme or config.split.scheme
  if config.split.num_folds and scheme == 'subject' and config.data.name in USER_FOLDERS:
    check_classes_can_be_cross_validated(arrays)
  return make_splits(arrays, scheme, config.split.seed,
                     config.split.test_fraction, config.split.val_fraction,
                     num_folds=config.split.num_folds, fold=config.split.fold)
