"""Tests of the paired, stratified bootstrap over subjects (simclr_jax/stats.py)."""


import numpy as np
import pytest

from simclr_jax.metrics import bootstrap
from simclr_jax.metrics import classification

# Subjects per class shaped like the Kaggle data: Mild, Moderate, Non, Very mild.
SUBJECTS_PER_CLASS = (28, 2, 100, 70)


def subjects(per_class=SUBJECTS_PER_CLASS):
  """Subject classes [S]."""
  return np.repeat(np.arange(len(per_class)), per_class)


def predictions(classes, predicted, num_slices=8, num_classes=4, seed=0):
  """Predictions of subjects of `classes`, `num_slices` slices each.

  `predicted`: per subject a class (every slice answers it) or, as a float array
  [S], the share of the subject's slices answered right (the others wrong).
  """
  rng = np.random.default_rng(seed)
  classes = np.asarray(classes)
  subject_ids = np.repeat(1000 + np.arange(len(classes)), num_slices)
  labels = np.repeat(classes, num_slices).astype(np.int32)
  predicted = np.asarray(predicted)
  if predicted.dtype.kind == 'f':
    right = rng.uniform(size=len(labels)) < np.repeat(predicted, num_slices)
    slice_predicted = np.where(right, labels, (labels + 1) % num_classes)
  else:
    slice_predicted = np.repeat(predicted, num_slices)
  probabilities = np.full((len(labels), num_classes), 0.1 / (num_classes - 1), np.float32)
  probabilities[np.arange(len(labels)), slice_predicted] = 0.9
  order = rng.permutation(len(labels))  # Rows in any order: subjects are found by id.
  return classification.Predictions(np.arange(len(labels))[order], subject_ids[order],
                              labels[order], probabilities[order])


def noisy(classes, accuracy, seed, num_slices=8):
  """About `accuracy` of the slices right, independently per slice."""
  return predictions(classes, np.full(len(classes), float(accuracy)), num_slices, seed=seed)


def test_identical_arms_differ_by_nothing():
  classes = subjects()
  arm = [noisy(classes, 0.6, seed=0), noisy(classes, 0.6, seed=1)]
  for level in bootstrap.LEVELS:
    difference = bootstrap.paired_difference(arm, arm, 'balanced_accuracy', level, 500, seed=0)
    assert difference['difference'] == 0.0
    assert difference['low'] <= 0.0 <= difference['high']
    assert bootstrap.outcome(difference) == 'no difference detectable'
    sentence = bootstrap.verdict(difference)
    assert 'no difference detectable at this sample size: the interval is [' in sentence


def test_right_on_every_subject_is_ahead_of_wrong_on_every_subject():
  classes = subjects()
  right = [predictions(classes, classes)]
  wrong = [predictions(classes, (classes + 1) % 4)]
  for level in bootstrap.LEVELS:
    ahead = bootstrap.paired_difference(right, wrong, 'balanced_accuracy', level, 500, seed=0)
    assert ahead['difference'] == pytest.approx(100.0)
    assert ahead['low'] > 50.0
    assert bootstrap.outcome(ahead) == 'ahead'
    assert bootstrap.verdict(ahead, 'SimCLR', 'the baseline').startswith(
        'SimCLR is ahead of the baseline by +100.0 points')
    behind = bootstrap.paired_difference(wrong, right, 'balanced_accuracy', level, 500, seed=0)
    assert behind['high'] < -50.0
    assert bootstrap.outcome(behind) == 'behind'
    assert 'is behind' in bootstrap.verdict(behind)


def test_verdict_follows_the_interval_not_the_point_estimate():
  assert bootstrap.outcome({'difference': 5.0, 'low': 0.1, 'high': 9.0}) == 'ahead'
  assert bootstrap.outcome({'difference': 8.0, 'low': -0.1, 'high': 16.0}) == (
      'no difference detectable')
  assert bootstrap.outcome({'difference': -3.0, 'low': -6.0, 'high': -0.2}) == 'behind'
  assert bootstrap.verdict({'difference': 8.0, 'low': -0.1, 'high': 16.0}) == (
      'SimCLR vs the baseline: no difference detectable at this sample size: the interval '
      'is [-0.1, +16.0] points of balanced accuracy (point estimate +8.0).')


@pytest.mark.parametrize('level', bootstrap.LEVELS)
def test_point_estimate_is_the_metric_on_all_subjects(level):
  classes = subjects()
  seeds = [noisy(classes, 0.55, seed=3), noisy(classes, 0.7, seed=4)]
  for p in seeds:  # Soft, unequal probabilities: the subject level averages them.
    p.probabilities[:] = np.random.default_rng(5).dirichlet(np.ones(4), len(p.labels))
  full = [classification.prediction_metrics(p, 4) for p in seeds]
  full = [m if level == 'slice' else m['subject'] for m in full]
  result = bootstrap.bootstrap_intervals(seeds[:1], level, 200, seed=0)
  for metric in bootstrap.METRICS:
    assert result[metric]['value'] == pytest.approx(full[0][metric], abs=1e-12)
    assert result[metric]['low'] <= result[metric]['high']
  # Several seeds: the mean over the seeds.
  result = bootstrap.bootstrap_intervals(seeds, level, 200, seed=0)
  for metric in bootstrap.METRICS:
    assert result[metric]['value'] == pytest.approx(
        np.mean([m[metric] for m in full]), abs=1e-12)
  assert result['num_subjects'] == len(classes) and result['num_seeds'] == 2


