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
