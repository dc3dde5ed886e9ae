"""Leakage audit: near-duplicate slices across splits, the 1-NN floor, subjects.

Neighbouring axial slices of one person are near-identical. A split by slice
puts such near-twins on both sides, and a nearest-neighbour lookup on raw
pixels then "classifies" the test set without learning anything. The audit
measures this on the pixels (area-downsampled, compared by correlation):

1. Threshold. A near-duplicate is a pair at least `threshold` similar. With
   subject ids, the threshold is calibrated: each image's most similar other
   slice of its own subject (positives) against its most similar slice of any
   other subject (negatives), picking the threshold of best balanced accuracy.
   Without ids, `config.audit.default_threshold` is used.
2. Subject grouping. Chains of mutual near-duplicates are grouped
   (`neighbours.group_near_duplicates`). Without ids the groups stand in for
   subjects; with ids their agreement with the ids (adjusted Rand index,
   pairwise precision and recall) validates both the grouping and the ids.
3. Per split scheme (`slice`, `subject`, and, with ids, `subject` over the
   recovered groups): test images with a near-twin among the images a model
   trains or is selected on (train + val), the raw-pixel 1-NN accuracy of the
   test set from train + val (the floor a model must beat), per class.

Writes `audit.json` and `audit_pairs.png` (the closest cross-split pairs) to
the workdir.
"""

import dataclasses
import os
import tempfile
import time

from absl import logging
from clu import periodic_actions
import numpy as np

from simclr_jax import checks
from simclr_jax import config_fields as fields
from simclr_jax import errors
from simclr_jax.data import arrays as arrays_lib
from simclr_jax.metrics import neighbours
from simclr_jax import plots
from simclr_jax.train import workdirs
from simclr_jax.data import splits as splits_lib
from simclr_jax.metrics import classification

REFERENCE_SPLITS = ('train', 'val')  # What a model sees: trained or selected on.
# Larger feature matrices are spilled to a memory-mapped file in the workdir (a
# local temporary directory when the workdir is a URL: a memmap needs a local file).
FEATURES_IN_MEMORY_BYTES = 2 << 30


class RowSubset:
  """Rows `index` of `array`, read block by block so a memmap stays on disk."""

  def __init__(self, array, index):
    self.array, self.index = array, np.asarray(index)

  def __len__(self):
    return len(self.index)

  def __getitem__(self, rows):
    return self.array[self.index[rows]]


def check_config(config):
  """An audit config: input and split fields, then the audit's own."""
  checks.check_mode(config, ('audit',))
  fields.seeds(config, 'seed')
  checks.check_input_fields(config, 1)
  checks.check_split_fields(config)
  fields.choice(config, 'audit.metric', neighbours.METRICS)
  for name in ('audit.threshold', 'audit.default_threshold', 'audit.grouping_threshold'):
    value = fields.get(config, name)
    if value is not fields.MISSING and value is not None and not (
        fields.is_real(value) and -1.0 < value <= 1.0):
      raise errors.UserError(
          f'--config.{name}={value} is outside (-1, 1], the range of a '
          f'{config.audit.metric} similarity; set a value such as 0.98.')
  for name in ('audit.image_size', 'audit.chunk_size', 'audit.grouping_k'):
    fields.integer(config, name, example={'audit.image_size': 64, 'audit.chunk_size': 1024,
                   'audit.grouping_k': 10}[name])
  fields.integer(config, 'audit.num_pairs_shown', low=0, example=6)
  fields.integer(config, 'audit.grouping_max_size', low=2, example=64, optional=True)


def progress_logger(name, total):
  """A callback(done, total) that logs rate and ETA with clu's ReportProgress."""
  report = periodic_actions.ReportProgress(num_train_steps=total,
                                           every_secs=10.0)
  report(0)
  logging.info('%s: %d images.', name, total)

  def callback(done, _):
    report(done)
  return callback


def calibrate_threshold(positives, negatives):
  """The similarity threshold that best separates positives from negatives.

  Args:
    positives: similarities of pairs that should count as near-duplicates.
    negatives: similarities of pairs that should not.

  Returns:
    (threshold, balanced accuracy of `similarity >= threshold`), the threshold
    half-way between the best cut's value and the next lower observed value.
  """
  positives = np.sort(np.asarray(positives, np.float64))
  negatives = np.sort(np.asarray(negatives, np.float64))
  candidates = np.unique(np.concatenate([positives, negatives]))
  true_positive_rate = 1 - np.searchsorted(positives, candidates,
                                           'left') / len(positives)
  true_negative_rate = np.searchsorted(negatives, candidates,
                                       'left') / len(negatives)
  balanced = (true_positive_rate + true_negative_rate) / 2
  best = int(np.argmax(balanced))
  lower = candidates[best - 1] if best > 0 else candidates[best] - 1e-3
  threshold = float(np.clip((candidates[best] + lower) / 2, -1 + 1e-6, 1.0))
  return threshold, float(balanced[best])


