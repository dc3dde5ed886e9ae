"""The label-fraction study: SimCLR fine-tuning vs a supervised baseline vs a raw-pixel floor.

For each protocol (`config.protocols`) the sweep pretrains SimCLR once, then, at
each label fraction and seed, fine-tunes the pretrained encoder (`finetune`, the
"SimCLR" arm) and trains the same classifier from scratch (`baseline`), both on
the same labeled subset. A third arm needs no training: 1-nearest-neighbour on
raw pixels (correlation) from the same labeled subset (`floor`), the score a
learned model must clear. Protocols:

- `honest`: the subject split (no person on both sides), model selection on the
  validation subjects, pretraining on train + val only (test images unseen).
- `reference`: the reference study's choices: the slice split, pretraining on
  every image including test, the checkpoint with the best TEST accuracy kept.

Seeds. Seed s sets the labeled subset (`label_seed`), the data order and the
initialisation (`seed`) of both arms together, so the spread over seeds covers
all three. Each protocol pretrains once, from its first seed's initialisation;
at that seed both arms start from the same random encoder. At other seeds the
baseline starts from the initialisation of seed s, a fresh draw from the same
distribution, and the fine-tuned arm's head too (`train.py` ties init and data
order to one seed). Fractions above `multi_seed_max_fraction` run with the first
seed only, to bound the cost: the spread matters most where labels are few.

Layout of the workdir:
  <protocol>/pretrain/                       the SimCLR pretraining run
  <protocol>/<arm>_f<fraction>_s<seed>/      one run each (arm: floor, baseline, finetune)
  results.csv, results.md, sweep.json        one row per run; tables; aggregates
  label_fraction_curve.png, confusion_matrices.png, gradcam_grid.png
Each run is a `train.train_and_evaluate` workdir whose config is a function of
the sweep config, so running the same command again skips finished runs (their
`metrics.json` exists) and resumes unfinished ones from their checkpoints.
"""

import csv
import dataclasses
import json
import math
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from simclr_jax import evaluate
from simclr_jax import input_pipeline
from simclr_jax import neighbours
from simclr_jax import plots
from simclr_jax import train

# Fields of a sweep config that its runs do not have.
SWEEP_FIELDS = ('protocols', 'fractions', 'seeds', 'multi_seed_max_fraction',
                'reference_seeds', 'pretrain_num_epochs', 'max_steps_per_run',
                'evals_per_run', 'floor_image_size', 'cam_method', 'cam_layer')
PROTOCOLS = {
    'honest': dict(split_scheme='subject', include_test_in_pretrain=False,
                   selection_split='val'),
    'reference': dict(split_scheme='slice', include_test_in_pretrain=True,
                      selection_split='test', selection_metric='accuracy'),
}
PROTOCOL_DESCRIPTIONS = {
    'honest': 'subject split (no person on both sides), checkpoint chosen on the '
              'validation subjects, test images unseen by pretraining',
    'reference': 'the reference\'s protocol: slice split (neighbouring slices of a '
                 'person on both sides), pretraining on all images including test, '
                 'checkpoint with the best TEST accuracy kept (the pretraining\'s kNN '
                 'monitor too)',
}
ARMS = ('floor', 'baseline', 'finetune')
ARM_NAMES = {'floor': 'raw-pixel 1-NN', 'baseline': 'baseline', 'finetune': 'SimCLR'}
METRICS = ('accuracy', 'balanced_accuracy', 'macro_f1')
METRIC_TITLES = {'accuracy': 'Accuracy', 'balanced_accuracy': 'Balanced accuracy',
                 'macro_f1': 'Macro-F1'}
# Cost of one run beyond its steps (compilation, data loading, evaluation,
# checkpoints), in supervised steps; only used to weigh the ETA.
RUN_OVERHEAD_STEPS = 150
CSV_COLUMNS = ('protocol', 'arm', 'fraction', 'seed', 'num_labeled', 'accuracy',
               'balanced_accuracy', 'macro_f1', 'chosen_step', 'wall_seconds')


