"""Subject ids: which source a run uses, and ids recovered from near-duplicate slices.

A subject split needs to know whose slice each image is. synthetic_mri stores the
truth; alzheimer_mri's ids are inferred from its file numbering, which the audit
shows to be wrong for part of each subject; image_folder has none. Neighbouring
axial slices of one person are near-identical, so chains of mutual
near-duplicates recover each person's slices (`recovered_subject_ids`).
"""

import os

from absl import logging
import numpy as np

from simclr_jax import neighbours


def subject_id_source(config):
  """'dataset' (the builder's ids) or 'recovered', from config.subject_ids."""
  source = config.get('subject_ids', 'dataset')
  if source == 'auto':
    # synthetic_mri's and nifti_folder's ids are known by construction;
    # alzheimer_mri's are inferred from the file numbering, which the audit shows
    # to be wrong for part of each subject; image_folder has none.
    known = config.dataset.startswith('synthetic_mri') or config.dataset == 'nifti_folder'
    return 'dataset' if known else 'recovered'
  if source not in ('dataset', 'recovered'):
    raise ValueError(f'Unknown subject_ids {source!r}; set --config.subject_ids to '
                     'auto, dataset or recovered.')
  return source


def recovered_subject_ids(arrays, config, cache_dir=None):
  """Subject ids recovered from chains of near-duplicate slices (see neighbours).

  Neighbouring axial slices of one person are near-identical, so mutual
  near-duplicates chain a person's slices into one group. On the Kaggle data this
  finds exactly 200 groups of 32 slices (the audit reports the agreement with the
  file-numbering ids). Groups never span classes. The result is cached beside the
  TFDS data set, since it takes seconds to compute.
  """
  threshold = float(config.get('subject_grouping_threshold', 0.98))
  k = int(config.get('subject_grouping_k', 10))
  size = int(config.get('subject_grouping_size', 64))
  cache = None
  if cache_dir:
    cache = os.path.join(cache_dir, f'recovered_subjects_t{threshold}_k{k}_s{size}.npy')
    if os.path.exists(cache):
      ids = np.load(cache)
      if len(ids) == len(arrays):
        return ids
  features = neighbours.pixel_features(arrays.images, size)
  groups = neighbours.group_near_duplicates(features, threshold, k=k)
  _, ids = np.unique(np.stack([groups, arrays.labels]), axis=1, return_inverse=True)
  ids = ids.reshape(-1).astype(np.int64)
  sizes = np.bincount(ids)
  logging.info('Recovered %d subject groups from near-duplicate slices (median size %d, '
               'largest %d).', len(sizes), int(np.median(sizes)), int(sizes.max()))
  if cache:
    tmp = cache + '.tmp.npy'
    np.save(tmp, ids)
    os.replace(tmp, cache)  # Never a half-written cache file.
  return ids