def _quantiles(values):
  values = np.asarray(values)
  if not len(values):
    return {}
  qs = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
  return {f'q{round(q * 100):02d}': float(v)
          for q, v in zip(qs, np.quantile(values, qs))}


def _threshold_report(config, arrays, features, all_indices, all_similarities,
                      has_ids):
  """Chooses the near-duplicate threshold: configured, calibrated or default."""
  if config.audit.threshold is not None:
    return dict(value=float(config.audit.threshold), source='config')
  if not has_ids or len(np.unique(arrays.subject_ids)) < 2:
    logging.warning(
        'No subject ids to calibrate the near-duplicate threshold on; using '
        'config.audit.default_threshold=%s.', config.audit.default_threshold)
    return dict(value=float(config.audit.default_threshold), source='default')
  subjects = arrays.subject_ids
  # Positives: each image's most similar slice of its own subject among its
  # nearest neighbours (almost always the neighbouring slice).
  same = (subjects[all_indices] == subjects[:, None]) & (all_indices >= 0)
  has_same = same.any(axis=1)
  first_same = same.argmax(axis=1)
  positives = all_similarities[has_same, first_same[has_same]]
  # Negatives: each image's most similar slice of any other subject.
  _, other = neighbours.nearest_neighbours(
      features, features, k=1, metric=config.audit.metric,
      query_groups=subjects, key_groups=subjects,
      chunk_size=config.audit.chunk_size,
      progress=progress_logger('Nearest other-subject slices', len(features)))
  negatives = other[:, 0][np.isfinite(other[:, 0])]
  if not len(positives) or not len(negatives):
    logging.warning('Too few subjects to calibrate; using the default '
                    'threshold %s.', config.audit.default_threshold)
    return dict(value=float(config.audit.default_threshold), source='default')
  value, balanced_accuracy = calibrate_threshold(positives, negatives)
  logging.info('Calibrated near-duplicate threshold %.4f (balanced accuracy '
               '%.3f on %d same-subject vs %d other-subject nearest pairs).',
               value, balanced_accuracy, len(positives), len(negatives))
  return dict(
      value=value, source='calibrated',
      balanced_accuracy=balanced_accuracy,
      num_positive_pairs=int(len(positives)),
      num_negative_pairs=int(len(negatives)),
      positive_quantiles=_quantiles(positives),
      negative_quantiles=_quantiles(negatives),
      rule=('positives: most similar slice of the same subject among the '
            f'{all_indices.shape[1]} nearest; negatives: most similar slice of '
            'another subject; threshold of best balanced accuracy.'))


def _grouping_report(groups, arrays, has_ids, threshold, config):
  sizes = np.bincount(groups)
  labels_per_group = np.zeros((len(sizes), len(arrays.class_names)), np.int64)
  np.add.at(labels_per_group, (groups, arrays.labels), 1)
  report = dict(
      threshold=float(threshold), k=int(config.audit.grouping_k),
      max_group_size=config.audit.grouping_max_size,
      num_groups=int(len(sizes)),
      group_size=dict(min=int(sizes.min()), median=float(np.median(sizes)),
                      mean=float(sizes.mean()), max=int(sizes.max())),
      groups_of_size={int(s): int(c) for s, c in
                      zip(*np.unique(sizes, return_counts=True))},
      largest_group_share=float(sizes.max() / len(groups)),
      groups_with_several_classes=int(((labels_per_group > 0).sum(1) > 1).sum()),
  )
  if has_ids:
    agreement = neighbours.pair_agreement(arrays.subject_ids, groups)
    report['agreement_with_subject_ids'] = agreement
    logging.info('Recovered %d groups; agreement with the subject ids: %s.',
                 len(sizes), agreement)
  else:
    logging.info('Recovered %d subject groups (sizes %d to %d) from '
                 'near-duplicates.', len(sizes), sizes.min(), sizes.max())
  if len(groups) >= 20 and sizes.max() > 0.5 * len(groups):
    logging.warning(
        'One recovered group holds %d of %d images; raise '
        'config.audit.grouping_threshold or set config.audit.grouping_max_size.',
        sizes.max(), len(groups))
  return report