@dataclasses.dataclass
class Run:
  """One run of the sweep (a pretraining, a trained arm, or the floor)."""
  protocol: str
  arm: str  # pretrain | floor | baseline | finetune
  fraction: float | None
  seed: int
  workdir: str
  config: ml_collections.ConfigDict | None  # None for the floor (no training).
  num_labeled: int | None
  work: float  # Relative cost, for the ETA.

  @property
  def name(self):
    if self.arm == 'pretrain':
      return f'{self.protocol} pretrain'
    return f'{self.protocol} {self.arm} {percent_label(self.fraction)} seed {self.seed}'

  @property
  def finished(self):
    return os.path.exists(os.path.join(self.workdir, 'metrics.json'))


# ----------------------------------------------------------------------------- config


def check_sweep_config(config):
  """Rejects sweep settings the sweep cannot run, in one sentence naming the fix."""
  unknown = [p for p in config.protocols if p not in PROTOCOLS]
  if unknown or not config.protocols:
    raise ValueError(f'Unknown protocols {unknown or "(none)"}; set --config.protocols to '
                     f'some of {tuple(PROTOCOLS)}, e.g. "(\'honest\',)".')
  if not config.fractions or any(not 0.0 < f <= 1.0 for f in config.fractions):
    raise ValueError(f'Label fractions must be in (0, 1], got {config.fractions}; set '
                     '--config.fractions to e.g. "(0.01, 0.1, 1.0)".')
  if not config.seeds or not config.reference_seeds:
    raise ValueError('The sweep needs at least one seed; set --config.seeds and '
                     '--config.reference_seeds to e.g. "(0,)".')
  if config.max_steps_per_run is not None and config.max_steps_per_run < 1:
    raise ValueError(f'max_steps_per_run={config.max_steps_per_run} must be positive '
                     '(or None for no cap).')
  if config.evals_per_run is not None and config.evals_per_run < 1:
    raise ValueError(f'evals_per_run={config.evals_per_run} must be positive (or None '
                     'to evaluate every eval_every_epochs).')
  if config.pretrain_num_epochs < 1:
    raise ValueError('pretrain_num_epochs must be at least 1; set '
                     '--config.pretrain_num_epochs.')


def protocol_seeds(config, protocol):
  return tuple(config.reference_seeds if protocol == 'reference' else config.seeds)


def fraction_seeds(config, protocol, fraction):
  """Seeds run at `fraction`: all of the protocol's up to multi_seed_max_fraction."""
  seeds = protocol_seeds(config, protocol)
  return seeds if fraction <= config.multi_seed_max_fraction + 1e-9 else seeds[:1]


def supervised_schedule(config, num_labeled):
  """(num_epochs, eval_every_epochs) of a finetune or baseline run.

  The whole number of epochs nearest to `max_steps_per_run` steps (at least one)
  if that is fewer than `num_epochs`, so large fractions get fewer epochs;
  validation runs about `evals_per_run` times.
  """
  per_epoch = input_pipeline.steps_per_epoch(num_labeled, config.batch_size)
  num_epochs = config.num_epochs
  if config.max_steps_per_run is not None:
    num_epochs = max(1, min(num_epochs, round(config.max_steps_per_run / per_epoch)))
  return num_epochs, _eval_every(config, num_epochs)


