"""Tests of the paired, stratified bootstrap over subjects (simclr_jax/metrics/bootstrap.py)."""


import numpy as np
import pytest
from sklearn.metrics import brier_score_loss
from sklearn.metrics import recall_score
from sklearn.metrics import roc_auc_score

from simclr_jax.metrics import bootstrap
from simclr_jax.metrics import calibration
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


# ----------------------------------------------------------------------------- new metrics


def soft(classes, accuracy, seed, num_slices=8, num_classes=4):
  """`noisy` predictions with unequal, soft probabilities (distinct scores, some ties)."""
  p = predictions(classes, np.full(len(classes), float(accuracy)), num_slices, num_classes,
                  seed)
  rng = np.random.default_rng(seed + 100)
  mix = np.round(rng.dirichlet(np.ones(num_classes), len(p.labels)), 2)
  p.probabilities[:] = 0.5 * p.probabilities + 0.5 * mix / mix.sum(1, keepdims=True)
  return p


@pytest.mark.filterwarnings('ignore:The y_prob values do not sum to one')  # float32 sums.
@pytest.mark.parametrize('level', bootstrap.LEVELS)
@pytest.mark.parametrize('num_classes', [2, 4])
def test_probability_metrics_point_estimates_are_the_metrics_on_all_subjects(level,
                                                                            num_classes):
  classes = subjects((60, 40)) if num_classes == 2 else subjects()
  seeds = [soft(classes, 0.6, 1, num_classes=num_classes),
           soft(classes, 0.7, 2, num_classes=num_classes)]
  names = bootstrap.PROBABILITY_METRICS if num_classes == 2 else ('roc_auc', 'brier', 'ece')
  result = bootstrap.bootstrap_intervals(seeds, level, 300, 0, bootstrap.METRICS + names)
  full = [p if level == 'slice' else classification.subject_level(p) for p in seeds]
  expected = {'roc_auc': [], 'brier': [], 'ece': [], 'sensitivity': [], 'specificity': []}
  for p in full:
    labels, probabilities = p.labels, p.probabilities.astype(np.float64)
    expected['roc_auc'].append(
        roc_auc_score(labels, probabilities[:, 1]) if num_classes == 2 else
        roc_auc_score(labels, probabilities, multi_class='ovr'))
    expected['brier'].append(brier_score_loss(labels, probabilities, scale_by_half=False))
    expected['ece'].append(calibration.expected_calibration_error(labels, probabilities))
    if num_classes == 2:
      predicted = probabilities.argmax(1)
      expected['sensitivity'].append(recall_score(labels, predicted, pos_label=1))
      expected['specificity'].append(recall_score(labels, predicted, pos_label=0))
  for name in names:
    assert result[name]['value'] == pytest.approx(np.mean(expected[name]), abs=1e-9), name
    assert result[name]['seed_values'] == pytest.approx(expected[name], abs=1e-9), name
    assert result[name]['low'] <= result[name]['value'] <= result[name]['high'], name
  # The confusion metrics are unchanged by asking for the others too.
  old = bootstrap.bootstrap_intervals(seeds, level, 300, 0)
  for name in bootstrap.METRICS:
    assert result[name] == old[name]


def test_probability_metrics_of_a_better_arm_are_ahead_on_the_same_resamples():
  classes = subjects((60, 40))
  good = [soft(classes, 0.9, 1, num_classes=2)]
  poor = [soft(classes, 0.55, 2, num_classes=2)]
  for level in bootstrap.LEVELS:
    result = bootstrap.paired_differences(good, poor, level, 500, 0, bootstrap.ALL_METRICS)
    assert bootstrap.outcome(result['roc_auc']) == 'ahead'
    assert bootstrap.outcome(result['sensitivity']) == 'ahead'
    assert bootstrap.outcome(result['specificity']) == 'ahead'
    assert bootstrap.outcome(result['brier']) == 'behind'  # Lower is better: good is lower.
    assert bootstrap.equivalence_outcome(result['brier'], 1.0, lower_is_better=True) == 'ahead'
    same = bootstrap.paired_differences(good, good, level, 200, 0, bootstrap.ALL_METRICS)
    for name in bootstrap.ALL_METRICS:
      assert same[name]['difference'] == same[name]['low'] == same[name]['high'] == 0.0
  with pytest.raises(ValueError, match='Unknown metrics'):
    bootstrap.bootstrap_intervals(good, 'subject', 10, 0, ('auc',))
  with pytest.raises(ValueError, match='binary'):
    bootstrap.bootstrap_intervals([noisy(subjects(), 0.6, 0)], 'subject', 10, 0,
                                  ('sensitivity',))


