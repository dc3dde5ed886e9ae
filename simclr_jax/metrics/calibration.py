"""Metrics of predicted probabilities, weighted and vectorised over resamples.

Discrimination (ROC AUC; sensitivity and specificity of a binary task) and
calibration (Brier score, expected calibration error) of predictions: labels
int [n] and class probabilities float [n, K]. Each function takes optional
weights so that a bootstrap scores thousands of resamples at once:

- `weights` None: every row counts once; the result is a float.
- `weights` float [U]: one weighting; a float.
- `weights` float [B, U]: B weightings (bootstrap draw counts); float64 [B].

Rows are grouped in units by `units` (int [n], values 0 to U - 1; default:
every row its own unit, U = n), and a unit's weight multiplies each of its rows:
the bootstrap draws subjects, so a subject drawn twice counts each of its slices
twice. A weighted metric equals scikit-learn's with `sample_weight` = the rows'
weights (`tests/test_calibration.py`). A metric that is undefined under a
weighting (no positive or no negative weight) is NaN.

How it stays fast: every metric but the AUC is a ratio of linear functions of
the weights, so per-unit sums [U, C] and one product [B, U] @ [U, C] give all B
values. The AUC is a quadratic form: with the scores sorted once and grouped by
ties, M[a, c] = (positive rows of unit a) x (negative rows of unit c scored
below them, ties 1/2), and the numerator of weighting w is w M w (the
Mann-Whitney U statistic); a bootstrap of 200 subjects costs B x 200 x 200.
Where M would be too large (every row its own unit, thousands of rows), the
rows are sorted once and each weighting takes cumulative sums (B x n).
"""

import numpy as np

METRICS = ('roc_auc', 'sensitivity', 'specificity', 'brier', 'ece')
# Lower is better for these (a difference a - b > 0 means a is worse).
LOWER_IS_BETTER = ('brier', 'ece')
NUM_BINS = 15
_PAIR_LIMIT = 2**22  # Most entries of the per-tie-group x unit tables of the AUC.
_CHUNK = 2**22  # Most entries of a [weightings, rows] block of the sorted path.


def _prepare(labels, probabilities, weights, units):
  """(labels, probabilities, unit of each row, U, weights [B, U] float64, one weighting?)."""
  labels = np.asarray(labels, np.int64)
  probabilities = np.asarray(probabilities, np.float64)
  if probabilities.ndim != 2 or len(probabilities) != len(labels):
    raise ValueError(f'Probabilities {probabilities.shape} do not match labels '
                     f'{labels.shape}: expected [n, K].')
  if len(labels) and (labels.min() < 0 or labels.max() >= probabilities.shape[1]):
    raise ValueError(f'Labels must lie in 0..{probabilities.shape[1] - 1}.')
  if units is None:
    unit, num_units = np.arange(len(labels)), len(labels)
  else:
    unit = np.asarray(units, np.int64)
    if unit.shape != labels.shape:
      raise ValueError(f'units {unit.shape} must give one unit per row {labels.shape}.')
    num_units = int(unit.max()) + 1 if len(unit) else 0
    if len(unit) and unit.min() < 0:
      raise ValueError('units must be non-negative.')
  single = weights is None or np.ndim(weights) == 1
  if weights is None:
    weights = np.ones((1, num_units))
  weights = np.atleast_2d(np.asarray(weights, np.float64))
  if weights.ndim != 2 or weights.shape[1] < num_units:
    raise ValueError(f'weights {weights.shape} must be [U] or [B, U] with U >= {num_units}.')
  return labels, probabilities, unit, weights.shape[1], weights, single


def _unit_sums(unit, num_units, cell, num_cells, values=None):
  """float64 [U, C]: per unit, the sum of `values` (default 1) of its rows in each cell."""
  sums = np.bincount(unit * num_cells + cell, weights=values, minlength=num_units * num_cells)
  return sums.reshape(num_units, num_cells).astype(np.float64)


