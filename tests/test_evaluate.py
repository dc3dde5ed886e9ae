"""Tests of the classification metrics and the kNN monitor."""

import numpy as np
import pytest

from simclr_jax import evaluate


def test_metrics_of_a_known_confusion_matrix():
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
  predictions = np.array([0, 0, 0, 1, 1, 0, 2, 2])
  m = evaluate.classification_metrics(labels, predictions, num_classes=4)
  assert m['confusion_matrix'] == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
  assert m['accuracy'] == pytest.approx(6 / 8)
  # Class 3 is absent from the labels: left out of the balanced accuracy.
  assert m['balanced_accuracy'] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
  f1 = [2 * 0.75 * 0.75 / 1.5, 2 * 0.5 * 0.5 / 1.0, 1.0]
  assert m['macro_f1'] == pytest.approx(np.mean(f1))
  assert m['per_class_recall'] == [0.75, 0.5, 1.0, None]


def test_majority_answer_has_chance_balanced_accuracy():
  labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
  m = evaluate.classification_metrics(labels, np.zeros_like(labels), 3)
  assert m['accuracy'] == pytest.approx(0.5)
  assert m['balanced_accuracy'] == pytest.approx(1 / 3)


def test_knn_monitor_separable_embeddings():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 16)) * 5
  train_labels = np.repeat(np.arange(3), 20)
  query_labels = np.repeat(np.arange(3), 5)
  train = centres[train_labels] + rng.normal(size=(60, 16))
  queries = centres[query_labels] + rng.normal(size=(15, 16))
  result = evaluate.knn_monitor(train, train_labels, queries, query_labels, (1, 10, 100), 3)
  assert result['knn1_accuracy'] == 1.0 and result['knn10_balanced_accuracy'] == 1.0
  assert 'knn100_accuracy' not in result  # k larger than the memory bank is skipped.
  shuffled = evaluate.knn_monitor(train, rng.permutation(train_labels), queries,
                                  query_labels, (10,), 3)
  assert shuffled['knn10_accuracy'] < 0.8
