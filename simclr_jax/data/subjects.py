"""Subject ids: which source a run uses, and ids recovered from near-duplicate slices.

A subject split needs to know whose slice each image is. synthetic_mri stores the
truth; alzheimer_mri's ids are inferred from its file numbering, which the audit
shows to be wrong for part of each subject; image_folder has none. Neighbouring
axial slices of one person are near-identical, so chains of mutual
near-duplicates recover each person's slices (`recovered_subject_ids`).
"""

import hashlib
import uuid

from absl import logging
from etils import epath
import numpy as np

from simclr_jax import errors
from simclr_jax.metrics import neighbours
from simclr_jax.parallel import distributed


def subject_id_source(config):
  """'dataset' (the builder's ids) or 'recovered', from config.data.subject_ids."""
  source = config.data.subject_ids
  if source == 'auto':
    # synthetic_mri's and nifti_folder's ids are known by construction;
    # alzheimer_mri's are inferred from the file numbering, which the audit shows
    # to be wrong for part of each subject; image_folder has none.
    known = config.data.name.startswith('synthetic_mri') or config.data.name == 'nifti_folder'
    return 'dataset' if known else 'recovered'
  if source not in ('dataset', 'recovered'):
    raise errors.UserError(f'Unknown subject_ids {source!r}; set --config.data.subject_ids to '
                           'auto, dataset or recovered.')
  return source


def check_subject_pairs(config):
  """positive_pairs=subject needs stored subject ids: recovered groups have no slice order.

  The recovered groups (chains of near-duplicates) are not the subjects that the
  stored slice positions count in (alzheimer_mri's file numbering), so a partner's
  slice distance would mean nothing. Rows without ids or positions are refused
  later, on the data (`batches.SubjectPartners`).
  """
  if config.pretrain.positive_pairs == 'subject' and subject_id_source(config) == 'recovered':
    raise errors.UserError(
        '--config.pretrain.positive_pairs=subject needs subject ids and slice positions, but '
        f'{config.data.name}\'s subjects are recovered from near-duplicate slices, which have '
        'no slice positions; set --config.pretrain.positive_pairs=image, or '
        '--config.data.subject_ids=dataset where the data set stores both.')


def recovered_subject_ids(arrays, config, cache_dir=None):
  """Subject ids recovered from chains of near-duplicate slices (see neighbours).

  Neighbouring axial slices of one person are near-identical, so mutual
  near-duplicates chain a person's slices into one group. On the Kaggle data this
  finds exactly 200 groups of 32 slices (the audit reports the agreement with the
  file-numbering ids). Groups never span classes. The result is cached beside the
  TFDS data set (a local path or a URL), since it takes seconds to compute; with
  several processes, process 0 computes and writes it while the others wait, then
  every process reads it (`distributed.prepare_once`).
  """
  threshold = float(config.data.grouping.threshold)
  k = int(config.data.grouping.k)
  size = int(config.data.grouping.size)
  # The cache records the file names it was computed from, in order: a data set
  # rebuilt from other files (or in another order) recomputes the groups.
  files = hashlib.sha256('\n'.join(map(str, arrays.file_names)).encode()).hexdigest()
  if not cache_dir:
    return _recover(arrays, threshold, k, size)
  cache = epath.Path(cache_dir) / f'recovered_subjects_t{threshold}_k{k}_s{size}.npz'

  def write():
    ids = _recover(arrays, threshold, k, size)
    tmp = cache.parent / f'.{cache.name}.{uuid.uuid4().hex}.tmp'
    with tmp.open('wb') as f:
      np.savez(f, ids=ids, file_names_sha256=files)
    tmp.replace(cache)  # Never a half-written cache file.

  distributed.prepare_once(write, lambda: _read_cache(cache, files, len(arrays)) is not None,
                        'compute the recovered subject ids')
  ids = _read_cache(cache, files, len(arrays))
  if ids is None:  # The cache could not be written (a read-only data dir): computed here.
    ids = _recover(arrays, threshold, k, size)
  return ids


def _read_cache(cache, files, num_images):
  """The cached ids if `cache` holds those of these files, else None."""
  if not cache.exists():
    return None
  with cache.open('rb') as f, np.load(f) as cached:
    if str(cached['file_names_sha256']) == files and len(cached['ids']) == num_images:
      return cached['ids']
  logging.info('The recovered-subject cache %s was computed from other files; '
               'recomputing it.', cache)
  return None


def _recover(arrays, threshold, k, size):
  features = neighbours.pixel_features(arrays.images, size)
  groups = neighbours.group_near_duplicates(features, threshold, k=k)
  _, ids = np.unique(np.stack([groups, arrays.labels]), axis=1, return_inverse=True)
  ids = ids.reshape(-1).astype(np.int64)
  sizes = np.bincount(ids)
  logging.info('Recovered %d subject groups from near-duplicate slices (median size %d, '
               'largest %d).', len(sizes), int(np.median(sizes)), int(sizes.max()))
  return ids