def _ratio(numerator, denominator):
  out = np.full(np.shape(numerator), np.nan)
  return np.divide(numerator, denominator, out=out, where=denominator > 0)


def _result(values, single):
  return float(values[0]) if single else values


# ----------------------------------------------------------------------------- ROC AUC


def _auc_by_pairs(group, num_groups, positive, unit, num_units, weights):
  """Mann-Whitney numerators [B] as quadratic forms w M w over units (module docstring)."""
  neg = _unit_sums(group, num_groups, unit, num_units, (~positive).astype(np.float64))
  below = np.cumsum(neg, axis=0) - 0.5 * neg  # [G, U] negatives scored below, ties 1/2.
  rows = np.flatnonzero(positive)
  rows = rows[np.argsort(unit[rows], kind='stable')]
  pairs = np.zeros((num_units, num_units))  # Positives of unit a over negatives of unit c.
  if len(rows):
    starts = np.flatnonzero(np.r_[True, np.diff(unit[rows]) != 0])
    pairs[unit[rows[starts]]] = np.add.reduceat(below[group[rows]], starts, axis=0)
  return ((weights @ pairs) * weights).sum(1)


def _auc_by_sorting(group, positive, unit, weights):
  """The same numerators by cumulative sums over the sorted rows, in blocks of weightings."""
  order = np.argsort(group, kind='stable')
  starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
  unit, positive = unit[order], positive[order]
  numerators = np.empty(len(weights))
  step = max(1, _CHUNK // max(1, len(unit)))
  for begin in range(0, len(weights), step):
    rows = weights[begin:begin + step][:, unit]
    pos = np.add.reduceat(np.where(positive, rows, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(positive, 0.0, rows), starts, axis=1)
    numerators[begin:begin + step] = (pos * (np.cumsum(neg, axis=1) - 0.5 * neg)).sum(1)
  return numerators


def _binary_auc(scores, positive, unit, num_units, weights):
  """AUC [B] of `scores` for the rows where `positive`; NaN without both kinds of weight."""
  if not len(scores):
    return np.full(len(weights), np.nan)
  _, group = np.unique(scores, return_inverse=True)
  group = group.ravel()
  num_groups = int(group.max()) + 1
  if num_groups * num_units <= _PAIR_LIMIT:
    numerators = _auc_by_pairs(group, num_groups, positive, unit, num_units, weights)
  else:
    numerators = _auc_by_sorting(group, positive, unit, weights)
  counts = _unit_sums(unit, num_units, positive.astype(np.int64), 2)  # [U, (neg, pos)].
  totals = weights @ counts
  return _ratio(numerators, totals[:, 0] * totals[:, 1])


def roc_auc(labels, probabilities, weights=None, units=None):
  """Area under the ROC curve, weighted (see the module docstring for the arguments).

  Binary (K = 2): the AUC of p[:, 1] with label 1 positive. Multi-class: the
  macro one-vs-rest AUC, the unweighted mean over classes of the AUC of p[:, k]
  for class k against the rest (scikit-learn's `multi_class='ovr'`), over the
  classes that have positive and negative weight under the weighting. Tied
  scores count 1/2.

  Returns:
    float, or float64 [B] for weights [B, U]; NaN where undefined.
  """
  labels, probabilities, unit, num_units, weights, single = _prepare(
      labels, probabilities, weights, units)
  num_classes = probabilities.shape[1]
  if num_classes == 2:
    return _result(_binary_auc(probabilities[:, 1], labels == 1, unit, num_units, weights),
                   single)
  per_class = np.stack([_binary_auc(probabilities[:, k], labels == k, unit, num_units, weights)
                        for k in range(num_classes)])
  defined = ~np.isnan(per_class)
  total = np.where(defined, per_class, 0.0).sum(0)
  return _result(_ratio(total, defined.sum(0).astype(np.float64)), single)


# ----------------------------------------------------------------------------- the rest


def sensitivity_specificity(labels, probabilities, weights=None, units=None):
  """(sensitivity, specificity) of a binary task: label 1 positive, predicted by argmax.

  Sensitivity: the weighted share of positives predicted 1 (recall of class 1);
  specificity: of negatives predicted 0. Arguments as in the module docstring.

  Returns:
    Two floats, or two float64 [B]; NaN where a class has no weight.
  """
  labels, probabilities, unit, num_units, weights, single = _prepare(
      labels, probabilities, weights, units)
  if probabilities.shape[1] != 2:
    raise ValueError('Sensitivity and specificity need a binary task (K = 2), not '
                     f'K = {probabilities.shape[1]}.')
  cells = _unit_sums(unit, num_units, 2 * labels + probabilities.argmax(-1), 4)
  confusion = weights @ cells  # [B, (TN, FP, FN, TP)].
  sensitivity = _ratio(confusion[:, 3], confusion[:, 2] + confusion[:, 3])
  specificity = _ratio(confusion[:, 0], confusion[:, 0] + confusion[:, 1])
  return _result(sensitivity, single), _result(specificity, single)


def brier(labels, probabilities, weights=None, units=None):
  """Brier score: the weighted mean over rows of sum_k (p_k - [label = k])^2. Lower is better.

  The multi-class definition for every K, binary included: for K = 2 this is
  twice the one-column score of p[:, 1] (scikit-learn's `brier_score_loss(...,
  scale_by_half=False)` for both). Ranges from 0 (certain and right) to 2.
  """
  labels, probabilities, unit, num_units, weights, single = _prepare(
      labels, probabilities, weights, units)
  onehot = np.eye(probabilities.shape[1])[labels]
  errors = ((probabilities - onehot)**2).sum(1)
  sums = _unit_sums(unit, num_units, np.zeros_like(unit), 1, errors)[:, 0]
  counts = _unit_sums(unit, num_units, np.zeros_like(unit), 1)[:, 0]
  return _result(_ratio(weights @ sums, weights @ counts), single)


def expected_calibration_error(labels, probabilities, weights=None, units=None,
                               num_bins=NUM_BINS):
  """Expected calibration error of the top-class confidence. Lower is better.

  The confidence max_k p_k falls in one of `num_bins` equal-width bins (m/M,
  (m+1)/M] (Guo et al. 2017); ECE = sum over bins of (the bin's weighted share
  of rows) x |accuracy - mean confidence| in the bin, accuracy = argmax right.
  Equivalently sum_m |sum_{i in m} w_i (right_i - confidence_i)| / sum_i w_i,
  linear per bin, hence vectorised over weightings.
  """
  labels, probabilities, unit, num_units, weights, single = _prepare(
      labels, probabilities, weights, units)
  confidence = probabilities.max(-1)
  right = (probabilities.argmax(-1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.searchsorted(edges[1:-1], confidence, side='left')
  gaps = _unit_sums(unit, num_units, bins, num_bins, right - confidence)
  counts = _unit_sums(unit, num_units, np.zeros_like(unit), 1)[:, 0]
  return _result(_ratio(np.abs(weights @ gaps).sum(1), weights @ counts), single)


def probability_metrics(labels, probabilities, weights=None, units=None, metrics=METRICS):
  """{name: value} of the named METRICS ('ece': `expected_calibration_error`).

  Arguments as in the module docstring; values are floats, or float64 [B] for
  weights [B, U]. 'sensitivity' and 'specificity' need K = 2.
  """
  unknown = [m for m in metrics if m not in METRICS]
  if unknown:
    raise ValueError(f'Unknown metrics {unknown}; known: {METRICS}.')
  args = (labels, probabilities, weights, units)
  result = {}
  if 'roc_auc' in metrics:
    result['roc_auc'] = roc_auc(*args)
  if 'sensitivity' in metrics or 'specificity' in metrics:
    result['sensitivity'], result['specificity'] = sensitivity_specificity(*args)
  if 'brier' in metrics:
    result['brier'] = brier(*args)
  if 'ece' in metrics:
    result['ece'] = expected_calibration_error(*args)
  return {m: result[m] for m in metrics}
