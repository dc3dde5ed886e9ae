"""Confidence intervals over subjects: a stratified, paired cluster bootstrap.

The unit of the data is the person, not the slice: a person's 32 slices are near
copies of each other, so resampling slices would treat 32 correlated answers as
32 independent ones and give intervals far too narrow. Here a resample draws
SUBJECTS with replacement, within each class (every class keeps its number of
subjects, so balanced accuracy stays defined and no resample loses the
Moderate_Demented class, two people, by chance), and each drawn subject brings
all of its slices along. The statistic of a resample is the metric of the pooled confusion
matrix of the drawn subjects, at slice level (every slice counts) or at subject
level (one prediction per person: the mean of their slices' probabilities).

Paired: a comparison of two arms draws the same subjects for both (the two arms'
predictions of a person are correlated, and the difference of the two metrics
on one resample is what varies). Seeds: with several seeds (labeled subsets,
initialisations), an arm's statistic on a resample is the mean over its seeds
of the metric, so the interval is over subjects with the seeds averaged, not
over seeds; the same resample of subjects is used for every seed.

Vectorised: each subject's contribution to the confusion matrix is a row of
[S, K*K] counts; a batch of B resamples is a [B, S] matrix of multinomial draw
counts, and all B confusion matrices are one product [B, S] @ [S, K*K]. Two
thousand resamples of 200 subjects take milliseconds (float32 products of whole
counts below 2**24 are exact).

Deterministic: the resample depends only on `seed`, the subjects and their
classes, so an arm's interval and its comparisons use the same resamples.
"""

import numpy as np

from simclr_jax.metrics import classification

METRICS = ('accuracy', 'balanced_accuracy', 'macro_f1')
LEVELS = ('slice', 'subject')
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------- resampling


def stratified_counts(strata, num_samples, rng):
  """How often each unit is drawn in each resample, within its stratum.

  Args:
    strata: int [S] the stratum (class) of each unit (subject).
    num_samples: B, the number of resamples.
    rng: a numpy Generator.

  Returns:
    float32 [B, S] counts (whole numbers): per resample and stratum, the counts of
    the stratum's units sum to its number of units (a multinomial draw).
  """
  strata = np.asarray(strata)
  counts = np.zeros((num_samples, len(strata)), np.float32)
  for stratum in np.unique(strata):
    members = np.flatnonzero(strata == stratum)
    n = len(members)
    draws = rng.integers(0, n, size=(num_samples, n)) + n * np.arange(num_samples)[:, None]
    counts[:, members] = np.bincount(draws.ravel(), minlength=num_samples * n).reshape(
        num_samples, n)
  return counts


_COUNTS_CACHE = {}  # (strata bytes, B, seed) -> counts: a report asks for the same draws often.


def _cached_counts(strata, num_samples, seed):
  key = (np.asarray(strata, np.int64).tobytes(), int(num_samples), int(seed))
  if key not in _COUNTS_CACHE:
    if len(_COUNTS_CACHE) >= 16:
      _COUNTS_CACHE.pop(next(iter(_COUNTS_CACHE)))
    counts = stratified_counts(strata, num_samples, np.random.default_rng(seed))
    counts.flags.writeable = False
    _COUNTS_CACHE[key] = counts
  return _COUNTS_CACHE[key]


def _subject_level(subject_ids, labels, probabilities, subjects, num_classes):
  """(labels, predicted classes) per subject of `subjects`, as `evaluate.subject_level`.

  The mean of the slices' probabilities (summed in float64 in row order, as
  evaluate's np.add.at, then float32: the same argmax) and the slices' majority class.
  """
  unit = np.searchsorted(subjects, subject_ids)
  sums = np.stack([np.bincount(unit, weights=probabilities[:, k], minlength=len(subjects))
                   for k in range(num_classes)], axis=1)
  counts = np.bincount(unit, minlength=len(subjects)).astype(np.float64)
  mean = (sums / counts[:, None]).astype(np.float32)
  votes = np.bincount(unit * num_classes + labels, minlength=len(subjects) * num_classes)
  return votes.reshape(len(subjects), num_classes).argmax(1), mean.argmax(1)


