"""Chunked nearest neighbours by correlation or cosine similarity.

Used by the pretraining kNN monitor (embeddings, cosine), by the raw-pixel
1-nearest-neighbour floor of the study (pixels, correlation) and by the leakage
audit (near-duplicate slices and subject grouping). Numpy and jax only: this
module knows nothing of data sets, models or training.

Similarities are computed block by block: a block of queries against a block of
keys is one matmul, and a running top-k is merged after each block, so memory
is bounded by the chunk size whatever the number of images. Inputs only need
numpy slicing (`x[start:stop]`), so an `np.memmap` of a data set larger than
memory works unchanged.
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from simclr_jax import errors
from simclr_jax.parallel import sharding

METRICS = ('correlation', 'cosine')


def pixel_features(images, size=None, chunk_size=1024, out=None):
  """Flattened, optionally area-downsampled pixels: the raw-pixel features.

  Args:
    images: [n, h, w] or [n, h, w, c] array of any numeric dtype.
    size: output side length; None keeps the stored size. Area averaging is an
      anti-aliasing filter, so small features still reflect the whole image.
    chunk_size: images resized at a time (bounds memory).
    out: optional float32 [n, size * size * c] array to fill, e.g. an
      np.memmap when the features do not fit in memory.

  Returns:
    float32 [n, size * size * c] (`out` if given).
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(
        f'pixel_features expects [n, h, w] or [n, h, w, c] images, got shape '
        f'{images.shape}.')
  n, height, width, channels = images.shape
  size = size or height
  features = np.empty((n, size * size * channels), np.float32) if (
      out is None) else out
  for start in range(0, n, chunk_size):
    chunk = np.asarray(images[start:start + chunk_size], np.float32)
    if (size, size) != (height, width):
      chunk = np.asarray(jax.image.resize(
          chunk, (chunk.shape[0], size, size, channels), method='area'))
    features[start:start + chunk_size] = chunk.reshape(chunk.shape[0], -1)
  return features


def _check_metric(metric):
  if metric not in METRICS:
    raise errors.UserError(f'Unknown metric {metric!r}; use one of {METRICS}.')


@functools.partial(jax.jit, static_argnames=('metric',))
def _normalise(x, metric):
  """Unit-norm rows (mean-centred first for correlation); zero rows stay 0."""
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  if metric == 'correlation':
    x = x - x.mean(axis=1, keepdims=True)
  norm = jnp.linalg.norm(x, axis=1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=('k', 'metric'))
def _merge_top_k(best_similarities, best_indices, queries, keys, key_indices,
                 query_self, key_self, query_groups, key_groups, *, k, metric):
  """Merges one key block into the running top-k of one query block."""
  keys = _normalise(keys, metric)
  # HIGHEST keeps float32 on GPUs, where TF32 would blur 0.99 vs 0.995.
  similarities = jnp.matmul(
      queries, keys.T, precision=jax.lax.Precision.HIGHEST)
  excluded = ((key_indices < 0)[None, :]
              | (query_self[:, None] == key_self[None, :])
              | (query_groups[:, None] == key_groups[None, :]))
  similarities = jnp.where(excluded, -jnp.inf, similarities)
  candidates = jnp.concatenate([best_similarities, similarities], axis=1)
  candidate_indices = jnp.concatenate(
      [best_indices,
       jnp.broadcast_to(key_indices, (queries.shape[0], keys.shape[0]))],
      axis=1)
  top_similarities, positions = jax.lax.top_k(candidates, k)
  return top_similarities, jnp.take_along_axis(candidate_indices, positions, 1)


def _group_codes(query_groups, key_groups):
  """Recodes two group-id vectors into shared int32 codes, unknown (<0) apart."""
  query_groups = np.asarray(query_groups, np.int64)
  key_groups = np.asarray(key_groups, np.int64)
  _, codes = np.unique(np.concatenate([query_groups, key_groups]),
                       return_inverse=True)
  codes = codes.astype(np.int32)
  query_codes, key_codes = codes[:len(query_groups)], codes[len(query_groups):]
  return (np.where(query_groups < 0, -1, query_codes),
          np.where(key_groups < 0, -2, key_codes))


