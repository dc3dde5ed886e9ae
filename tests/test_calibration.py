"""Tests of the weighted, vectorised probability metrics (simclr_jax/metrics/calibration.py)."""

import numpy as np
import pytest
from sklearn import metrics as sk

from simclr_jax.metrics import calibration


def tied(rng, n, num_classes, decimals=1):
  """Labels and probabilities rounded to `decimals`: many tied scores."""
  labels = rng.integers(0, num_classes, n)
  labels[:num_classes] = np.arange(num_classes)  # Every class present.
  probabilities = rng.dirichlet(np.ones(num_classes), n)
  probabilities[:, 1:] = np.round(probabilities[:, 1:], decimals)
  probabilities[:, 0] = 1.0 - probabilities[:, 1:].sum(1)  # Rows still sum to 1.
  ok = probabilities[:, 0] >= 0
  return labels[ok], probabilities[ok]


def sk_auc(labels, probabilities, weights=None):
  if probabilities.shape[1] == 2:
    return sk.roc_auc_score(labels, probabilities[:, 1], sample_weight=weights)
  return sk.roc_auc_score(labels, probabilities, multi_class='ovr', sample_weight=weights)


def ece_by_loop(labels, probabilities, num_bins=15):
  """The textbook ECE (Guo et al.): bins (lo, hi] of the top-class confidence."""
  confidence = probabilities.max(1)
  right = probabilities.argmax(1) == labels
  edges = np.linspace(0, 1, num_bins + 1)
  total = 0.0
  for lo, hi in zip(edges[:-1], edges[1:]):
    inside = (confidence > lo) & (confidence <= hi)
    if inside.any():
      total += inside.mean() * abs(right[inside].mean() - confidence[inside].mean())
  return total


@pytest.mark.parametrize('num_classes', [2, 3, 4])
@pytest.mark.parametrize('pairs', [True, False])
def test_weighted_auc_equals_scikit_learn_with_ties(num_classes, pairs, monkeypatch):
  if not pairs:  # The sorted path, for problems whose pair tables would be too large.
    monkeypatch.setattr(calibration, '_PAIR_LIMIT', 0)
  rng = np.random.default_rng(num_classes)
  labels, probabilities = tied(rng, 120, num_classes)
  assert len(np.unique(probabilities[:, 1])) < len(labels) / 3  # Ties, many.
  assert calibration.roc_auc(labels, probabilities) == pytest.approx(
      sk_auc(labels, probabilities), abs=1e-12)
  for _ in range(5):
    weights = rng.integers(0, 4, len(labels)).astype(float)  # Bootstrap-like counts, zeros.
    assert calibration.roc_auc(labels, probabilities, weights) == pytest.approx(
        sk_auc(labels, probabilities, weights), abs=1e-12)
  fractional = rng.uniform(0.1, 2.0, len(labels))
  assert calibration.roc_auc(labels, probabilities, fractional) == pytest.approx(
      sk_auc(labels, probabilities, fractional), abs=1e-12)


@pytest.mark.parametrize('pairs', [True, False])
def test_auc_of_units_weights_every_row_of_a_unit(pairs, monkeypatch):
  if not pairs:
    monkeypatch.setattr(calibration, '_PAIR_LIMIT', 0)
  rng = np.random.default_rng(7)
  units = np.repeat(np.arange(30), 6)  # 30 subjects of 6 slices, rows shuffled.
  order = rng.permutation(len(units))
  units = units[order]
  for num_classes in (2, 4):
    labels, probabilities = tied(rng, len(units), num_classes)
    labels, probabilities = labels[:len(units)], probabilities[:len(units)]
    keep = units[:len(labels)]
    counts = rng.integers(0, 3, (20, 30)).astype(float)
    counts[:, 0] = 1  # Keep a unit of each kind drawn.
    vectorised = calibration.roc_auc(labels, probabilities, counts, keep)
    assert vectorised.shape == (20,)
    for b in range(20):
      assert vectorised[b] == pytest.approx(
          sk_auc(labels, probabilities, counts[b][keep]), abs=1e-12)


def test_auc_is_nan_without_positives_and_macro_skips_undefined_classes():
  labels = np.array([0, 0, 1, 1, 2, 2])
  probabilities = np.random.default_rng(0).dirichlet(np.ones(3), 6)
  weights = np.array([[1, 1, 0, 0, 1, 1],  # Class 1 has no weight: left out.
                      [0, 0, 0, 0, 1, 1],  # Only class 2: no class has both kinds.
                      [1, 1, 1, 1, 1, 1]], float)
  result = calibration.roc_auc(labels, probabilities, weights)
  in_two = labels != 1
  expected = np.mean([sk.roc_auc_score(labels[in_two] == k, probabilities[in_two, k])
                      for k in (0, 2)])
  assert result[0] == pytest.approx(expected, abs=1e-12)
  assert np.isnan(result[1])
  assert result[2] == pytest.approx(sk_auc(labels, probabilities), abs=1e-12)
  binary = np.array([[0.3, 0.7], [0.6, 0.4]])
  assert np.isnan(calibration.roc_auc(np.array([1, 1]), binary))


