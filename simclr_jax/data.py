"""The whole data set in memory: load a TFDS builder's single split into arrays.

Every TFDS builder of `simclr_jax.datasets` has one split, `train`, holding the
whole data set (6,400 x 128 x 128 x 1 uint8 = 105 MB for the Kaggle set); the
project's own train/val/test splits are computed from its metadata by
`splits.py`, and its subject ids may be recovered from the images by
`subjects.py`.
"""

import dataclasses

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from simclr_jax import datasets
from simclr_jax import subjects


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

  Args:
    config: reads `dataset` (e.g. 'alzheimer_mri', 'synthetic_mri/small'),
      `data_dir`, `dataset_path`, `image_size`, `skip_unreadable`, the
      `nifti_*` slice settings and `subject_ids`.

  Returns:
    A `DatasetArrays` of the builder's single `train` split, in its stored order.
  """
  builder = datasets.get_builder(
      config.dataset,
      data_dir=config.data_dir,
      dataset_path=config.dataset_path,
      image_size=config.image_size,
      skip_unreadable=config.skip_unreadable,
      nifti_slice_selection=config.get('nifti_slice_selection', 'central'),
      nifti_num_slices=config.get('nifti_num_slices', 32),
      nifti_slice_step=config.get('nifti_slice_step', 1),
      nifti_min_mask_fraction=config.get('nifti_min_mask_fraction', 0.5))
  builder.download_and_prepare()
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
      'Loaded %s: %d images of %s; per class: %s.', config.dataset,
      len(arrays), 'x'.join(map(str, arrays.images.shape[1:])),
      class_counts(arrays.labels, class_names))
  if subjects.subject_id_source(config) == 'recovered':
    arrays.subject_ids = subjects.recovered_subject_ids(arrays, config, builder.data_dir)
  return arrays