def _eval_every(config, num_epochs):
  if config.evals_per_run is None:
    return config.eval_every_epochs
  return max(1, num_epochs // config.evals_per_run)


def run_config(config, protocol, mode, *, seed, num_classes, fraction=1.0,
               num_labeled=None, pretrained_workdir=None):
  """The config of one run: the sweep config without its sweep-only fields.

  Args:
    config: the sweep config.
    protocol: a key of PROTOCOLS.
    mode: pretrain | finetune | baseline.
    seed: seed of the label subset, initialisation and data order.
    num_classes: classes of the data set (what train_and_evaluate would set).
    fraction: label fraction (finetune, baseline).
    num_labeled: size of the labeled subset (finetune, baseline).
    pretrained_workdir: the protocol's pretrain workdir (finetune).

  Returns:
    A new ConfigDict, a pure function of the arguments.
  """
  values = config.to_dict()
  for field in SWEEP_FIELDS:
    values.pop(field, None)
  run = ml_collections.ConfigDict(values)
  run.update(PROTOCOLS[protocol])
  run.mode = mode
  run.seed = int(seed)
  run.num_classes = int(num_classes)
  if mode == 'pretrain':
    run.num_epochs = int(config.pretrain_num_epochs)
    run.eval_every_epochs = _eval_every(config, run.num_epochs)
  else:
    run.label_fraction = float(fraction)
    run.label_seed = int(seed)
    run.num_epochs, run.eval_every_epochs = supervised_schedule(config, num_labeled)
  if mode == 'finetune':
    run.pretrained_workdir = pretrained_workdir
  return run


# ----------------------------------------------------------------------------- plan


def plan_runs(config, workdir, arrays):
  """Every run of the sweep in execution order, with its config and cost.

  Per protocol: the floor runs (instant), the pretraining, then baseline and
  finetune side by side, seed by seed, so that an interrupted sweep already
  holds whole curves of the first seed.
  """
  runs = []
  num_classes = len(arrays.class_names)
  for protocol in config.protocols:
    splits = _splits(config, protocol, arrays)
    protocol_dir = os.path.join(workdir, protocol)
    pretrain_dir = os.path.join(protocol_dir, 'pretrain')
    seeds = protocol_seeds(config, protocol)
    plan = [(seed, fraction) for seed in seeds for fraction in config.fractions
            if seed in fraction_seeds(config, protocol, fraction)]
    labeled = {(seed, fraction): len(input_pipeline.label_subset(
        arrays.labels, splits['train'], fraction, seed)) for seed, fraction in plan}
    for seed, fraction in plan:
      runs.append(Run(protocol, 'floor', fraction, seed,
                      os.path.join(protocol_dir, f'floor_f{fraction:g}_s{seed}'), None,
                      labeled[seed, fraction], 0.0))
    pretrain = run_config(config, protocol, 'pretrain', seed=seeds[0],
                          num_classes=num_classes)
    pretrain_images = len(input_pipeline.pretrain_indices(
        splits, pretrain.include_test_in_pretrain))
    steps = pretrain.num_epochs * input_pipeline.steps_per_epoch(
        pretrain_images, config.batch_size)
    # A pretraining step runs two views, twice with SAM.
    cost = 2 * (1 if config.sam == 'none' else 2)
    runs.append(Run(protocol, 'pretrain', None, seeds[0], pretrain_dir, pretrain, None,
                    steps * cost + RUN_OVERHEAD_STEPS))
    for seed, fraction in plan:
      for arm in ('baseline', 'finetune'):
        run = run_config(config, protocol, arm, seed=seed, num_classes=num_classes,
                         fraction=fraction, num_labeled=labeled[seed, fraction],
                         pretrained_workdir=pretrain_dir)
        steps = run.num_epochs * input_pipeline.steps_per_epoch(
            labeled[seed, fraction], config.batch_size)
        cost = 1 if config.finetune_sam == 'none' else 2
        runs.append(Run(protocol, arm, fraction, seed,
                        os.path.join(protocol_dir, f'{arm}_f{fraction:g}_s{seed}'), run,
                        labeled[seed, fraction], steps * cost + RUN_OVERHEAD_STEPS))
  return runs


def _splits(config, protocol, arrays):
  return input_pipeline.make_splits(arrays, PROTOCOLS[protocol]['split_scheme'],
                                    config.split_seed, config.test_fraction,
                                    config.val_fraction)


# ----------------------------------------------------------------------------- runs


def raw_pixel_floor(features, labels, train_idx, test_idx, num_classes):
  """Test metrics of 1-nearest-neighbour on raw pixels (correlation) from `train_idx`."""
  predictions = neighbours.knn_classify(features[train_idx], labels[train_idx],
                                        features[test_idx], k=1, num_classes=num_classes,
                                        metric='correlation')
  return evaluate.classification_metrics(labels[test_idx], predictions, num_classes)


def _run_floor(run, config, arrays, features):
  """Computes and writes one floor run; a finished one with the same settings is kept."""
  path = os.path.join(run.workdir, 'metrics.json')
  settings = {'mode': 'floor', 'metric': 'correlation', 'k': 1,
              'floor_image_size': config.floor_image_size,
              'label_fraction': run.fraction, 'label_seed': run.seed,
              **PROTOCOLS[run.protocol]}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if all(previous.get(k) == v for k, v in settings.items()):
      return False
  splits = _splits(config, run.protocol, arrays)
  train_idx = input_pipeline.label_subset(arrays.labels, splits['train'], run.fraction,
                                          run.seed)
  start = time.time()
  num_classes = len(arrays.class_names)
  result = raw_pixel_floor(features, arrays.labels, train_idx, splits['test'],
                           num_classes)
  result.update(settings)
  result.update({'chosen_step': None, 'num_train_images': int(len(train_idx)),
                 'class_names': list(arrays.class_names),
                 'label_counts': np.bincount(arrays.labels[train_idx],
                                             minlength=num_classes).tolist()})
  if jax.process_index() == 0:
    os.makedirs(run.workdir, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
    _write_wall_seconds(run.workdir, time.time() - start)
  return True


def _run_training(run, counter):
  """Trains one run unless finished; returns whether it ran."""
  train.check_workdir_config(run.config, run.workdir)  # A finished run must match too.
  if run.finished:
    return False
  logging.info('Sweep run %s: %s in %s.', counter, run.name, run.workdir)
  start = time.time()
  train.train_and_evaluate(run.config, run.workdir)
  if jax.process_index() == 0:
    _write_wall_seconds(run.workdir, time.time() - start)
  return True


def _write_wall_seconds(workdir, seconds):
  with open(os.path.join(workdir, 'wall_time.json'), 'w') as f:
    json.dump({'wall_seconds': round(seconds, 2),
               'note': 'seconds of the call that finished the run'}, f)


def _duration(seconds):
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours} h {minutes:02d} min' if hours else f'{minutes} min {seconds:02d} s'


def run_sweep(config, workdir):
  """Runs (or completes) the label-fraction study and writes its reports.

  Args:
    config: a sweep config (configs/sweep.py).
    workdir: where the runs and the reports go.

  Returns:
    The aggregated results (also written to `workdir/sweep.json`).
  """
  check_sweep_config(config)
  start = time.time()
  arrays = input_pipeline.load_arrays(config)
  runs = plan_runs(config, workdir, arrays)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  features = neighbours.pixel_features(arrays.images, config.floor_image_size)
  for run in runs:
    if run.arm == 'floor':
      _run_floor(run, config, arrays, features)
  del features

  trained = [run for run in runs if run.config is not None]
  remaining_work = sum(run.work for run in trained if not run.finished)
  work_done, seconds_training = 0.0, 0.0
  logging.info('Sweep: %d runs to train (%d finished already), %d floor runs, in %s.',
               sum(not run.finished for run in trained),
               sum(run.finished for run in trained), len(runs) - len(trained), workdir)
  for i, run in enumerate(trained, 1):
    run_start = time.time()
    if not _run_training(run, f'{i}/{len(trained)}'):
      continue
    seconds_training += time.time() - run_start
    work_done += run.work
    remaining_work -= run.work
    eta = seconds_training / work_done * remaining_work if work_done else 0.0
    logging.info('Sweep run %d/%d done (%s) in %s; elapsed %s, ETA %s.', i, len(trained),
                 run.name, _duration(time.time() - run_start),
                 _duration(time.time() - start), _duration(eta))
    write_reports(config, workdir, runs, arrays, elapsed=time.time() - start,
                  figures=False)
  summary = write_reports(config, workdir, runs, arrays, elapsed=time.time() - start)
  logging.info('Sweep finished in %s; results in %s.', _duration(time.time() - start),
               os.path.join(workdir, 'results.md'))
  return summary


# ----------------------------------------------------------------------------- reports


def collect_rows(runs):
  """One dict per finished floor, baseline or finetune run (the rows of results.csv)."""
  rows = []
  for run in runs:
    if run.arm == 'pretrain' or not run.finished:
      continue
    with open(os.path.join(run.workdir, 'metrics.json')) as f:
      metrics = json.load(f)
    wall_path = os.path.join(run.workdir, 'wall_time.json')
    wall = None
    if os.path.exists(wall_path):
      with open(wall_path) as f:
        wall = json.load(f)['wall_seconds']
    rows.append({
        'protocol': run.protocol, 'arm': run.arm, 'fraction': run.fraction,
        'seed': run.seed, 'num_labeled': metrics.get('num_train_images', run.num_labeled),
        **{metric: metrics[metric] for metric in METRICS},
        'chosen_step': metrics.get('chosen_step'), 'wall_seconds': wall,
        'confusion_matrix': metrics['confusion_matrix'],
        'class_names': metrics['class_names'],
        'selection_metric': next((v for k, v in metrics.items()
                                  if k.startswith('selection_')), None),
        'workdir': run.workdir,
    })
  return rows


def _stats(values):
  """Mean, sample standard deviation (None for one value) and the values."""
  values = [float(v) for v in values]
  return {'mean': float(np.mean(values)),
          'std': float(np.std(values, ddof=1)) if len(values) > 1 else None,
          'values': values}


def simclr_verdict(baseline, finetune):
  """Did SimCLR beat the baseline in balanced accuracy, relative to the seed spread?

  The spread is the larger of the two arms' standard deviations over seeds.

  Args:
    baseline: balanced accuracies of the baseline, one per seed.
    finetune: balanced accuracies of SimCLR fine-tuning, one per seed.

  Returns:
    {'gain', 'spread' (None for one seed), 'verdict'}: gain and spread in points.
  """
  gain = 100 * (np.mean(finetune) - np.mean(baseline))
  if min(len(baseline), len(finetune)) < 2:
    return {'gain': float(gain), 'spread': None, 'verdict': 'one seed, spread unknown'}
  spread = 100 * max(np.std(baseline, ddof=1), np.std(finetune, ddof=1))
  if gain > spread:
    verdict = 'SimCLR better, above spread'
  elif gain < -spread:
    verdict = 'baseline better, above spread'
  else:
    verdict = 'within spread'
  return {'gain': float(gain), 'spread': float(spread), 'verdict': verdict}


def aggregate(config, rows, arrays):
  """The sweep's aggregates: per protocol and fraction, mean +- std of each arm."""
  summary = {'dataset': config.dataset, 'class_names': list(arrays.class_names),
             'protocols': {}, 'inflation': []}
  for protocol in config.protocols:
    test_labels = arrays.labels[_splits(config, protocol, arrays)['test']]
    counts = np.bincount(test_labels, minlength=len(arrays.class_names))
    fractions = []
    for fraction in config.fractions:
      entry = {'fraction': float(fraction), 'num_labeled': None, 'arms': {}}
      for arm in ARMS:
        arm_rows = [r for r in rows if r['protocol'] == protocol and r['arm'] == arm
                    and math.isclose(r['fraction'], fraction)]
        if not arm_rows:
          continue
        entry['num_labeled'] = int(arm_rows[0]['num_labeled'])
        entry['arms'][arm] = {metric: _stats([r[metric] for r in arm_rows])
                              for metric in METRICS}
        entry['arms'][arm]['seeds'] = [r['seed'] for r in arm_rows]
      if {'baseline', 'finetune'} <= set(entry['arms']):
        entry['simclr_vs_baseline'] = simclr_verdict(
            entry['arms']['baseline']['balanced_accuracy']['values'],
            entry['arms']['finetune']['balanced_accuracy']['values'])
        if 'floor' in entry['arms']:
          floor = entry['arms']['floor']['balanced_accuracy']['mean']
          entry['simclr_vs_baseline']['both_clear_floor'] = bool(all(
              entry['arms'][arm]['balanced_accuracy']['mean'] > floor
              for arm in ('baseline', 'finetune')))
      if entry['arms']:
        fractions.append(entry)
    summary['protocols'][protocol] = {
        'description': PROTOCOL_DESCRIPTIONS[protocol], **PROTOCOLS[protocol],
        'num_test_images': int(len(test_labels)),
        'majority_share': float(counts.max() / max(1, counts.sum())),
        'fractions': fractions}
  if {'honest', 'reference'} <= set(summary['protocols']):
    summary['inflation'] = _inflation(summary['protocols'])
  return summary


def _inflation(protocols):
  """Reference minus honest mean, per fraction, arm and metric (in points)."""
  honest = {e['fraction']: e for e in protocols['honest']['fractions']}
  rows = []
  for entry in protocols['reference']['fractions']:
    if entry['fraction'] not in honest:
      continue
    for arm in ARMS:
      if arm not in entry['arms'] or arm not in honest[entry['fraction']]['arms']:
        continue
      row = {'fraction': entry['fraction'], 'arm': arm}
      for metric in METRICS:
        h = honest[entry['fraction']]['arms'][arm][metric]['mean']
        r = entry['arms'][arm][metric]['mean']
        row[metric] = {'honest': h, 'reference': r, 'inflation': 100 * (r - h)}
      rows.append(row)
  return rows


def _percent(stats):
  if stats is None:
    return '-'
  if stats['std'] is None:
    return f'{100 * stats["mean"]:.1f}'
  return f'{100 * stats["mean"]:.1f} ± {100 * stats["std"]:.1f}'


def percent_label(fraction):
  """'1 %', '10 %', '0.5 %': a label fraction as the reference wrote it."""
  return f'{100 * fraction:g} %'


def _fraction_label(entry):
  return f'{percent_label(entry["fraction"])} ({entry["num_labeled"]:,})'


def _table(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return lines


def verdict_sentence(entry):
  """One plain sentence on SimCLR vs the baseline at one fraction."""
  comparison = entry.get('simclr_vs_baseline')
  if comparison is None:
    return f'{_fraction_label(entry)}: not both arms finished yet.'
  gain, spread = comparison['gain'], comparison['spread']
  who = 'SimCLR beat the baseline' if gain > 0 else 'SimCLR did not beat the baseline'
  text = f'{_fraction_label(entry)}: {who} ({gain:+.1f} pts of balanced accuracy'
  if spread is None:
    text += '; one seed, so no seed-to-seed spread to compare with).'
  elif abs(gain) > spread:
    text += f', more than the seed-to-seed spread of {spread:.1f} pts).'
  else:
    text += f', within the seed-to-seed spread of {spread:.1f} pts: no clear difference).'
  if 'both_clear_floor' in comparison:
    text += (' Both learned arms clear the raw-pixel floor.' if comparison['both_clear_floor']
             else ' Not both learned arms clear the raw-pixel floor.')
  return text


def results_markdown(summary, config):
  """results.md: per protocol, a table per metric, the verdicts, then the inflation."""
  lines = ['# Label-fraction study: SimCLR fine-tuning vs supervised baseline', '',
           f'Data: `{config.dataset}`; model {config.model} (width {config.width:g}, '
           f'{config.encoder_output}), {config.image_size} px, {config.channels} channel(s), '
           f'batch {config.batch_size}; pretraining {config.pretrain_num_epochs} epochs '
           f'(SAM: {config.sam}, rho {config.sam_rho:g}); fine-tuning and baseline up to '
           f'{config.num_epochs} epochs'
           + (f', capped at about {config.max_steps_per_run} steps per run'
              if config.max_steps_per_run else '') + '.',
           'Cells: test scores in %, mean ± sample standard deviation over seeds '
           '(no ± where one seed ran). Raw-pixel 1-NN: 1-nearest-neighbour by '
           'correlation of the pixels (area-downsampled to '
           f'{config.floor_image_size or "the stored"} px), from the same labeled '
           'images, no training.', '']
  wall = summary.get('wall_seconds')
  if wall:
    lines += [f'Wall time: {_duration(wall["runs_total"])} summed over the runs '
              f'({_duration(wall["pretraining"])} of it pretraining); the last invocation '
              f'of the sweep took {_duration(wall["last_invocation"] or 0.0)}.', '']
  for protocol, result in summary['protocols'].items():
    lines += [f'## Protocol `{protocol}`', '', f'{result["description"][0].upper()}'
              f'{result["description"][1:]}. Test split: {result["num_test_images"]:,} '
              f'images; always answering the majority class scores '
              f'{100 * result["majority_share"]:.1f} % accuracy and '
              f'{100 / len(summary["class_names"]):.1f} % balanced accuracy.', '']
    for metric in METRICS:
      lines += [f'### {METRIC_TITLES[metric]} (%)', '']
      rows = []
      for entry in result['fractions']:
        seeds = max(len(entry['arms'][a]['seeds']) for a in entry['arms'])
        rows.append([_fraction_label(entry)] + [
            _percent(entry['arms'].get(arm, {}).get(metric)) for arm in ARMS] + [str(seeds)])
      lines += _table(['labeled data'] + [ARM_NAMES[a] for a in ARMS] + ['seeds'], rows)
      lines.append('')
    lines += ['### Did SimCLR beat the baseline? (balanced accuracy)', '']
    rows = []
    for entry in result['fractions']:
      comparison = entry.get('simclr_vs_baseline')
      if comparison is None:
        continue
      spread = comparison['spread']
      floor = comparison.get('both_clear_floor')
      rows.append([_fraction_label(entry), f'{comparison["gain"]:+.1f}',
                   '-' if spread is None else f'{spread:.1f}', comparison['verdict'],
                   '-' if floor is None else ('yes' if floor else 'no')])
    lines += _table(['labeled data', 'SimCLR − baseline (pts)', 'seed spread (pts)',
                     'verdict', 'both arms above the floor'], rows)
    lines += ['', 'Spread: the larger of the two arms\' standard deviations over seeds.', '']
    lines += [f'- {verdict_sentence(entry)}' for entry in result['fractions']]
    lines.append('')
  if summary['inflation']:
    lines += ['## Honest vs reference protocol: how much the reference\'s choices inflate '
              'the scores', '',
              'Mean test score under each protocol and the difference (reference − '
              'honest, in points): this project\'s estimate of what the reference\'s '
              'numbers owe to its slice split, transductive pretraining and test-set '
              'selection.', '']
    rows = []
    for row in summary['inflation']:
      cells = [percent_label(row['fraction']), ARM_NAMES[row['arm']]]
      for metric in ('accuracy', 'balanced_accuracy'):
        m = row[metric]
        cells += [f'{100 * m["honest"]:.1f}', f'{100 * m["reference"]:.1f}',
                  f'{m["inflation"]:+.1f}']
      rows.append(cells)
    lines += _table(['labeled', 'arm', 'accuracy honest', 'accuracy reference',
                     'inflation (pts)', 'bal. acc. honest', 'bal. acc. reference',
                     'inflation (pts)'], rows)
    lines.append('')
  return '\n'.join(lines)


def write_results_csv(rows, path):
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ('' if row[k] is None else row[k]) for k in CSV_COLUMNS})