class _Units:
  """Per-subject confusion contributions of prediction sets over the same subjects."""

  def __init__(self, predictions_list, level, subjects=None):
    """`subjects`: the subject ids to use (default: those in every prediction set)."""
    if not predictions_list:
      raise ValueError('No predictions to bootstrap.')
    if level not in LEVELS:
      raise ValueError(f'level must be one of {LEVELS}, not {level!r}.')
    num_classes = predictions_list[0].probabilities.shape[1]
    if subjects is None:
      subjects = common_subjects(predictions_list)
    self.subjects = np.asarray(subjects)
    if not len(self.subjects):
      raise ValueError('The prediction sets share no subject.')
    self.num_classes = num_classes
    self.contributions = []  # Per prediction set: float32 [S, K*K] counts.
    strata = None
    num_slices = []
    size = len(self.subjects) * num_classes * num_classes
    for predictions in predictions_list:
      if predictions.probabilities.shape[1] != num_classes:
        raise ValueError('Prediction sets of different numbers of classes.')
      keep = np.isin(predictions.subject_ids, self.subjects)
      subject_ids = predictions.subject_ids[keep]
      labels = np.asarray(predictions.labels[keep], np.int64)
      probabilities = predictions.probabilities[keep]
      num_slices.append(int(keep.sum()))
      # The class of a subject: the majority class of its slices (its only class).
      classes, subject_predicted = _subject_level(subject_ids, labels, probabilities,
                                                  self.subjects, num_classes)
      if level == 'subject':
        unit, cell = np.arange(len(self.subjects)), classes * num_classes + subject_predicted
      else:
        unit = np.searchsorted(self.subjects, subject_ids)
        cell = labels * num_classes + probabilities.argmax(-1)
      contribution = np.bincount(unit * num_classes**2 + cell, minlength=size)
      self.contributions.append(
          contribution.reshape(len(self.subjects), -1).astype(np.float32))
      if strata is None:
        strata = classes
      elif not np.array_equal(strata, classes):
        raise ValueError('The prediction sets disagree on the subjects\' classes.')
    self.strata = strata
    self.num_slices = num_slices  # Per prediction set.
    self._stacked = None

  def counts(self, num_samples, seed):
    return _cached_counts(self.strata, num_samples, seed)

  def metrics(self, weights):
    """{metric: [sets, B]} of every prediction set under resample weights [B, S]."""
    if self._stacked is None:
      self._stacked = np.concatenate(self.contributions, axis=1)
    confusions = np.asarray(weights, np.float32) @ self._stacked  # One product for all.
    k = self.num_classes
    confusions = confusions.reshape(len(weights), len(self.contributions), k, k)
    return {m: v.T for m, v in classification.metrics_of_confusions(confusions).items()}


def common_subjects(predictions_list):
  """Sorted subject ids present in every prediction set."""
  subjects = np.unique(predictions_list[0].subject_ids)
  for predictions in predictions_list[1:]:
    subjects = np.intersect1d(subjects, predictions.subject_ids)
  return subjects


def _percentiles(values, confidence=CONFIDENCE):
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(values, [tail, 100 - tail])
  return float(low), float(high)


def _seed_mean(values, indices):
  """{metric: [B]}: the mean over the prediction sets `indices` (seeds) of {metric: [sets, B]}."""
  return {m: v[list(indices)].mean(0) for m, v in values.items()}


# ----------------------------------------------------------------------------- public


def arm_statistics(arms, pairs=(), level='subject', num_samples=2000, seed=0,
                   metrics=METRICS, confidence=CONFIDENCE):
  """Intervals of several arms and of paired differences, all on the same resamples.

  One set of resampled subjects (the subjects present in every prediction set)
  scores every arm and seed in one product, so a study's cell costs one bootstrap.

  Args:
    arms: {name: the arm's `evaluate.Predictions`, one per seed}.
    pairs: (a, b) names whose difference a - b to report.
    level: 'slice' (every slice counts) or 'subject' (one prediction per person).
    num_samples: resamples of subjects.
    seed: seeds the resampling.
    metrics: names of METRICS.
    confidence: coverage of the intervals.

  Returns:
    {'arms': {name: `bootstrap_intervals`' result}, 'differences': {(a, b):
    `paired_differences`' result}}.
  """
  names = list(arms)
  sets, index = [], {}
  for name in names:
    index[name] = range(len(sets), len(sets) + len(arms[name]))
    sets += list(arms[name])
  units = _Units(sets, level)
  points = units.metrics(np.ones((1, len(units.subjects))))
  samples = units.metrics(units.counts(num_samples, seed))
  point = {name: _seed_mean(points, index[name]) for name in names}
  sample = {name: _seed_mean(samples, index[name]) for name in names}
  common = {'level': level, 'num_subjects': int(len(units.subjects)),
            'num_samples': int(num_samples)}
  result = {'arms': {}, 'differences': {}}
  for name in names:
    entry = {**common, 'num_seeds': len(index[name]),
             'num_slices': int(round(np.mean([units.num_slices[i] for i in index[name]])))}
    for metric in metrics:
      low, high = _percentiles(sample[name][metric], confidence)
      entry[metric] = {'value': float(point[name][metric][0]), 'low': low, 'high': high}
    result['arms'][name] = entry
  for a, b in pairs:
    entry = {**common, 'num_seeds': [len(index[a]), len(index[b])]}
    for metric in metrics:
      low, high = _percentiles(100 * (sample[a][metric] - sample[b][metric]), confidence)
      entry[metric] = {
          'difference': float(100 * (point[a][metric][0] - point[b][metric][0])),
          'low': low, 'high': high}
    result['differences'][a, b] = entry
  return result