def _scheme_report(scheme_name, arrays, features, splits, threshold, config,
                   all_indices, all_similarities, has_ids):
  """Near-twins across the split and the raw-pixel 1-NN floor of one scheme."""
  test = splits['test']
  reference = np.concatenate([splits[name] for name in REFERENCE_SPLITS])
  class_names = arrays.class_names
  report = dict(reference_splits='+'.join(REFERENCE_SPLITS),
                num_reference=int(len(reference)), num_test=int(len(test)))
  # Near-duplicate pairs among each image's nearest neighbours, by splits.
  split_of = np.full(len(arrays), '', object)
  for name, rows in splits.items():
    split_of[rows] = name
  rows = np.repeat(np.arange(len(arrays)), all_indices.shape[1])
  cols = all_indices.reshape(-1)
  close = (cols >= 0) & (all_similarities.reshape(-1) >= threshold)
  pairs = {tuple(sorted(p)) for p in zip(rows[close], cols[close])}
  counts = {}
  for i, j in pairs:
    key = '-'.join(sorted((split_of[i], split_of[j])))
    counts[key] = counts.get(key, 0) + 1
  report['near_duplicate_pairs_by_split'] = dict(sorted(counts.items()))
  if not len(test) or not len(reference):
    logging.warning('Scheme %s has an empty test or train split; skipped.',
                    scheme_name)
    report['closest_pairs'] = []
    return report, []

  nearest, similarity = neighbours.nearest_neighbours(
      RowSubset(features, test), RowSubset(features, reference), k=1,
      metric=config.audit.metric,
      chunk_size=config.audit.chunk_size,
      progress=progress_logger(f'{scheme_name} split: test vs train+val',
                               len(test)))
  nearest = reference[nearest[:, 0]]
  similarity = similarity[:, 0]
  twin = similarity >= threshold
  labels = arrays.labels
  predictions = labels[nearest]
  metrics = classification.classification_metrics(labels[test], predictions,
                                            len(class_names))
  majority = np.bincount(labels[reference], minlength=len(class_names)).argmax()
  report.update(
      test_with_near_twin=int(twin.sum()),
      test_with_near_twin_fraction=float(twin.mean()),
      one_nn_accuracy=metrics['accuracy'],
      one_nn_balanced_accuracy=metrics['balanced_accuracy'],
      one_nn_macro_f1=metrics['macro_f1'],
      one_nn_confusion_matrix=metrics['confusion_matrix'],
      majority_class_accuracy=float(np.mean(labels[test] == majority)),
  )
  shares = None
  if has_ids:
    shares = arrays.subject_ids[nearest] == arrays.subject_ids[test]
    report['nearest_train_shares_subject'] = float(shares.mean())
  per_class = {}
  for label, name in enumerate(class_names):
    members = labels[test] == label
    entry = dict(num_test=int(members.sum()))
    if members.any():
      entry.update(
          test_with_near_twin=int(twin[members].sum()),
          test_with_near_twin_fraction=float(twin[members].mean()),
          one_nn_recall=float(np.mean(predictions[members] == label)))
      if shares is not None:
        entry['nearest_train_shares_subject'] = float(shares[members].mean())
    per_class[name] = entry
  report['per_class'] = per_class
  logging.info(
      '%s split: %d/%d test images have a near-twin in train+val; raw-pixel '
      '1-NN accuracy %.3f, balanced accuracy %.3f.', scheme_name, twin.sum(),
      len(test), metrics['accuracy'], metrics['balanced_accuracy'])

  closest = np.argsort(-similarity, kind='stable')[:config.audit.num_pairs_shown]
  report['closest_pairs'] = [
      dict(test_file=str(arrays.file_names[test[i]]),
           train_file=str(arrays.file_names[nearest[i]]),
           similarity=float(similarity[i]))
      for i in closest]
  shown = [
      dict(test_image=arrays.images[test[i]],
           reference_image=arrays.images[nearest[i]],
           similarity=float(similarity[i]),
           test_name=str(arrays.file_names[test[i]]),
           reference_name=str(arrays.file_names[nearest[i]]),
           same_subject=None if shares is None else bool(shares[i]))
      for i in closest]
  return report, shown