def write_reports(config, workdir, runs, arrays, elapsed=None, figures=True):
  """Writes results.csv, results.md, sweep.json and (with figures) the three PNGs.

  Reports cover the finished runs, so they can be written mid-sweep.
  """
  rows = collect_rows(runs)
  summary = aggregate(config, rows, arrays)
  walls = [r['wall_seconds'] for r in rows if r['wall_seconds'] is not None]
  pretrain_walls = []
  for run in runs:
    path = os.path.join(run.workdir, 'wall_time.json')
    if run.arm == 'pretrain' and os.path.exists(path):
      with open(path) as f:
        pretrain_walls.append(json.load(f)['wall_seconds'])
  summary['wall_seconds'] = {'runs_total': float(sum(walls) + sum(pretrain_walls)),
                             'pretraining': float(sum(pretrain_walls)),
                             'last_invocation': elapsed}
  summary['num_runs'] = {'finished': len(rows) + len(pretrain_walls), 'planned': len(runs)}
  if jax.process_index() != 0:
    return summary
  write_results_csv(rows, os.path.join(workdir, 'results.csv'))
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(results_markdown(summary, config))
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  if figures and rows:
    plots.plot_label_fraction_curves(
        summary, os.path.join(workdir, 'label_fraction_curve.png'))
    write_confusion_matrices(config, rows, os.path.join(workdir, 'confusion_matrices.png'))
    write_gradcam_grid(config, rows, arrays, os.path.join(workdir, 'gradcam_grid.png'))
  return summary


