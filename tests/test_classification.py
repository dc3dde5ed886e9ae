"""Tests of the classification metrics and the kNN monitor."""

import numpy as np
import pytest

from simclr_jax.metrics import classification
from tests import fake_data


def test_metrics_of_a_known_confusion_matrix():
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
  predictions = np.array([0, 0, 0, 1, 1, 0, 2, 2])
  m = classification.classification_metrics(labels, predictions, num_classes=4)
  assert m['confusion_matrix'] == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
  assert m['accuracy'] == pytest.approx(6 / 8)
  # Class 3 is absent from the labels: left out of the balanced accuracy.
  assert m['balanced_accuracy'] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
  f1 = [2 * 0.75 * 0.75 / 1.5, 2 * 0.5 * 0.5 / 1.0, 1.0]
  assert m['macro_f1'] == pytest.approx(np.mean(f1))
  assert m['per_class_recall'] == [0.75, 0.5, 1.0, None]


def test_majority_answer_has_chance_balanced_accuracy():
  labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
  m = classification.classification_metrics(labels, np.zeros_like(labels), 3)
  assert m['accuracy'] == pytest.approx(0.5)
  assert m['balanced_accuracy'] == pytest.approx(1 / 3)


def test_knn_monitor_separable_embeddings():
  rng = np.random.default_rng(0)
  train, train_labels, queries, query_labels = fake_data.clustered_embeddings(rng, 20, 5)
  result = classification.knn_monitor(train, train_labels, queries, query_labels, (1, 10, 100), 3)
  assert result['knn1_accuracy'] == 1.0 and result['knn10_balanced_accuracy'] == 1.0
  assert 'knn100_accuracy' not in result  # k larger than the memory bank is skipped.
  shuffled = classification.knn_monitor(train, rng.permutation(train_labels), queries,
                                  query_labels, (10,), 3)
  assert shuffled['knn10_accuracy'] < 0.8


def test_macro_f1_counts_classes_present_in_labels_or_predictions():
  # Class 2 never occurs but is predicted once: its F1 of 0 enters the mean (sklearn).
  labels = np.array([0, 0, 1, 1])
  predicted = np.array([0, 0, 1, 2])
  result = classification.classification_metrics(labels, predicted, 4)
  f1_1 = 2 * 1.0 * 0.5 / 1.5
  assert result['macro_f1'] == pytest.approx((1.0 + f1_1 + 0.0) / 3)
  assert result['balanced_accuracy'] == pytest.approx((1.0 + 0.5) / 2)


def test_subject_level_prediction_is_the_mean_of_the_slices():
  predictions = classification.Predictions(
      rows=np.arange(5), subject_ids=np.array([7, 7, 7, 3, 3]), labels=np.array([1, 1, 1, 0, 0]),
      probabilities=np.array([[0.9, 0.1], [0.4, 0.6], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]],
                             np.float32))
  subjects = classification.subject_level(predictions)
  np.testing.assert_array_equal(subjects.subject_ids, [3, 7])
  np.testing.assert_array_equal(subjects.labels, [0, 1])
  np.testing.assert_allclose(subjects.probabilities, [[0.45, 0.55], [17 / 30, 13 / 30]],
                             atol=1e-6)
  result = classification.prediction_metrics(predictions, 2)
  assert result['accuracy'] == pytest.approx(3 / 5)  # Slices 1, 2 and 5 are right.
  assert result['subject']['accuracy'] == 0.0  # Both people are wrong on average.
  assert result['num_subjects'] == 2