def nearest_neighbours(
    queries,
    keys,
    k: int = 1,
    metric: str = 'correlation',
    exclude_self: bool = False,
    query_groups=None,
    key_groups=None,
    chunk_size: int = 1024,
    progress: Optional[Callable[[int, int], None]] = None):
  """The k most similar keys of every query, computed block by block.

  Correlation is the Pearson correlation of the flattened arrays, i.e. the
  cosine similarity of mean-centred vectors; cosine uses the vectors as given.

  Args:
    queries: [n, ...] array (flattened per row); anything that supports
      `queries[start:stop]`, e.g. an np.memmap or an array on the devices.
    keys: [m, ...] array with the same trailing size as `queries`.
    k: neighbours returned per query.
    metric: 'correlation' or 'cosine'.
    exclude_self: queries and keys are the same items in the same order; key i
      is never a neighbour of query i.
    query_groups: optional int [n] group ids (e.g. subject ids); with
      `key_groups`, a key is never a neighbour of a query of the same group.
      Negative ids mean unknown and exclude nothing.
    key_groups: optional int [m] group ids of the keys.
    chunk_size: queries and keys per block; memory is O(chunk_size^2 +
      chunk_size * dims).
    progress: optional callback(queries_done, num_queries), called after each
      block of queries (for logging rate and ETA).

  Returns:
    (indices int64 [n, k], similarities float32 [n, k]), most similar first.
    Where fewer than k keys are allowed (groups), the rest are -1 and -inf.
  """
  _check_metric(metric)
  num_queries, num_keys = len(queries), len(keys)
  if not 1 <= k <= num_keys - int(exclude_self):
    raise ValueError(
        f'k={k} neighbours asked of {num_keys} keys'
        f'{" (self excluded)" if exclude_self else ""}; use 1 <= k < number of '
        'keys.')
  if exclude_self and num_queries != num_keys:
    raise ValueError(
        f'exclude_self needs queries and keys to be the same items, got '
        f'{num_queries} queries and {num_keys} keys.')
  if (query_groups is None) != (key_groups is None):
    raise ValueError('Give both query_groups and key_groups, or neither.')
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}.')

  # Ids compared on the device: int32 codes, and sentinels that never match
  # (-1 on the query side, -2 on the key side) where nothing is excluded.
  query_self = np.arange(num_queries, dtype=np.int32) if exclude_self else (
      np.full(num_queries, -1, np.int32))
  key_self = np.arange(num_keys, dtype=np.int32) if exclude_self else (
      np.full(num_keys, -2, np.int32))
  if query_groups is None:
    query_groups = np.full(num_queries, -1, np.int32)
    key_groups = np.full(num_keys, -2, np.int32)
  else:
    query_groups, key_groups = _group_codes(query_groups, key_groups)

  query_block = min(chunk_size, num_queries)
  key_block = min(chunk_size, num_keys)
  indices = np.empty((num_queries, k), np.int64)
  similarities = np.empty((num_queries, k), np.float32)
  for q_start in range(0, num_queries, query_block):
    q_stop = min(q_start + query_block, num_queries)
    rows = q_stop - q_start
    # Slices of arrays on the devices stay there (the kNN monitor's embeddings).
    block_queries = _normalise(sharding.pad_rows(queries[q_start:q_stop], query_block), metric)
    block_query_self = sharding.pad_rows(query_self[q_start:q_stop], query_block)
    block_query_groups = sharding.pad_rows(query_groups[q_start:q_stop], query_block)
    best_similarities = jnp.full((query_block, k), -jnp.inf, jnp.float32)
    best_indices = jnp.full((query_block, k), -1, jnp.int32)
    for k_start in range(0, num_keys, key_block):
      k_stop = min(k_start + key_block, num_keys)
      key_indices = np.full(key_block, -1, np.int32)
      key_indices[:k_stop - k_start] = np.arange(k_start, k_stop)
      best_similarities, best_indices = _merge_top_k(
          best_similarities, best_indices,
          block_queries,
          sharding.pad_rows(keys[k_start:k_stop], key_block),
          key_indices,
          block_query_self,
          sharding.pad_rows(key_self[k_start:k_stop], key_block),
          block_query_groups,
          sharding.pad_rows(key_groups[k_start:k_stop], key_block),
          k=k, metric=metric)
    indices[q_start:q_stop] = np.asarray(best_indices)[:rows]
    similarities[q_start:q_stop] = np.asarray(best_similarities)[:rows]
    if progress is not None:
      progress(q_stop, num_queries)
  return indices, similarities


