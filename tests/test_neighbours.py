"""Tests of the chunked nearest neighbours, kNN vote, grouping and agreement."""

import numpy as np
import pytest
from scipy import ndimage

from simclr_jax.metrics import neighbours
from tests import fake_data


def make_subjects(num_subjects=12, slices_per_subject=6, size=32, seed=0,
                  num_classes=4):
  """Toy stacks of slices: a shared head, a per-subject anatomy, a slow drift.

  Neighbouring slices of a subject differ by a small step of its drift, so
  they are near-duplicates, while different subjects share only the head.

  Returns:
    dict of images uint8 [N, size, size, 1], labels, subject_ids, slice_index
    and file_names, subject after subject.
  """
  rng = np.random.default_rng(seed)

  def smooth(sigma):
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma)
    return field / field.std()

  yy, xx = np.mgrid[:size, :size] / size - 0.5
  head = np.exp(-(xx ** 2 + yy ** 2) / 0.08)
  images, labels, subject_ids, slice_index, file_names = [], [], [], [], []
  for subject in range(num_subjects):
    anatomy, drift = smooth(2.0), smooth(3.0)
    for index in range(slices_per_subject):
      image = (head + 0.25 * anatomy + 0.08 * index * drift
               + 0.01 * rng.normal(size=(size, size)))
      images.append(image)
      labels.append(subject % num_classes)
      subject_ids.append(subject)
      slice_index.append(index)
      file_names.append(f'class{subject % num_classes}/s{subject}_{index}.png')
  images = np.stack(images)
  images = (images - images.min()) / (images.max() - images.min())
  return dict(
      images=np.round(images * 255).astype(np.uint8)[..., None],
      labels=np.array(labels, np.int32),
      subject_ids=np.array(subject_ids, np.int64),
      slice_index=np.array(slice_index, np.int32),
      file_names=np.array(file_names))


def brute_force(queries, keys, k, metric, excluded=None):
  """Sorted top-k of the full similarity matrix, in float64."""
  q = queries.reshape(len(queries), -1).astype(np.float64)
  v = keys.reshape(len(keys), -1).astype(np.float64)
  if metric == 'correlation':
    q = q - q.mean(1, keepdims=True)
    v = v - v.mean(1, keepdims=True)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  similarities = q @ v.T
  if excluded is not None:
    similarities[excluded] = -np.inf
  order = np.argsort(-similarities, axis=1, kind='stable')[:, :k]
  return order, np.take_along_axis(similarities, order, 1)


@pytest.mark.parametrize('metric', ['correlation', 'cosine'])
@pytest.mark.parametrize('k,chunk_size', [(1, 7), (4, 7), (3, 100)])
def test_nearest_neighbours_match_brute_force(metric, k, chunk_size):
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(23, 4, 5)) + 0.3
  keys = rng.normal(size=(31, 4, 5)) + 0.3
  indices, similarities = neighbours.nearest_neighbours(
      queries, keys, k=k, metric=metric, chunk_size=chunk_size)
  expected_indices, expected_similarities = brute_force(queries, keys, k,
                                                        metric)
  assert indices.shape == similarities.shape == (23, k)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)


def test_correlation_ignores_brightness_and_contrast_but_cosine_does_not():
  rng = np.random.default_rng(1)
  image = rng.uniform(size=(1, 64))
  keys = np.concatenate([3 * image + 10, rng.uniform(size=(5, 64))])
  _, correlation = neighbours.nearest_neighbours(image, keys, k=1)
  np.testing.assert_allclose(correlation, 1.0, atol=1e-5)
  _, cosine = neighbours.nearest_neighbours(image, keys[:1], k=1,
                                            metric='cosine')
  assert cosine[0, 0] < 0.99


@pytest.mark.parametrize('chunk_size', [4, 64])
def test_exclude_self_never_returns_the_query(chunk_size):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(19, 12))
  indices, similarities = neighbours.nearest_neighbours(
      x, x, k=3, exclude_self=True, chunk_size=chunk_size)
  expected_indices, expected_similarities = brute_force(
      x, x, 3, 'correlation', excluded=np.eye(19, dtype=bool))
  assert not np.any(indices == np.arange(19)[:, None])
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)


def test_groups_exclude_same_group_keys_and_unknown_excludes_nothing():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(16, 10))
  groups = np.repeat(np.arange(4), 4)
  groups[:2] = -1  # Unknown: may match anything, including each other.
  indices, _ = neighbours.nearest_neighbours(
      x, x, k=2, exclude_self=True, query_groups=groups, key_groups=groups,
      chunk_size=5)
  excluded = np.eye(16, dtype=bool) | (
      (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0))
  expected, _ = brute_force(x, x, 2, 'correlation', excluded=excluded)
  np.testing.assert_array_equal(indices, expected)


def test_missing_neighbours_are_marked_when_groups_leave_too_few_keys():
  x = np.random.default_rng(4).normal(size=(4, 6))
  groups = np.array([0, 0, 0, 1])
  indices, similarities = neighbours.nearest_neighbours(
      x, x, k=2, query_groups=groups, key_groups=groups)
  # Query 0's group holds 3 of the 4 keys: one neighbour, then a gap.
  assert indices[0, 0] == 3 and indices[0, 1] == -1
  assert similarities[0, 1] == -np.inf