def bootstrap_intervals(predictions_by_seed, level='subject', num_samples=2000, seed=0,
                        metrics=METRICS, confidence=CONFIDENCE):
  """Point estimates and percentile intervals of an arm's metrics, over subjects.

  Args:
    predictions_by_seed: the arm's `evaluate.Predictions`, one per seed (each, e.g.,
      the out-of-fold predictions of every subject); only the subjects present in
      all of them are used.
    level: 'slice' (every slice counts) or 'subject' (one prediction per person).
    num_samples: resamples of subjects.
    seed: seeds the resampling.
    metrics: names of METRICS.
    confidence: coverage of the interval.

  Returns:
    {metric: {'value', 'low', 'high'}} as fractions (0 to 1): 'value' the mean over
    seeds of the metric on all subjects, ('low', 'high') the percentile interval of
    the resamples' seed means; plus 'num_subjects', 'num_slices' (per seed),
    'num_seeds', 'num_samples', 'level'.
  """
  return arm_statistics({'arm': list(predictions_by_seed)}, (), level, num_samples, seed,
                        metrics, confidence)['arms']['arm']


def bootstrap_interval(predictions_by_seed, metric='balanced_accuracy', level='subject',
                       num_samples=2000, seed=0, confidence=CONFIDENCE):
  """{'value', 'low', 'high'} of one metric (see `bootstrap_intervals`)."""
  return bootstrap_intervals(predictions_by_seed, level, num_samples, seed, (metric,),
                             confidence)[metric]


def paired_differences(a_by_seed, b_by_seed, level='subject', num_samples=2000, seed=0,
                       metrics=METRICS, confidence=CONFIDENCE):
  """Arm a minus arm b, in points, with percentile intervals over the same resamples.

  Both arms are scored on the same resampled subjects (the subjects present in
  every prediction set of both); each arm's statistic is the mean over its seeds
  (give both the same seeds to pair the labeled subsets too).

  Returns:
    {metric: {'difference', 'low', 'high'}} in percentage points (100 x the
    difference of fractions); 'difference' on all subjects; plus 'num_subjects',
    'num_seeds' (a, b), 'num_samples', 'level'.
  """
  arms = {'a': list(a_by_seed), 'b': list(b_by_seed)}
  return arm_statistics(arms, [('a', 'b')], level, num_samples, seed, metrics,
                        confidence)['differences']['a', 'b']


def paired_difference(a_by_seed, b_by_seed, metric='balanced_accuracy', level='subject',
                      num_samples=2000, seed=0, confidence=CONFIDENCE):
  """{'difference', 'low', 'high'} of one metric, in points (see `paired_differences`)."""
  return paired_differences(a_by_seed, b_by_seed, level, num_samples, seed, (metric,),
                            confidence)[metric]


def outcome(difference):
  """'ahead' (interval above 0), 'behind' (below 0) or 'no difference detectable'."""
  if difference['low'] > 0:
    return 'ahead'
  if difference['high'] < 0:
    return 'behind'
  return 'no difference detectable'


def verdict(difference, a='SimCLR', b='the baseline', what='balanced accuracy'):
  """One sentence on a - b that follows the 95 % interval, not the point estimate.

  Args:
    difference: {'difference', 'low', 'high'} in points (`paired_difference`).
    a, b: names of the two arms.
    what: the metric, in words.
  """
  d, low, high = difference['difference'], difference['low'], difference['high']
  interval = f'[{low:+.1f}, {high:+.1f}]'
  result = outcome(difference)
  if result == 'ahead':
    return (f'{a} is ahead of {b} by {d:+.1f} points of {what} (95 % interval '
            f'{interval}).')
  if result == 'behind':
    return (f'{a} is behind {b} by {d:+.1f} points of {what} (95 % interval '
            f'{interval}).')
  return (f'{a} vs {b}: no difference detectable at this sample size: the interval is '
          f'{interval} points of {what} (point estimate {d:+.1f}).')