def test_study_sized_bootstrap_of_probability_metrics_holds_its_estimates():
  classes = subjects()
  a = [soft(classes, 0.6, 1, num_slices=32)]
  b = [soft(classes, 0.5, 2, num_slices=32)]
  names = ('roc_auc', 'brier', 'ece')
  for level in bootstrap.LEVELS:
    result = bootstrap.arm_statistics({'a': a, 'b': b}, [('a', 'b')], level, 2000, 0, names)
    for entry in (*result['arms'].values(), result['differences']['a', 'b']):
      for name in names:
        interval = entry[name]
        estimate = interval.get('value', interval.get('difference'))
        assert interval['low'] <= estimate <= interval['high'], (level, name, interval)


# ----------------------------------------------------------------------------- seeds


def test_resampling_seeds_widens_the_interval_by_the_seed_spread():
  classes = subjects()
  spread = [noisy(classes, accuracy, seed=s) for s, accuracy in enumerate((0.3, 0.6, 0.9))]
  fixed = bootstrap.bootstrap_interval(spread, 'accuracy', 'subject', 1000, 0)
  drawn = bootstrap.bootstrap_interval(spread, 'accuracy', 'subject', 1000, 0,
                                       resample_seeds=True)
  assert drawn['value'] == fixed['value']  # The point estimate is still the seed mean.
  assert drawn['high'] - drawn['low'] > 2 * (fixed['high'] - fixed['low'])
  assert len(drawn['seed_values']) == 3 and drawn['seed_values'] == fixed['seed_values']
  assert drawn['seed_values'][0] < drawn['seed_values'][1] < drawn['seed_values'][2]
  # Copies of one seed: nothing to resample, the same interval.
  copies = [spread[1]] * 3
  assert bootstrap.bootstrap_interval(copies, 'accuracy', 'subject', 500, 0,
                                      resample_seeds=True) == bootstrap.bootstrap_interval(
                                          copies, 'accuracy', 'subject', 500, 0)