def test_vectorised_metrics_match_evaluate():
  rng = np.random.default_rng(0)
  matrices = rng.integers(0, 5, (50, 4, 4))
  matrices[:10, 1] = 0  # A class absent from the labels.
  matrices[10:20, :, 2] = 0  # A class never predicted.
  vectorised = classification.metrics_of_confusions(matrices)
  for i, matrix in enumerate(matrices):
    expected = classification.metrics_from_confusion(matrix)
    for metric in bootstrap.METRICS:
      assert vectorised[metric][i] == pytest.approx(expected[metric], abs=1e-12)


def test_stratified_resample_keeps_every_class_count():
  classes = subjects()
  counts = bootstrap.stratified_counts(classes, 300, np.random.default_rng(0))
  assert counts.shape == (300, len(classes))
  assert np.all(counts == np.round(counts)) and counts.min() >= 0
  for k, n in enumerate(SUBJECTS_PER_CLASS):
    np.testing.assert_array_equal(counts[:, classes == k].sum(1), n)
  # A resample draws with replacement: subjects repeat and others are left out.
  assert (counts == 0).any(1).all() and (counts > 1).any(1).all()


def test_interval_narrows_with_more_subjects():
  def width(scale):
    classes = subjects(tuple(scale * n for n in (14, 2, 50, 35)))
    result = bootstrap.bootstrap_interval([noisy(classes, 0.6, seed=0)], 'balanced_accuracy',
                                      'subject', 1000, seed=0)
    return result['high'] - result['low']
  assert width(4) < 0.7 * width(1)


def test_pairing_cancels_what_both_arms_share():
  classes = subjects()
  share = np.random.default_rng(1).uniform(0.2, 0.9, len(classes))
  a = predictions(classes, share, seed=2)
  b = predictions(classes, share, seed=2)
  b.probabilities[b.subject_ids == 1000] = np.roll(b.probabilities[b.subject_ids == 1000], 1,
                                                   axis=1)  # One subject answered otherwise.
  alone = bootstrap.bootstrap_interval([a], 'accuracy', 'slice', 1000, seed=0)
  paired = bootstrap.paired_difference([a], [b], 'accuracy', 'slice', 1000, seed=0)
  assert 100 * (alone['high'] - alone['low']) > 5 * (paired['high'] - paired['low'])


def test_resampling_is_deterministic_and_seeded():
  classes = subjects()
  a, b = [noisy(classes, 0.6, seed=0)], [noisy(classes, 0.5, seed=1)]
  first = bootstrap.paired_differences(a, b, 'subject', 300, seed=7)
  assert bootstrap.paired_differences(a, b, 'subject', 300, seed=7) == first
  other = bootstrap.paired_differences(a, b, 'subject', 300, seed=8)
  assert other['balanced_accuracy']['difference'] == first['balanced_accuracy']['difference']
  assert (other['balanced_accuracy']['low'], other['balanced_accuracy']['high']) != (
      first['balanced_accuracy']['low'], first['balanced_accuracy']['high'])


def test_only_subjects_every_arm_predicted_are_compared():
  classes = subjects()
  a = predictions(classes, classes)
  keep = a.subject_ids < 1150
  b = classification.Predictions(a.rows[keep], a.subject_ids[keep], a.labels[keep],
                           a.probabilities[keep])
  result = bootstrap.paired_differences([a], [b], 'slice', 100, seed=0)
  assert result['num_subjects'] == 150 and result['accuracy']['difference'] == 0.0


def test_thousands_of_resamples_of_hundreds_of_subjects_give_ordered_intervals():
  classes = subjects()
  a = [noisy(classes, 0.6, seed=s, num_slices=32) for s in range(3)]
  b = [noisy(classes, 0.5, seed=10 + s, num_slices=32) for s in range(3)]
  for arm in (a, b):  # Softmax-like probabilities, 32 slices per subject.
    for p in arm:
      p.probabilities[:] = np.random.default_rng(0).dirichlet(np.ones(4), len(p.labels))
  # A study's size: a loop over resamples would take minutes, the products seconds
  # (timings belong to benchmarks; here the intervals must hold their estimates).
  for level in bootstrap.LEVELS:
    for result in (bootstrap.bootstrap_intervals(a, level, 2000, seed=0),
                   bootstrap.bootstrap_intervals(b, level, 2000, seed=0),
                   bootstrap.paired_differences(a, b, level, 2000, seed=0)):
      for interval in (v for v in result.values() if isinstance(v, dict) and 'low' in v):
        estimate = interval.get('value', interval.get('difference'))
        assert interval['low'] <= estimate <= interval['high'], interval


def test_one_bootstrap_of_every_arm_equals_the_separate_ones():
  classes = subjects()
  arms = {'floor': [noisy(classes, 0.4, seed=0)],
          'baseline': [noisy(classes, 0.5, seed=1), noisy(classes, 0.55, seed=2)],
          'finetune': [noisy(classes, 0.6, seed=3), noisy(classes, 0.5, seed=4)]}
  together = bootstrap.arm_statistics(arms, [('finetune', 'baseline'), ('baseline', 'floor')],
                                  'subject', 300, seed=1)
  for name, arm in arms.items():
    assert together['arms'][name] == bootstrap.bootstrap_intervals(arm, 'subject', 300, seed=1)
  assert together['differences']['finetune', 'baseline'] == bootstrap.paired_differences(
      arms['finetune'], arms['baseline'], 'subject', 300, seed=1)