def test_memmap_input_and_progress_callback(tmp_path):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(25, 8)).astype(np.float32)
  stored = np.memmap(tmp_path / 'x.npy', np.float32, 'w+', shape=x.shape)
  stored[:] = x
  calls = []
  indices, _ = neighbours.nearest_neighbours(
      stored, stored, k=2, exclude_self=True, chunk_size=10,
      progress=lambda done, total: calls.append((done, total)))
  expected, _ = brute_force(x, x, 2, 'correlation',
                            excluded=np.eye(25, dtype=bool))
  np.testing.assert_array_equal(indices, expected)
  assert calls == [(10, 25), (20, 25), (25, 25)]


def test_bad_arguments_raise():
  x = np.zeros((3, 4))
  with pytest.raises(ValueError, match='metric'):
    neighbours.nearest_neighbours(x, x, metric='euclidean')
  with pytest.raises(ValueError, match='k=3'):
    neighbours.nearest_neighbours(x, x, k=3, exclude_self=True)
  with pytest.raises(ValueError, match='same items'):
    neighbours.nearest_neighbours(x, x[:2], exclude_self=True)


def test_pixel_features_area_downsamples():
  images = np.zeros((2, 8, 8, 1), np.uint8)
  images[0, :4, :4] = 200  # One bright quadrant.
  features = neighbours.pixel_features(images, 2)
  assert features.shape == (2, 4) and features.dtype == np.float32
  np.testing.assert_allclose(features[0], [200, 0, 0, 0])
  assert neighbours.pixel_features(images[..., 0]).shape == (2, 64)


def test_knn_vote_majority_breaks_ties_by_similarity():
  labels = np.array([[1, 2, 2, 1], [0, 3, 3, 3]])
  similarities = np.array([[0.99, 0.5, 0.5, 0.9], [0.99, 0.2, 0.2, 0.2]])
  np.testing.assert_array_equal(
      neighbours.knn_vote(labels, similarities, 4), [1, 3])
  np.testing.assert_array_equal(
      neighbours.knn_vote(labels, similarities, 4, vote='similarity'), [1, 0])


def test_knn_classify_separates_clusters():
  rng = np.random.default_rng(6)
  train_x, train_y, test_x, test_y = fake_data.clustered_embeddings(rng, 10, 4)
  for k in (1, 5):
    predictions = neighbours.knn_classify(train_x, train_y, test_x, k=k,
                                          num_classes=3, metric='cosine',
                                          chunk_size=8)
    np.testing.assert_array_equal(predictions, test_y)


def test_pair_agreement_known_values():
  identical = neighbours.pair_agreement([0, 0, 1, 1, 2], [5, 5, 7, 7, 9])
  assert identical == dict(adjusted_rand_index=1.0, pairwise_precision=1.0,
                           pairwise_recall=1.0)
  # Hand-computed: pairs together in both 2, in true 6, in pred 3, of 15;
  # ARI = (2 - 6 * 3 / 15) / ((6 + 3) / 2 - 6 * 3 / 15) = 0.8 / 3.3.
  result = neighbours.pair_agreement([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2])
  assert result['adjusted_rand_index'] == pytest.approx(0.8 / 3.3)
  assert result['pairwise_precision'] == pytest.approx(2 / 3)
  assert result['pairwise_recall'] == pytest.approx(1 / 3)
  singletons = neighbours.pair_agreement(np.arange(4), np.arange(4))
  assert singletons['adjusted_rand_index'] == 1.0
  random = neighbours.pair_agreement(
      np.repeat(np.arange(20), 10),
      np.random.default_rng(0).integers(0, 20, 200))
  assert abs(random['adjusted_rand_index']) < 0.05


def test_groups_need_mutual_links_above_threshold():
  # A chain 0-1-2, a pair 3-4, and 5, whose nearest is 2 but not vice versa.
  indices = np.array([[1, 2], [0, 2], [1, 0], [4, 0], [3, 0], [2, 3]])
  similarities = np.array([[0.99, 0.5], [0.99, 0.98], [0.98, 0.5],
                           [0.97, 0.1], [0.97, 0.1], [0.99, 0.1]])
  groups = neighbours.groups_from_neighbours(indices, similarities, 0.95)
  np.testing.assert_array_equal(groups, [0, 0, 0, 1, 1, 2])
  # A higher threshold cuts the weaker links.
  groups = neighbours.groups_from_neighbours(indices, similarities, 0.985)
  np.testing.assert_array_equal(groups, [0, 0, 1, 2, 3, 4])
  # The cap stops the chain at two, keeping the strongest link.
  groups = neighbours.groups_from_neighbours(indices, similarities, 0.95,
                                             max_group_size=2)
  np.testing.assert_array_equal(groups, [0, 0, 1, 2, 2, 3])


def test_group_near_duplicates_recovers_subjects():
  data = make_subjects(num_subjects=12, slices_per_subject=6)
  features = neighbours.pixel_features(data['images'], 16)
  groups = neighbours.group_near_duplicates(features, threshold=0.95, k=10,
                                            chunk_size=32)
  agreement = neighbours.pair_agreement(data['subject_ids'], groups)
  assert agreement['adjusted_rand_index'] > 0.9, agreement
  # Without the threshold and mutual-kNN guards, one giant group forms ...
  indices, similarities = neighbours.nearest_neighbours(
      features, features, k=10, exclude_self=True)
  loose = neighbours.groups_from_neighbours(indices, similarities, -0.99,
                                            mutual=False)
  assert np.bincount(loose).max() == len(loose)
  # ... which a size cap prevents.
  capped = neighbours.groups_from_neighbours(indices, similarities, -0.99,
                                             mutual=False, max_group_size=6)
  assert np.bincount(capped).max() <= 6