def knn_vote(neighbour_labels, neighbour_similarities, num_classes,
             vote='majority'):
  """Class predictions from the labels of each query's neighbours.

  Args:
    neighbour_labels: int [n, k] labels of the neighbours, nearest first
      (label -1 is ignored, e.g. a missing neighbour).
    neighbour_similarities: float [n, k] their similarities.
    num_classes: number of classes.
    vote: 'majority': each neighbour counts one, ties go to the class with the
      larger summed similarity; 'similarity': each neighbour counts its
      similarity clipped at 0, ties go to the majority.

  Returns:
    int32 [n] predicted classes.
  """
  labels = np.asarray(neighbour_labels)
  similarities = np.nan_to_num(
      np.asarray(neighbour_similarities, np.float64), neginf=0.0)
  valid = labels >= 0
  one_hot = (labels[..., None] == np.arange(num_classes)) & valid[..., None]
  counts = one_hot.sum(axis=1)
  summed = (one_hot * similarities[..., None]).sum(axis=1)
  clipped = (one_hot * np.maximum(similarities, 0)[..., None]).sum(axis=1)
  k = labels.shape[1]
  if vote == 'majority':
    # Summed similarity is at most k, so scaled by 1/(2k+1) it orders ties only.
    scores = counts + summed / (2 * k + 1)
  elif vote == 'similarity':
    scores = clipped + counts * 1e-6
  else:
    raise ValueError(f"Unknown vote {vote!r}; use 'majority' or 'similarity'.")
  return scores.argmax(axis=1).astype(np.int32)


def knn_classify(train_x, train_y, test_x, k, num_classes,
                 metric='correlation', vote='majority', chunk_size=1024,
                 progress=None):
  """k-nearest-neighbour classification of `test_x` from `(train_x, train_y)`.

  For several k from one search (the kNN monitor), call `nearest_neighbours`
  once with the largest k and `knn_vote` on `[:, :k]` of its result.

  Args:
    train_x: [m, ...] reference features (embeddings or pixels).
    train_y: int [m] their labels.
    test_x: [n, ...] features to classify.
    k: neighbours that vote.
    num_classes: number of classes.
    metric: 'correlation' (raw pixels) or 'cosine' (embeddings).
    vote: 'majority' or 'similarity', see `knn_vote`.
    chunk_size: block size of the neighbour search.
    progress: optional callback(done, total) of the neighbour search.

  Returns:
    int32 [n] predicted classes.
  """
  indices, similarities = nearest_neighbours(
      test_x, train_x, k=k, metric=metric, chunk_size=chunk_size,
      progress=progress)
  return knn_vote(np.asarray(train_y)[indices], similarities, num_classes,
                  vote=vote)