def main(config, workdir):
  """Runs the leakage audit and writes audit.json and audit_pairs.png.

  Args:
    config: the audit config (configs/audit.py): data set fields of the
      default config, split fields (split_seed, test_fraction, val_fraction)
      and the audit_* and grouping_* fields.
    workdir: output directory.

  Returns:
    The audit report (the content of audit.json).

  Raises:
    ValueError: for settings out of range or a data set of fewer than 2 images.
  """
  start = time.time()
  arrays = arrays_lib.load_arrays(config)
  if len(arrays) < 2:
    raise errors.UserError(f'The audit needs at least 2 images to compare; '
                     f'{config.data.name} has {len(arrays)}.')
  has_ids = bool(np.all(arrays.subject_ids >= 0))

  size = config.audit.image_size or arrays.images.shape[1]
  shape = (len(arrays), size * size * arrays.images.shape[-1])
  spill = np.prod(shape) * 4 > FEATURES_IN_MEMORY_BYTES
  spill_dir = None
  if spill:
    spill_dir = (tempfile.mkdtemp(prefix='simclr_jax_audit_') if workdirs.is_url(workdir)
                 else workdirs.workdir_path(workdir))
    os.makedirs(spill_dir, exist_ok=True)
  features_path = os.path.join(spill_dir or '', f'features.{os.getpid()}.tmp')
  if spill:
    logging.info('Features of %s bytes go to %s.', np.prod(shape) * 4,
                 features_path)
  features = neighbours.pixel_features(
      arrays.images, size, chunk_size=config.audit.chunk_size,
      out=np.memmap(features_path, np.float32, 'w+', shape=shape)
      if spill else None)
  k = min(config.audit.grouping_k, len(arrays) - 1)
  all_indices, all_similarities = neighbours.nearest_neighbours(
      features, features, k=k, metric=config.audit.metric, exclude_self=True,
      chunk_size=config.audit.chunk_size,
      progress=progress_logger('Nearest neighbours of every image',
                               len(features)))
  threshold = _threshold_report(config, arrays, features, all_indices,
                                all_similarities, has_ids)
  grouping_threshold = (threshold['value'] if config.audit.grouping_threshold is None
                        else config.audit.grouping_threshold)
  groups = neighbours.groups_from_neighbours(
      all_indices, all_similarities, grouping_threshold,
      max_group_size=config.audit.grouping_max_size)

  report = dict(
      dataset=config.data.name, num_images=int(len(arrays)),
      class_names=list(arrays.class_names),
      images_per_class=np.bincount(
          arrays.labels, minlength=len(arrays.class_names)).tolist(),
      metric=config.audit.metric,
      image_size=int(size),
      subject_ids='given' if has_ids else 'recovered',
      threshold=threshold,
      grouping=_grouping_report(groups, arrays, has_ids, grouping_threshold,
                                config),
  )
  nearest_similarity = all_similarities[:, 0]
  report['nearest_neighbour_similarity'] = _quantiles(nearest_similarity)
  report['images_with_near_duplicate'] = int(
      (nearest_similarity >= threshold['value']).sum())
  if has_ids:
    shares = arrays.subject_ids[all_indices[:, 0]] == arrays.subject_ids
    report['nearest_neighbour_shares_subject'] = dict(
        overall=float(shares.mean()),
        per_class={name: float(shares[arrays.labels == label].mean())
                   for label, name in enumerate(arrays.class_names)
                   if np.any(arrays.labels == label)})
    logging.info('Nearest neighbour shares the subject for %.1f%% of images.',
                 100 * shares.mean())

  # The subject scheme needs ids: recovered groups stand in where there are
  # none; with ids, a split over the recovered groups checks the ids.
  schemes = {'slice': arrays}
  if has_ids:
    schemes['subject'] = arrays
    schemes['recovered_group'] = dataclasses.replace(arrays,
                                                     subject_ids=groups)
  else:
    schemes['subject'] = dataclasses.replace(arrays, subject_ids=groups)
  report['schemes'] = {}
  shown = {}
  for scheme_name, scheme_arrays in schemes.items():
    splits = splits_lib.load_splits(config, scheme_arrays,
                                    scheme='slice' if scheme_name == 'slice' else 'subject')
    report['schemes'][scheme_name], shown[scheme_name] = _scheme_report(
        scheme_name, arrays, features, splits, threshold['value'], config,
        all_indices, all_similarities, has_ids)
  report['seconds'] = round(time.time() - start, 1)
  if spill:
    del features
    os.remove(features_path)
    if workdirs.is_url(workdir):
      os.rmdir(spill_dir)

  workdirs.write_json(workdirs.output_path(workdir, 'audit.json'), report)
  plots.plot_audit_pairs(
      {name: pairs for name, pairs in shown.items() if pairs},
      workdirs.output_path(workdir, 'audit_pairs.png'),
      title=(f'{config.data.name}: closest test images to train+val by '
             f'{config.audit.metric} of {report["image_size"]} px pixels'))
  logging.info('Wrote %s/audit.json and audit_pairs.png in %.0f s.', workdir,
               time.time() - start)
  return report