def test_sensitivity_and_specificity_are_the_recalls_of_class_1_and_0():
  rng = np.random.default_rng(3)
  labels, probabilities = tied(rng, 200, 2)
  predicted = probabilities.argmax(1)
  for weights in (None, rng.integers(0, 4, len(labels)).astype(float)):
    sensitivity, specificity = calibration.sensitivity_specificity(labels, probabilities,
                                                                   weights)
    assert sensitivity == pytest.approx(
        sk.recall_score(labels, predicted, pos_label=1, sample_weight=weights), abs=1e-12)
    assert specificity == pytest.approx(
        sk.recall_score(labels, predicted, pos_label=0, sample_weight=weights), abs=1e-12)
  with pytest.raises(ValueError, match='binary'):
    calibration.sensitivity_specificity(np.array([0, 2]), np.eye(3)[:2])


@pytest.mark.parametrize('num_classes', [2, 4])
def test_brier_is_the_multiclass_definition_of_scikit_learn(num_classes):
  rng = np.random.default_rng(num_classes)
  labels, probabilities = tied(rng, 150, num_classes, decimals=3)
  for weights in (None, rng.integers(0, 4, len(labels)).astype(float)):
    assert calibration.brier(labels, probabilities, weights) == pytest.approx(
        sk.brier_score_loss(labels, probabilities, sample_weight=weights,
                            scale_by_half=False), abs=1e-12)
  if num_classes == 2:  # Twice the usual one-column binary score.
    assert calibration.brier(labels, probabilities) == pytest.approx(
        2 * sk.brier_score_loss(labels, probabilities[:, 1]), abs=1e-12)
  assert calibration.brier(labels, np.eye(num_classes)[labels]) == 0.0


def test_ece_equals_the_textbook_loop_and_weights_repeat_rows():
  rng = np.random.default_rng(11)
  labels, probabilities = tied(rng, 300, 4, decimals=2)
  # Confidences exactly on bin edges fall in the bin they close: (lo, hi].
  probabilities[:3] = [[1 / 3, 2 / 3, 0, 0], [0.2, 0.8, 0, 0], [1.0, 0, 0, 0]]
  assert calibration.expected_calibration_error(labels, probabilities) == pytest.approx(
      ece_by_loop(labels, probabilities), abs=1e-12)
  weights = rng.integers(0, 4, len(labels))
  repeated = np.repeat(np.arange(len(labels)), weights)
  assert calibration.expected_calibration_error(
      labels, probabilities, weights.astype(float)) == pytest.approx(
          ece_by_loop(labels[repeated], probabilities[repeated]), abs=1e-12)
  # By hand: one bin (confidence 0.8), three of four right: |0.75 - 0.8|.
  two = np.array([[0.8, 0.2]] * 4)
  assert calibration.expected_calibration_error(np.array([0, 0, 0, 1]), two) == pytest.approx(
      0.05)


def test_every_metric_is_vectorised_over_weightings_of_units():
  rng = np.random.default_rng(5)
  units = rng.integers(0, 25, 200)
  units[:25] = np.arange(25)
  labels = rng.integers(0, 2, 25)[units]  # A unit's rows share its label, as a subject's.
  probabilities = rng.dirichlet(np.ones(2), 200)
  counts = rng.integers(0, 3, (30, 25)).astype(float)
  counts[:, np.flatnonzero(labels[:25] == 0)[0]] += 1  # Both classes in every weighting.
  counts[:, np.flatnonzero(labels[:25] == 1)[0]] += 1
  together = calibration.probability_metrics(labels, probabilities, counts, units)
  assert list(together) == list(calibration.METRICS)
  for b in range(30):
    alone = calibration.probability_metrics(labels, probabilities, counts[b][units])
    for name, value in alone.items():
      assert together[name][b] == pytest.approx(value, abs=1e-12), name
  ones = calibration.probability_metrics(labels, probabilities, np.ones((1, 25)), units)
  plain = calibration.probability_metrics(labels, probabilities)
  assert all(isinstance(v, float) for v in plain.values())
  for name, value in plain.items():
    assert ones[name][0] == pytest.approx(value, abs=1e-12)
  with pytest.raises(ValueError, match='Unknown'):
    calibration.probability_metrics(labels, probabilities, metrics=('auc',))