def test_resampled_seeds_are_paired_by_seed_index():
  classes = subjects()
  arm = [noisy(classes, accuracy, seed=s) for s, accuracy in enumerate((0.3, 0.6, 0.9))]
  # Identical arms: the same seed draw for both, so every resample differs by nothing.
  same = bootstrap.paired_difference(arm, arm, 'accuracy', 'subject', 500, 0,
                                     resample_seeds=True)
  assert same['low'] == same['high'] == 0.0 and same['seed_values'] == [0.0, 0.0, 0.0]
  np.testing.assert_array_equal(bootstrap.seed_draws(3, 50, 4), bootstrap.seed_draws(3, 50, 4))
  assert not np.array_equal(bootstrap.seed_draws(3, 50, 4), bootstrap.seed_draws(3, 50, 5))
  draws = bootstrap.seed_draws(3, 2000, 0)
  assert draws.shape == (2000, 3) and set(np.unique(draws)) == {0, 1, 2}
  assert (np.sort(draws, 1) != [0, 1, 2]).any(1).mean() > 0.5  # With replacement.
  # Per-seed differences need as many seeds in both arms.
  result = bootstrap.arm_statistics({'a': arm, 'b': arm, 'c': arm[:2]}, [('a', 'b'), ('a', 'c')],
                                    'subject', 200, 0, resample_seeds=True)
  assert result['differences']['a', 'b']['accuracy']['seed_values'] == [0.0, 0.0, 0.0]
  assert result['differences']['a', 'c']['accuracy']['seed_values'] is None
  assert result['arms']['a']['resample_seeds'] is True
  assert 'resample_seeds' not in bootstrap.arm_statistics({'a': arm}, (), 'subject', 20)['arms'][
      'a']


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize('low, high, expected', [
    (0.1, 5.0, 'ahead'), (0.1, 0.5, 'ahead'),  # Above 0, outside or inside the margin.
    (-5.0, -0.1, 'behind'), (-0.5, -0.1, 'behind'),
    (-1.0, 1.5, 'equivalent'), (-2.0, 2.0, 'equivalent'),  # Bounds on the margin: inside.
    (0.0, 2.0, 'equivalent'), (0.0, 0.0, 'equivalent'),  # 0 itself is not above 0.
    (-2.0, 2.01, 'inconclusive'), (-2.01, 1.0, 'inconclusive'), (-8.0, 9.0, 'inconclusive'),
    (0.0, 3.0, 'inconclusive'),
])
def test_equivalence_outcome_of_every_interval(low, high, expected):
  difference = {'difference': (low + high) / 2, 'low': low, 'high': high}
  assert bootstrap.equivalence_outcome(difference, 2.0) == expected
  flipped = {'ahead': 'behind', 'behind': 'ahead'}.get(expected, expected)
  assert bootstrap.equivalence_outcome(difference, 2.0, lower_is_better=True) == flipped


def test_equivalence_margin_is_checked():
  for margin in (None, -1.0, float('nan')):
    with pytest.raises(ValueError, match='margin'):
      bootstrap.equivalence_outcome({'low': 0.0, 'high': 1.0}, margin)
  assert bootstrap.equivalence_outcome({'low': 0.0, 'high': 0.0}, 0.0) == 'equivalent'


def test_verdicts_with_a_margin():
  sentence = lambda low, high, d, **kw: bootstrap.verdict(
      {'difference': d, 'low': low, 'high': high}, 'SimCLR', 'the baseline',
      'balanced accuracy', margin=2.0, **kw)
  assert sentence(3.0, 9.0, 6.0) == ('SimCLR is ahead of the baseline by +6.0 points of '
                                     'balanced accuracy (95 % interval [+3.0, +9.0]).')
  assert sentence(0.5, 1.5, 1.0) == (
      'SimCLR is ahead of the baseline by +1.0 points of balanced accuracy (95 % interval '
      '[+0.5, +1.5]), a difference within the equivalence margin of ±2.0 points.')
  assert sentence(-9.0, -3.0, -6.0) == ('SimCLR is behind the baseline by -6.0 points of '
                                        'balanced accuracy (95 % interval [-9.0, -3.0]).')
  assert sentence(-1.0, 1.5, 0.2) == (
      'SimCLR and the baseline are equivalent within ±2.0 points of balanced accuracy '
      '(95 % interval [-1.0, +1.5] lies inside; point estimate +0.2).')
  assert sentence(-1.0, 6.0, 2.5) == (
      'SimCLR vs the baseline, inconclusive: differences from -1.0 to +6.0 points of '
      'balanced accuracy are not excluded (point estimate +2.5; equivalence margin ±2.0).')
  assert sentence(-3.0, -1.0, -2.0, lower_is_better=True).startswith(
      'SimCLR is ahead of the baseline by -2.0 points of balanced accuracy (lower is better; '
      '95 % interval [-3.0, -1.0])')
  for low, high in ((-1.0, 1.0), (-1.0, 6.0), (0.5, 1.5), (-4.0, -3.0)):
    assert 'no difference detectable' not in sentence(low, high, (low + high) / 2)
  # Without a margin, the sentences of old.
  assert bootstrap.verdict({'difference': 8.0, 'low': -0.1, 'high': 16.0}) == (
      'SimCLR vs the baseline: no difference detectable at this sample size: the interval '
      'is [-0.1, +16.0] points of balanced accuracy (point estimate +8.0).')