def sliced_predictions(num_subjects=6, num_positions=5, num_classes=3, seed=0):
  """Every subject at every slice position, rows shuffled: (predictions, positions)."""
  rng = np.random.default_rng(seed)
  subject_ids = np.repeat(100 + np.arange(num_subjects), num_positions)
  positions = np.tile(np.arange(num_positions), num_subjects)
  labels = np.repeat(rng.integers(0, num_classes, num_subjects), num_positions)
  probabilities = rng.dirichlet(np.ones(num_classes), len(labels)).astype(np.float32)
  order = rng.permutation(len(labels))
  return classification.Predictions(
      rows=np.arange(len(labels))[order], subject_ids=subject_ids[order],
      labels=labels[order].astype(np.int32), probabilities=probabilities[order]), positions[order]


def test_uniform_position_weights_vote_as_the_plain_mean():
  predictions, positions = sliced_predictions()
  plain = classification.subject_level(predictions)
  for weight in (1.0, 0.37):
    weighted = classification.subject_level(predictions, np.full(5, weight), positions)
    np.testing.assert_allclose(weighted.probabilities, plain.probabilities, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(weighted.labels, plain.labels)
    np.testing.assert_array_equal(weighted.subject_ids, plain.subject_ids)
    np.testing.assert_array_equal(weighted.rows, plain.rows)


def test_position_weights_give_the_weighted_mean_and_zero_removes_a_position():
  predictions, positions = sliced_predictions()
  weights = np.array([0.9, 0.0, 0.5, 0.7, 0.0])
  weighted = classification.subject_level(predictions, weights, positions)
  kept = weights[positions] > 0
  without = classification.subject_level(classification.Predictions(
      predictions.rows[kept], predictions.subject_ids[kept], predictions.labels[kept],
      predictions.probabilities[kept]), weights, positions[kept])
  np.testing.assert_array_equal(weighted.probabilities, without.probabilities)
  # A zero-weight position's probabilities do not matter at all.
  changed = classification.Predictions(
      predictions.rows, predictions.subject_ids, predictions.labels,
      np.where((weights[positions] == 0)[:, None], np.float32([1, 0, 0]),
               predictions.probabilities))
  np.testing.assert_array_equal(
      classification.subject_level(changed, weights, positions).probabilities,
      weighted.probabilities)
  for s, subject in enumerate(weighted.subject_ids):  # The weighted mean, by hand.
    rows = predictions.subject_ids == subject
    w = weights[positions[rows]]
    np.testing.assert_allclose(
        weighted.probabilities[s], (w[:, None] * predictions.probabilities[rows]).sum(0)
        / w.sum(), atol=1e-6)
  metrics = classification.prediction_metrics(predictions, 3, weights, positions)
  assert metrics['subject'] == classification.classification_metrics(
      weighted.labels, weighted.probabilities.argmax(-1), 3)


def test_position_weights_are_checked():
  predictions, positions = sliced_predictions()
  with pytest.raises(ValueError, match='no slice at a position of positive weight'):
    classification.subject_level(predictions, np.zeros(5), positions)
  with pytest.raises(ValueError, match='need positions'):
    classification.subject_level(predictions, np.ones(5))
  with pytest.raises(ValueError, match='without position_weights'):
    classification.subject_level(predictions, positions=positions)
  with pytest.raises(ValueError, match='non-negative'):
    classification.subject_level(predictions, -np.ones(5), positions)
  with pytest.raises(ValueError, match='0..3'):
    classification.subject_level(predictions, np.ones(4), positions)


def test_position_scores_are_each_positions_metric():
  predictions, positions = sliced_predictions(num_subjects=40, seed=2)
  scores = classification.position_scores(predictions, positions, 6)
  assert scores.shape == (6,) and scores[5] == 0.0  # Position 5 has no slice.
  for p in range(5):
    rows = positions == p
    expected = classification.classification_metrics(
        predictions.labels[rows], predictions.probabilities[rows].argmax(-1), 3)
    assert scores[p] == pytest.approx(expected['balanced_accuracy'])
  accuracy = classification.position_scores(predictions, positions, 5, 'accuracy')
  assert accuracy[0] == pytest.approx(np.mean(
      predictions.probabilities[positions == 0].argmax(-1) == predictions.labels[positions == 0]))
