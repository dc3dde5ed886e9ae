"""The whole data set in memory: load a TFDS builder's single split into arrays.

Every TFDS builder of `simclr_jax.data.datasets` has one split, `train`, holding the
whole data set (6,400 x 128 x 128 x 1 uint8 = 105 MB for the Kaggle set); the
project's own train/val/test splits are computed from its metadata by
`splits.py`, and its subject ids may be recovered from the images by
`subjects.py`.
"""

import dataclasses
import json

from absl import logging
import jax
import numpy as np
import tensorflow_datasets as tfds

from simclr_jax.data import datasets
from simclr_jax import errors
from simclr_jax.parallel import distributed
from simclr_jax.data import subjects

_LOADED = {}


@dataclasses.dataclass
class DatasetArrays:
  """The whole data set in memory (6,400 x 128 x 128 x 1 uint8 = 105 MB).

  Attributes:
    images: uint8 [N, H, W, 1] at the stored size.
    labels: int32 [N] class indices into `class_names`.
    subject_ids: int64 [N], unique over the data set, -1 where unknown.
    slice_index: int32 [N], -1 where unknown.
    file_names: str [N].
    class_names: names of the classes, indexed by label.
    masks: uint8 [N, H, W, 1], 1 where the class signal lies (synthetic_mri
      only), else None.
  """
  images: np.ndarray
  labels: np.ndarray
  subject_ids: np.ndarray
  slice_index: np.ndarray
  file_names: np.ndarray
  class_names: list[str]
  masks: np.ndarray | None = None

  def __len__(self):
    return len(self.labels)


def class_counts(labels, class_names):
  """Returns 'name count, ...' for logging."""
  counts = np.bincount(labels, minlength=len(class_names))
  return ', '.join(f'{name} {count}' for name, count in zip(class_names, counts))


def load_arrays(config):
  """Builds the TFDS data set on first use and loads all of it into memory.

  Loaded once per process for a given data set (a sweep's runs share it); treat
  the arrays as read-only.

  Args:
    config: reads its `data` section (the data set's name, e.g. 'alzheimer_mri'
      or 'synthetic_mri/small', its paths, image size, NIfTI slices and subjects);
      the section decides which arrays are returned.

  Returns:
    A `DatasetArrays` of the builder's single `train` split, in its stored order.
  """
  # Where the arrays live on the devices does not change them.
  key = json.dumps({k: v for k, v in json.loads(config.data.to_json_best_effort()).items()
                   if k != 'on_device'}, sort_keys=True)
  if key not in _LOADED:
    _LOADED.clear()  # One data set in memory at a time.
    _LOADED[key] = _load_arrays(config)
  return _LOADED[key]


def _builder(config):
  return datasets.get_builder(
      config.data.name,
      data_dir=config.data.dir,
      dataset_path=config.data.path,
      image_size=config.data.image_size,
      skip_unreadable=config.data.skip_unreadable,
      nifti=config.data.nifti.to_dict())


def prepared_builder(config):
  """The data set's TFDS builder, its files built on first use.

  With several processes, process 0 builds the data set while the others wait
  (`distributed.prepare_once`: no two processes write the same TFDS directory),
  then every process reads it; a host whose data dir is on its own disk builds
  its copy with one process.
  """
  builder = _builder(config)
  distributed.prepare_once(builder.download_and_prepare, builder.is_prepared,
                        f'prepare the data set {config.data.name}')
  if jax.process_count() > 1:
    builder = _builder(config)  # Its dataset_info read anew from the prepared files.
  return builder


def _load_arrays(config):
  builder = prepared_builder(config)
  records = tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))
  class_names = list(builder.info.features['label'].names)
  arrays = DatasetArrays(
      images=records['image'],
      labels=records['label'].astype(np.int32),
      subject_ids=records['subject_id'].astype(np.int64),
      slice_index=records['slice_index'].astype(np.int32),
      file_names=np.array([name.decode('utf-8') for name in records['file_name']]),
      class_names=class_names,
      masks=records.get('mask'))
  logging.info(
      'Loaded %s: %d images of %s; per class: %s.', config.data.name,
      len(arrays), 'x'.join(map(str, arrays.images.shape[1:])),
      class_counts(arrays.labels, class_names))
  if subjects.subject_id_source(config) == 'recovered':
    arrays.subject_ids = subjects.recovered_subject_ids(arrays, config, builder.data_dir)
  return arrays


TASKS = ('four_class', 'binary', 'three_class')
# three_class: the clinical dementia rating groups CDR 0 / 0.5 / >= 1, each a class
# name and the data set's classes it merges (the Kaggle and synthetic class names).
THREE_CLASS_GROUPS = (('Non_Demented', ('Non_Demented',)),
                      ('Very_Mild_Demented', ('Very_Mild_Demented',)),
                      ('Mild_or_Moderate_Demented', ('Mild_Demented', 'Moderate_Demented')))


def task_labels(arrays, config):
  """The labels and class names of `config.labels.task` (four_class | binary | three_class).

  binary: `config.labels.binary_negative_class` (Non_Demented: CDR 0) is 0, every other
  class (CDR 0.5, 1, 2) is 1, 'Demented'. three_class: `three_class_labels`. Splits
  and label subsets are drawn on the data set's own classes whatever the task, so
  every task sees the same folds and the same labeled images.

  Returns:
    (int32 [N] labels, class names).
  """
  task = config.labels.task
  if task == 'four_class':
    return arrays.labels, list(arrays.class_names)
  if task == 'three_class':
    return three_class_labels(arrays, config.data.name)
  if task != 'binary':
    raise errors.UserError(f'Unknown task {task!r}; set --config.labels.task to one of {TASKS}.')
  negative = config.labels.binary_negative_class
  if negative not in arrays.class_names:
    raise errors.UserError(
        f'The binary task needs the class {negative!r}, which {config.data.name} does not '
        f'have; set --config.labels.binary_negative_class to one of {list(arrays.class_names)}.')
  labels = (arrays.labels != arrays.class_names.index(negative)).astype(np.int32)
  return labels, [negative, 'Demented']


def three_class_labels(arrays, dataset_name):
  """The three_class task: Non_Demented 0, Very_Mild_Demented 1, Mild_or_Moderate_Demented 2.

  CDR 0 / 0.5 / >= 1: Mild_Demented (CDR 1) and Moderate_Demented (CDR 2, 2 subjects
  in the Kaggle data) merge into one class. Every class of the data set must be one
  of the four, and each of the three groups must have a class.

  Returns:
    (int32 [N] labels, the three class names).
  """
  group_of = {name: k for k, (_, members) in enumerate(THREE_CLASS_GROUPS) for name in members}
  known = ', '.join(group_of)
  for name in arrays.class_names:
    if name not in group_of:
      raise errors.UserError(
          f'The three_class task merges the classes {known}; {dataset_name} has the class '
          f'{name!r}: name its class folders so, or set --config.labels.task=four_class.')
  for group, members in THREE_CLASS_GROUPS:
    if not set(members) & set(arrays.class_names):
      raise errors.UserError(
          f'The three_class task needs a class {" or ".join(members)} for {group}, which '
          f'{dataset_name} does not have; set --config.labels.task=binary or four_class.')
  mapping = np.array([group_of[name] for name in arrays.class_names], np.int32)
  return mapping[arrays.labels], [group for group, _ in THREE_CLASS_GROUPS]
