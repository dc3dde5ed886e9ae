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

Metrics of the probabilities ('roc_auc', 'sensitivity', 'specificity', 'brier',
'ece'; `calibration`) take the same resamples (paired as the others) at both
levels, through `calibration`'s weighted forms with each subject's draw count as
the weight of its slices. They cost more than the product: for 2000 resamples of
200 subjects x 32 slices, measured on one shared CPU core (2 arms x 3 seeds of
synthetic predictions through `arm_statistics`), four classes ('roc_auc',
'brier', 'ece') take about 0.16 s per seed at slice level and 0.05 s at subject
level, two classes (all five) 0.06 s and 0.04 s, so at most half a second for an
arm of three seeds; the three confusion metrics take 0.005 s per seed. Lower is
better for 'brier' and 'ece' (`LOWER_IS_BETTER`): a difference a - b above 0
means arm a is worse.

Seeds resampled (`resample_seeds=True`): each resample also draws an arm's seeds
with replacement and averages the drawn seeds, so the interval covers the
training randomness as well as the subjects; arms with as many seeds share the
draw (paired by seed index: give the arms of a comparison the same seeds).
Either way every metric reports its per-seed values ('seed_values').

Verdicts: `outcome` and `verdict` say whether an interval excludes 0;
`equivalence_outcome` and `verdict(..., margin=m)` also say when it lies within
±m points (the two arms are equivalent), and never just "no difference".
"""

import numpy as np

from simclr_jax.metrics import calibration
from simclr_jax.metrics import classification

METRICS = ('accuracy', 'balanced_accuracy', 'macro_f1')  # From confusion matrices.
PROBABILITY_METRICS = calibration.METRICS  # From the probabilities (`calibration`).
ALL_METRICS = METRICS + PROBABILITY_METRICS
LOWER_IS_BETTER = calibration.LOWER_IS_BETTER  # The others: higher is better.
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
  """(labels, mean probabilities) per subject of `subjects`, as `classification.subject_level`.

  The mean of the slices' probabilities (summed in float64 in row order, as
  evaluate's np.add.at, then float32: the same argmax) and the slices' majority class.
  """
  unit = np.searchsorted(subjects, subject_ids)
  sums = np.stack([np.bincount(unit, weights=probabilities[:, k], minlength=len(subjects))
                   for k in range(num_classes)], axis=1)
  counts = np.bincount(unit, minlength=len(subjects)).astype(np.float64)
  mean = (sums / counts[:, None]).astype(np.float32)
  votes = np.bincount(unit * num_classes + labels, minlength=len(subjects) * num_classes)
  return votes.reshape(len(subjects), num_classes).argmax(1), mean


class _Units:
  """Per-subject confusion contributions of prediction sets over the same subjects.

  Also each set's units for `calibration` (`scored`): at slice level the slices
  (labels, probabilities, their subject's index), at subject level the subjects
  (majority class, mean probabilities, their index).
  """

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
    self.scored = []  # Per prediction set: (labels, probabilities, units) of its units.
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
      classes, subject_probabilities = _subject_level(subject_ids, labels, probabilities,
                                                      self.subjects, num_classes)
      if level == 'subject':
        unit = np.arange(len(self.subjects))
        cell = classes * num_classes + subject_probabilities.argmax(-1)
        self.scored.append((classes, subject_probabilities, unit))
      else:
        unit = np.searchsorted(self.subjects, subject_ids)
        cell = labels * num_classes + probabilities.argmax(-1)
        self.scored.append((labels, probabilities, unit))
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

  def probability_metrics(self, weights, names):
    """{metric: [sets, B]} of `calibration`'s metrics `names` under weights [B, S]."""
    values = [calibration.probability_metrics(labels, probabilities, weights, unit, names)
              for labels, probabilities, unit in self.scored]
    return {m: np.stack([v[m] for v in values]) for m in names}


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


def _seed_mean(values, indices, draws=None):
  """{metric: [B]}: the mean over the prediction sets `indices` (seeds) of {metric: [sets, B]}.

  `draws`: optional int [B, seeds], per resample the seeds drawn (positions in
  `indices`); the mean is then over the drawn seeds.
  """
  if draws is None:
    return {m: v[list(indices)].mean(0) for m, v in values.items()}
  columns = np.arange(draws.shape[0])[:, None]
  return {m: v[list(indices)][draws, columns].mean(1) for m, v in values.items()}


def seed_draws(num_seeds, num_samples, seed):
  """int [B, seeds]: each resample's draw of `num_seeds` seed indices, with replacement.

  A function of (num_seeds, num_samples, seed) only (a stream apart from the
  subjects'), so arms with as many seeds share it: they are paired by seed index.
  """
  rng = np.random.default_rng([int(seed), int(num_seeds), 1])
  return rng.integers(0, num_seeds, size=(num_samples, num_seeds))


def _scores(units, weights, metrics):
  """{metric: [sets, B]}: the confusion metrics by one product, the others by `calibration`."""
  values = units.metrics(weights)
  probability = [m for m in metrics if m in PROBABILITY_METRICS]
  if probability:
    values.update(units.probability_metrics(weights, probability))
  return values


# ----------------------------------------------------------------------------- public


def arm_statistics(arms, pairs=(), level='subject', num_samples=2000, seed=0,
                   metrics=METRICS, confidence=CONFIDENCE, resample_seeds=False):
  """Intervals of several arms and of paired differences, all on the same resamples.

  One set of resampled subjects (the subjects present in every prediction set)
  scores every arm and seed in one product, so a study's cell costs one bootstrap.

  Args:
    arms: {name: the arm's `classification.Predictions`, one per seed}.
    pairs: (a, b) names whose difference a - b to report.
    level: 'slice' (every slice counts) or 'subject' (one prediction per person).
    num_samples: resamples of subjects.
    seed: seeds the resampling.
    metrics: names of ALL_METRICS: METRICS (confusion matrices, fast) and
      PROBABILITY_METRICS ('roc_auc', 'sensitivity', 'specificity', 'brier',
      'ece'; up to 0.16 s per seed for 2000 resamples of 200 subjects x 32
      slices, the module docstring). Lower is better for LOWER_IS_BETTER ('brier',
      'ece'); 'sensitivity' and 'specificity' need two classes.
    confidence: coverage of the intervals.
    resample_seeds: also draw each arm's seeds with replacement in every resample
      (`seed_draws`; arms with as many seeds share the draw), so that the
      intervals cover the seeds' randomness; by default the seeds are averaged.

  Returns:
    {'arms': {name: `bootstrap_intervals`' result}, 'differences': {(a, b):
    `paired_differences`' result}}. Each metric's entry holds 'seed_values': the
    point value of each seed (an arm: fractions; a difference: points, per seed
    index, or None where the arms have different numbers of seeds).
  """
  unknown = [m for m in metrics if m not in ALL_METRICS]
  if unknown:
    raise ValueError(f'Unknown metrics {unknown}; known: {ALL_METRICS}.')
  names = list(arms)
  sets, index = [], {}
  for name in names:
    index[name] = range(len(sets), len(sets) + len(arms[name]))
    sets += list(arms[name])
  units = _Units(sets, level)
  weights = np.concatenate([np.ones((1, len(units.subjects)), np.float32),
                            units.counts(num_samples, seed)])
  values = _scores(units, weights, metrics)
  points = {m: v[:, :1] for m, v in values.items()}
  samples = {m: v[:, 1:] for m, v in values.items()}
  draws = {len(index[name]): seed_draws(len(index[name]), num_samples, seed)
           for name in names} if resample_seeds else {}
  point = {name: _seed_mean(points, index[name]) for name in names}
  sample = {name: _seed_mean(samples, index[name], draws.get(len(index[name])))
            for name in names}
  per_seed = lambda name, metric: [float(v) for v in points[metric][list(index[name]), 0]]
  common = {'level': level, 'num_subjects': int(len(units.subjects)),
            'num_samples': int(num_samples)}
  if resample_seeds:
    common['resample_seeds'] = True
  result = {'arms': {}, 'differences': {}}
  for name in names:
    entry = {**common, 'num_seeds': len(index[name]),
             'num_slices': int(round(np.mean([units.num_slices[i] for i in index[name]])))}
    for metric in metrics:
      low, high = _percentiles(sample[name][metric], confidence)
      entry[metric] = {'value': float(point[name][metric][0]), 'low': low, 'high': high,
                       'seed_values': per_seed(name, metric)}
    result['arms'][name] = entry
  for a, b in pairs:
    entry = {**common, 'num_seeds': [len(index[a]), len(index[b])]}
    for metric in metrics:
      low, high = _percentiles(100 * (sample[a][metric] - sample[b][metric]), confidence)
      seeds = None
      if len(index[a]) == len(index[b]):
        seeds = [100 * (x - y) for x, y in zip(per_seed(a, metric), per_seed(b, metric))]
      entry[metric] = {
          'difference': float(100 * (point[a][metric][0] - point[b][metric][0])),
          'low': low, 'high': high, 'seed_values': seeds}
    result['differences'][a, b] = entry
  return result


def bootstrap_intervals(predictions_by_seed, level='subject', num_samples=2000, seed=0,
                        metrics=METRICS, confidence=CONFIDENCE, resample_seeds=False):
  """Point estimates and percentile intervals of an arm's metrics, over subjects.

  Args:
    predictions_by_seed: the arm's `classification.Predictions`, one per seed
      (each, e.g., the out-of-fold predictions of every subject); only the
      subjects present in all of them are used.
    level: 'slice' (every slice counts) or 'subject' (one prediction per person).
    num_samples: resamples of subjects.
    seed: seeds the resampling.
    metrics: names of ALL_METRICS (see `arm_statistics`).
    confidence: coverage of the interval.
    resample_seeds: also resample the seeds (see `arm_statistics`).

  Returns:
    {metric: {'value', 'low', 'high', 'seed_values'}} as fractions (0 to 1):
    'value' the mean over seeds of the metric on all subjects, ('low', 'high')
    the percentile interval of the resamples' seed means, 'seed_values' each
    seed's value; plus 'num_subjects', 'num_slices' (per seed), 'num_seeds',
    'num_samples', 'level' (and 'resample_seeds' when set).
  """
  return arm_statistics({'arm': list(predictions_by_seed)}, (), level, num_samples, seed,
                        metrics, confidence, resample_seeds)['arms']['arm']


def bootstrap_interval(predictions_by_seed, metric='balanced_accuracy', level='subject',
                       num_samples=2000, seed=0, confidence=CONFIDENCE, resample_seeds=False):
  """{'value', 'low', 'high', 'seed_values'} of one metric (see `bootstrap_intervals`)."""
  return bootstrap_intervals(predictions_by_seed, level, num_samples, seed, (metric,),
                             confidence, resample_seeds)[metric]


def paired_differences(a_by_seed, b_by_seed, level='subject', num_samples=2000, seed=0,
                       metrics=METRICS, confidence=CONFIDENCE, resample_seeds=False):
  """Arm a minus arm b, in points, with percentile intervals over the same resamples.

  Both arms are scored on the same resampled subjects (the subjects present in
  every prediction set of both); each arm's statistic is the mean over its seeds
  (give both the same seeds to pair the labeled subsets too; with
  `resample_seeds`, the same draw of seed indices for both).

  Returns:
    {metric: {'difference', 'low', 'high', 'seed_values'}} in percentage points
    (100 x the difference of fractions); 'difference' on all subjects,
    'seed_values' per seed index; plus 'num_subjects', 'num_seeds' (a, b),
    'num_samples', 'level'.
  """
  arms = {'a': list(a_by_seed), 'b': list(b_by_seed)}
  return arm_statistics(arms, [('a', 'b')], level, num_samples, seed, metrics,
                        confidence, resample_seeds)['differences']['a', 'b']


def paired_difference(a_by_seed, b_by_seed, metric='balanced_accuracy', level='subject',
                      num_samples=2000, seed=0, confidence=CONFIDENCE, resample_seeds=False):
  """{'difference', 'low', 'high', 'seed_values'} of one metric, in points."""
  return paired_differences(a_by_seed, b_by_seed, level, num_samples, seed, (metric,),
                            confidence, resample_seeds)[metric]


# ----------------------------------------------------------------------------- verdicts


def outcome(difference):
  """'ahead' (interval above 0), 'behind' (below 0) or 'no difference detectable'."""
  if difference['low'] > 0:
    return 'ahead'
  if difference['high'] < 0:
    return 'behind'
  return 'no difference detectable'


def _direction(difference, lower_is_better):
  """'ahead', 'behind' or None: whether a's interval excludes 0, and on which side."""
  result = outcome(difference)
  if result == 'no difference detectable':
    return None
  if lower_is_better:
    return 'behind' if result == 'ahead' else 'ahead'
  return result


def _within(difference, margin):
  """Whether the whole interval lies inside [-margin, +margin] (bounds included)."""
  if margin is None or not np.isfinite(margin) or margin < 0:
    raise ValueError(f'The equivalence margin must be a finite number >= 0, not {margin!r}.')
  return -margin <= difference['low'] and difference['high'] <= margin


def equivalence_outcome(difference, margin, lower_is_better=False):
  """'ahead', 'behind', 'equivalent' or 'inconclusive': a - b against 0 and a margin.

  'ahead': the interval lies above 0 (a is better); 'behind': below 0;
  'equivalent': neither, and the whole interval lies inside [-margin, +margin]
  (bounds included); 'inconclusive': neither, and the interval reaches past the
  margin (a difference that matters is not excluded). An interval above 0 and
  inside the margin is 'ahead' (`verdict` adds that it is within the margin).
  With a 95 % interval the equivalence test is two one-sided tests at 2.5 %.

  Args:
    difference: {'low', 'high'} in points (`paired_difference`).
    margin: the largest difference, in points, that does not matter (>= 0).
    lower_is_better: for LOWER_IS_BETTER metrics: 'ahead' means the interval
      lies below 0 (a's Brier score or ECE is lower).
  """
  within = _within(difference, margin)
  direction = _direction(difference, lower_is_better)
  if direction:
    return direction
  return 'equivalent' if within else 'inconclusive'


def verdict(difference, a='SimCLR', b='the baseline', what='balanced accuracy', margin=None,
            lower_is_better=False):
  """One sentence on a - b that follows the 95 % interval, not the point estimate.

  Without a margin: ahead, behind, or no difference detectable (`outcome`). With
  a margin, one of `equivalence_outcome`'s four: "a is ahead of b by +x points
  ...", "a is behind b ...", "a and b are equivalent within ±m points ...", or
  "a vs b, inconclusive: differences from l to h points ... are not excluded".

  Args:
    difference: {'difference', 'low', 'high'} in points (`paired_difference`).
    a, b: names of the two arms.
    what: the metric, in words.
    margin: optional equivalence margin in points (>= 0).
    lower_is_better: the metric is one of LOWER_IS_BETTER (ahead: a lower).
  """
  d, low, high = difference['difference'], difference['low'], difference['high']
  interval = f'[{low:+.1f}, {high:+.1f}]'
  direction = (_direction(difference, lower_is_better) if margin is None
               else equivalence_outcome(difference, margin, lower_is_better))
  better = 'lower is better; ' if lower_is_better else ''
  if direction in ('ahead', 'behind'):
    relation = 'ahead of' if direction == 'ahead' else 'behind'
    sentence = (f'{a} is {relation} {b} by {d:+.1f} points of {what} ({better}95 % interval '
                f'{interval})')
    if margin is not None and _within(difference, margin):
      sentence += f', a difference within the equivalence margin of ±{margin:.1f} points'
    return sentence + '.'
  if margin is None:
    return (f'{a} vs {b}: no difference detectable at this sample size: the interval is '
            f'{interval} points of {what} (point estimate {d:+.1f}).')
  if direction == 'equivalent':
    return (f'{a} and {b} are equivalent within ±{margin:.1f} points of {what} (95 % '
            f'interval {interval} lies inside; point estimate {d:+.1f}).')
  return (f'{a} vs {b}, inconclusive: differences from {low:+.1f} to {high:+.1f} points of '
          f'{what} are not excluded (point estimate {d:+.1f}; equivalence margin '
          f'±{margin:.1f}).')