def groups_from_neighbours(indices, similarities, threshold,
                           max_group_size=None, mutual=True):
  """Groups items linked by mutual, above-threshold nearest-neighbour edges.

  Items i and j are linked when each is among the other's neighbours and their
  similarity is at least `threshold`; groups are the connected components.
  Requiring the link both ways keeps a generic image that is everyone's
  neighbour from chaining unrelated groups together. With `max_group_size`,
  links are added strongest first (single linkage) and a link that would make
  a group larger than the cap is skipped, so no giant component can form.

  Args:
    indices: int [n, k] neighbours of each item (itself excluded), -1 missing.
    similarities: float [n, k] their similarities.
    threshold: minimum similarity of a link.
    max_group_size: optional cap on the size of a group.
    mutual: require the link both ways (False: either way is enough).

  Returns:
    int64 [n] group ids, 0..num_groups-1, numbered by first appearance.
  """
  indices = np.asarray(indices)
  similarities = np.asarray(similarities, np.float32)
  n, k = indices.shape
  rows = np.repeat(np.arange(n), k)
  cols = indices.reshape(-1)
  weights = similarities.reshape(-1)
  keep = (cols >= 0) & (weights >= threshold)
  rows, cols, weights = rows[keep], cols[keep], weights[keep]
  if mutual:  # Keep i->j only where j->i is also a kept edge.
    both = np.isin(cols * n + rows, rows * n + cols)
    rows, cols, weights = rows[both], cols[both], weights[both]
  upper = rows < cols  # One edge per pair.
  rows, cols, weights = rows[upper], cols[upper], weights[upper]

  if max_group_size is None:
    graph = sparse.coo_matrix(
        (np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, labels = csgraph.connected_components(graph, directed=False)
  else:
    # Size-capped single linkage; scipy has no constrained variant.
    parent = np.arange(n)
    size = np.ones(n, np.int64)

    def find(i):
      while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
      return i

    for edge in np.argsort(-weights, kind='stable'):
      a, b = find(rows[edge]), find(cols[edge])
      if a != b and size[a] + size[b] <= max_group_size:
        if size[a] < size[b]:
          a, b = b, a
        parent[b] = a
        size[a] += size[b]
    labels = np.array([find(i) for i in range(n)])
  _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
  # Renumber by first appearance so ids follow the data order.
  order = np.argsort(np.argsort(first))
  return order[inverse].astype(np.int64)


def group_near_duplicates(images, threshold, k=10, metric='correlation',
                          max_group_size=None, chunk_size=1024,
                          progress=None):
  """Recovers subject groups of a data set without ids from near-duplicates.

  Neighbouring slices of one person are near-identical, so chains of mutual
  near-duplicates approximate the person's slices. See
  `groups_from_neighbours` for the linking rule.

  Args:
    images: [n, ...] features, e.g. `pixel_features(images, 64)`.
    threshold: minimum similarity of a link.
    k: neighbours considered per image (mutual kNN within k).
    metric: 'correlation' or 'cosine'.
    max_group_size: optional cap on the size of a group.
    chunk_size: block size of the neighbour search.
    progress: optional callback(done, total) of the neighbour search.

  Returns:
    int64 [n] group ids.
  """
  k = min(k, len(images) - 1)
  indices, similarities = nearest_neighbours(
      images, images, k=k, metric=metric, exclude_self=True,
      chunk_size=chunk_size, progress=progress)
  return groups_from_neighbours(indices, similarities, threshold,
                                max_group_size=max_group_size)


def pair_agreement(true_ids, pred_ids):
  """How well a predicted grouping agrees with the true one, over item pairs.

  Args:
    true_ids: int [n] true group ids (e.g. subject ids).
    pred_ids: int [n] predicted group ids (e.g. recovered groups).

  Returns:
    dict with
      adjusted_rand_index: Rand index corrected for chance (Hubert and Arabie,
        1985): 1 for identical partitions, about 0 for random ones; 1 where
        both partitions are trivial (all singletons or all one group).
      pairwise_precision: share of pairs grouped together by `pred_ids` that
        are together in `true_ids` (1 if `pred_ids` pairs nothing).
      pairwise_recall: share of pairs together in `true_ids` that `pred_ids`
        also groups together (1 if `true_ids` pairs nothing).
  """
  true_ids, pred_ids = np.asarray(true_ids), np.asarray(pred_ids)
  if true_ids.shape != pred_ids.shape or true_ids.ndim != 1:
    raise ValueError(
        f'pair_agreement needs two id vectors of one length, got shapes '
        f'{true_ids.shape} and {pred_ids.shape}.')
  _, true_codes = np.unique(true_ids, return_inverse=True)
  _, pred_codes = np.unique(pred_ids, return_inverse=True)
  contingency = sparse.coo_matrix(
      (np.ones(len(true_codes), np.int64), (true_codes, pred_codes))).tocsr()
  contingency.sum_duplicates()

  def pairs(counts):
    counts = np.asarray(counts, np.float64)
    return float((counts * (counts - 1) / 2).sum())

  together_both = pairs(contingency.data)
  together_true = pairs(np.asarray(contingency.sum(axis=1)).ravel())
  together_pred = pairs(np.asarray(contingency.sum(axis=0)).ravel())
  total = len(true_ids) * (len(true_ids) - 1) / 2
  expected = together_true * together_pred / total if total else 0.0
  maximum = (together_true + together_pred) / 2
  if maximum == expected:  # Both trivial: nothing to agree or disagree on.
    ari = 1.0
  else:
    ari = (together_both - expected) / (maximum - expected)
  return dict(
      adjusted_rand_index=float(ari),
      pairwise_precision=(together_both / together_pred
                          if together_pred else 1.0),
      pairwise_recall=(together_both / together_true
                       if together_true else 1.0),
  )