def write_confusion_matrices(config, rows, path):
  """The grid of test confusion matrices: fractions x arms, first protocol and seed."""
  protocol = config.protocols[0]
  seed = protocol_seeds(config, protocol)[0]
  cells = {}
  for r in rows:
    if r['protocol'] == protocol and r['seed'] == seed:
      title = (f'{ARM_NAMES[r["arm"]]}, {percent_label(r["fraction"])} ({r["num_labeled"]:,})\n'
               f'acc {100 * r["accuracy"]:.1f} %, bal. acc '
               f'{100 * r["balanced_accuracy"]:.1f} %')
      cells[r['fraction'], r['arm']] = (r['confusion_matrix'], title)
  fractions = [f for f in config.fractions if any((f, a) in cells for a in ARMS)]
  arms = [a for a in ARMS if any((f, a) in cells for f in fractions)]
  class_names = next(r['class_names'] for r in rows)
  grid = [[cells.get((f, a)) for a in arms] for f in fractions]
  plots.plot_confusion_grid(grid, class_names, path,
                            title=f'Test confusion matrices, protocol {protocol}, '
                                  f'seed {seed} (rows: labeled fraction)')


def write_gradcam_grid(config, rows, arrays, path):
  """Grad-CAM of one test image per class, from the best SimCLR run at the largest fraction.

  The run is the first protocol's SimCLR (finetune) run at its largest fraction with
  the best selection-split score (never chosen on test unless the protocol does).
  Each class's image is drawn at random (seeded) from its test images.
  """
  from simclr_jax import gradcam  # pylint: disable=g-import-not-at-top
  from simclr_jax import predict  # pylint: disable=g-import-not-at-top
  protocol = config.protocols[0]
  candidates = [r for r in rows if r['protocol'] == protocol and r['arm'] == 'finetune']
  if not candidates:
    return None
  largest = max(r['fraction'] for r in candidates)
  candidates = [r for r in candidates if r['fraction'] == largest]
  best = max(candidates, key=lambda r: (r['selection_metric'] or 0.0, -r['seed']))
  run_config_, model, variables = train.restore_for_inference(best['workdir'])
  test_idx = _splits(config, protocol, arrays)['test']
  rng = np.random.default_rng(0)
  chosen = []
  for label in range(len(arrays.class_names)):
    members = test_idx[arrays.labels[test_idx] == label]
    if len(members):
      chosen.append(int(rng.choice(members)))
  chosen = np.asarray(chosen)
  heatmaps, logits = gradcam.cam(
      model, variables, input_pipeline.preprocess(arrays.images[chosen], run_config_),
      config.cam_method, config.cam_layer)
  probabilities = np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), -1))
  predicted = probabilities.argmax(-1)
  titles = [f'true {plots.class_label(arrays.class_names[arrays.labels[i]])}\n'
            f'predicted {plots.class_label(arrays.class_names[k])}\n'
            f'p = {probabilities[n, k]:.2f}'
            for n, (i, k) in enumerate(zip(chosen, predicted))]
  # The stored images (not the downsized model inputs) under the upsampled heatmaps.
  return plots.plot_cam_grid(
      list(arrays.images[chosen][..., 0]), list(np.asarray(heatmaps)), titles, path,
      title=f'SimCLR fine-tuned on {percent_label(largest)} of the labels, protocol '
            f'{protocol}, seed {best["seed"]}\n(one random test image per class; '
            f'heatmap of the predicted class)',
      cam_name=f'{predict.CAM_NAMES[config.cam_method]} ({config.cam_layer})')
