"""The linear probe: the ridge classifier of scikit-learn, in closed form on the devices."""

import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier

from simclr_jax.metrics import probe


def _blobs(n, d, seed):
  """n points of 3 classes around fixed centres; `seed` draws the points."""
  centers = np.random.default_rng(0).normal(size=(3, d))
  rng = np.random.default_rng(seed + 1)
  y = rng.integers(0, 3, n)
  return (centers[y] + 1.5 * rng.normal(size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize('n,d', [(300, 16), (40, 200)])  # The primal and the dual solve.
def test_probe_predicts_as_sklearns_ridge_classifier(n, d):
  x, y = _blobs(n, d, 0)
  q, _ = _blobs(150, d, 1)
  ours = np.asarray(probe.probe_predictions(x, y, q, 3, ridge=0.1))
  # The same problem for scikit-learn: normalised rows, an intercept, the same penalty.
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  centred = xn - xn.mean(0)
  alpha = 0.1 * np.sum(centred ** 2) / d
  theirs = RidgeClassifier(alpha=alpha).fit(xn, y).predict(qn)
  assert np.mean(ours == theirs) >= 0.99  # Float32 vs float64 near a tie at most.


def test_probe_monitor_separates_classes_and_fails_on_noise():
  x, y = _blobs(300, 16, 0)
  q, yq = _blobs(200, 16, 1)
  good = probe.probe_monitor(x, y, q, yq, 3)
  noise = probe.probe_monitor(x, np.random.default_rng(2).integers(0, 3, 300), q, yq, 3)
  assert good['probe_balanced_accuracy'] > 0.9
  assert noise['probe_balanced_accuracy'] < 0.6
