"""Sweep mode: runs the label-budget study that `plan.py` plans.

For each protocol the runs go in plan order: the raw-pixel floor arm (no
training: 1-nearest-neighbour on pixels from the same labeled subset), the SimCLR
pretraining, then the baseline and fine-tuning runs side by side, seed by seed.
With `sweep.group_runs` > 1 the runs of one cell (every fold's baseline and
finetune runs of a task, seed and budget; a protocol's pretrainings) train
together in one compiled program (`plan.training_groups`, `groups.train_group`),
each still in its own workdir. Each trained run is a `trainer.train_and_evaluate`
workdir; running the same
command again skips finished runs (their `metrics.json` exists, with the same
config) and resumes unfinished ones from their checkpoints. After every run the
reports (`report.py`) are rewritten from the finished runs, with predictions.npz,
from which `recompute.py` rebuilds them.
"""

import json
import time

from absl import logging
import jax
import numpy as np

from simclr_jax import checks
from simclr_jax import config_fields as fields
from simclr_jax import errors
from simclr_jax.data import arrays as arrays_lib
from simclr_jax.metrics import bootstrap
from simclr_jax.metrics import neighbours
from simclr_jax.train import workdirs
from simclr_jax.data import splits as splits_lib
from simclr_jax.study import plan as plan_lib
from simclr_jax.study import report as report_lib
from simclr_jax.study import results as results_lib
from simclr_jax.study import verdicts
from simclr_jax.train import compile_cache
from simclr_jax.train import groups as groups_lib
from simclr_jax.train import trainer
from simclr_jax.metrics import classification


def raw_pixel_floor(features, labels, subject_ids, train_idx, test_idx, num_classes):
  """1-nearest-neighbour on raw pixels (correlation) from `train_idx`: Predictions of test."""
  predicted = neighbours.knn_classify(features[train_idx], labels[train_idx],
                                      features[test_idx], k=1, num_classes=num_classes,
                                      metric='correlation')
  return classification.Predictions(
      rows=np.asarray(test_idx, np.int64), subject_ids=subject_ids[test_idx],
      labels=labels[test_idx], probabilities=np.eye(num_classes, dtype=np.float32)[predicted])


def _run_floor(run, config, arrays, features):
  """Computes and writes one floor run; a finished one with the same settings is kept."""
  settings = {'mode': 'floor', 'metric': 'correlation', 'k': 1,
              'floor_image_size': config.sweep.floor_image_size, 'task': run.task, 'fold': run.fold,
              'label_unit': run.budget.unit, 'label_budget': run.budget.size,
              'label_seed': run.seed,
              **{k: v for k, v in plan_lib.PROTOCOLS[run.protocol].items()
                 if k in ('split.scheme', 'split.include_test_in_pretrain', 'eval.selection_split')}}
  if run.finished:
    previous = workdirs.read_metrics(run.workdir)
    if all(previous.get(k) == v for k, v in settings.items()):
      return False
  splits = plan_lib.protocol_splits(config, run.protocol, arrays, run.fold)
  train_idx = splits_lib.budget_subset(arrays, splits['train'], run.budget, run.seed)
  labels, class_names = arrays_lib.task_labels(arrays, plan_lib.task_config(config, run.task))
  start = time.time()
  predictions = raw_pixel_floor(features, labels, arrays.subject_ids, train_idx,
                                splits['test'], len(class_names))
  result = classification.prediction_metrics(predictions, len(class_names))
  result.update(settings)
  result.update({'chosen_step': None, 'num_train_images': int(len(train_idx)),
                 'num_train_subjects': int(len(np.unique(arrays.subject_ids[train_idx]))),
                 'class_names': class_names,
                 'label_counts': np.bincount(labels[train_idx],
                                             minlength=len(class_names)).tolist()})
  workdirs.write_predictions(run.workdir, predictions)
  workdirs.write_wall_time(run.workdir, time.time() - start)
  workdirs.write_metrics(run.workdir, result)
  return True


def _train_group(group, counter, cache, run_devices):
  """Trains a group's unfinished runs, together or (one left) alone; returns those it trained."""
  for run in group:
    workdirs.check_workdir_config(run.config, run.workdir)  # A finished run must match too.
  pending = [run for run in group if not run.finished]
  if not pending:
    return []
  logging.info('Sweep group %s: %s.', counter, '; '.join(
      f'{run.name} in {run.workdir}' for run in pending))
  start = time.time()
  if len(pending) == 1:
    trainer.train_and_evaluate(pending[0].config, pending[0].workdir, cache)
  else:
    groups_lib.train_group([run.config for run in pending], [run.workdir for run in pending],
                           cache, run_devices)
  for run in pending:  # Each run's share of the group's time: their sum is the sweep's.
    workdirs.write_wall_time(run.workdir, (time.time() - start) / len(pending))
  return pending


def _cell_name(runs):
  """What a group's runs share, e.g. 'honest binary baseline+finetune 8 subjects seed 0,
  folds 0,1,2,3,4'."""
  first = runs[0]
  folds = sorted({run.fold for run in runs if run.fold is not None})
  arms = sorted({run.arm for run in runs})
  what = (f'{first.protocol} pretrain' if first.arm == 'pretrain' else
          f'{first.protocol} {first.task} {"+".join(arms)} {first.budget.label} seed {first.seed}')
  return what + (f', folds {",".join(map(str, folds))}' if folds else '')


def check_config(config):
  """A sweep config: its runs' training fields, then the sweep's own."""
  checks.check_mode(config, ('sweep',))
  checks.check_training_fields(config)
  protocols = fields.get(config, 'sweep.protocols')
  unknown = [p for p in protocols if p not in plan_lib.PROTOCOLS]
  if unknown or not protocols:
    raise errors.UserError(
        f'Unknown protocols {unknown or "(none)"}; set --config.sweep.protocols to some of '
        f'{tuple(plan_lib.PROTOCOLS)}, e.g. "(\'honest\',)".')
  fractions = config.sweep.fractions
  if not fractions or any(not fields.is_real(f) or not 0.0 < f <= 1.0 for f in fractions):
    raise errors.UserError(f'Label fractions must be in (0, 1], got {fractions}; set '
                           '--config.sweep.fractions to e.g. "(0.01, 0.1, 1.0)".')
  fields.choice(config, 'sweep.label_unit', splits_lib.LABEL_UNITS,
                'set --config.sweep.label_unit to subject (the honest protocol labels '
                'sweep.subject_budgets people) or slice (sweep.fractions of the slices)')
  fields.integers(config, 'sweep.subject_budgets', (4, 8, 16, 32, 0), low=0,
                  meaning=' (labeled training subjects per fold, 0: all)')
  if not config.sweep.seeds or not config.sweep.reference_seeds:
    raise errors.UserError('The sweep needs at least one seed; set --config.sweep.seeds and '
                           '--config.sweep.reference_seeds to e.g. "(0,)".')
  for name in ('sweep.seeds', 'sweep.reference_seeds'):
    fields.integers(config, name, (0,), low=0, meaning=' (seeds)')
  fields.real(config, 'sweep.multi_seed_max_fraction', 0, 1, example=0.2,
              meaning=', the largest label fraction run with every seed')
  fields.integer(config, 'sweep.multi_seed_max_subjects', low=0, example=16)
  fields.integer(config, 'sweep.pretrain_num_epochs', example=100)
  fields.integer(config, 'sweep.max_steps_per_run', example=600, optional=True)
  fields.integer(config, 'sweep.reference_num_epochs', example=100, optional=True)
  fields.integer(config, 'sweep.evals_per_run', example=5, optional=True)
  fields.integer(config, 'sweep.floor_image_size', example=64, optional=True)
  fields.integer(config, 'sweep.bootstrap_samples', low=100, example=2000)
  fields.integer(config, 'sweep.group_runs', low=1, example=10)
  arms = fields.get(config, 'sweep.group_arms')
  if arms is not fields.MISSING and (not isinstance(arms, (tuple, list)) or any(
      arm not in plan_lib.GROUPABLE_ARMS for arm in arms)):
    raise errors.UserError(f'--config.sweep.group_arms={arms} must be a tuple of pretrain, '
                           'baseline, finetune and probe, e.g. "(\'pretrain\',)".')
  fields.integer(config, 'sweep.run_devices', low=0, example=0)
  _check_primary(config)
  tasks = fields.get(config, 'sweep.tasks')
  if tasks is not fields.MISSING and (not tasks or any(t not in arrays_lib.TASKS for t in tasks)):
    raise errors.UserError(f'Unknown tasks {tasks}; set --config.sweep.tasks to some of '
                           f'{arrays_lib.TASKS}, e.g. "(\'binary\', \'three_class\')".')
  reference_tasks = fields.get(config, 'sweep.reference_tasks')
  if reference_tasks not in (fields.MISSING, None) and (
      not reference_tasks or any(t not in tasks for t in reference_tasks)):
    raise errors.UserError(f'--config.sweep.reference_tasks={reference_tasks} must be some of '
                           f'--config.sweep.tasks={tasks}, e.g. "(\'binary\',)"; or None for all.')
  checks.check_cam_fields(config)


def _check_primary(config):
  """The equivalence margin and the pre-registered primary endpoint (`sweep.primary`)."""
  fields.real(config, 'sweep.equivalence_margin', 0, example=5.0,
              meaning=' (points of a − b within which two arms are equivalent)')
  fields.choice(config, 'sweep.primary.protocol', tuple(plan_lib.PROTOCOLS))
  fields.choice(config, 'sweep.primary.task', arrays_lib.TASKS)
  fields.choice(config, 'sweep.primary.level', bootstrap.LEVELS)
  fields.choice(config, 'sweep.primary.metric', bootstrap.ALL_METRICS)
  fields.choice(config, 'sweep.primary.comparison', verdicts.COMPARISONS)
  fields.integer(config, 'sweep.primary.max_subjects', example=16)
  fields.real(config, 'sweep.primary.max_fraction', 0, 1, low_open=True, example=0.1,
              meaning=' (the largest few-label fraction)')
  metric, task = (fields.get(config, f'sweep.primary.{k}') for k in ('metric', 'task'))
  if metric in ('sensitivity', 'specificity') and task != 'binary':
    raise errors.UserError(f'--config.sweep.primary.metric={metric} needs the binary task, not '
                           f'{task!r}; set --config.sweep.primary.task=binary or another metric.')


def main(config, workdir):
  """Runs (or completes) the label-budget study and writes its reports.

  Args:
    config: a sweep config (configs/sweep.py).
    workdir: where the runs and the reports go.

  Returns:
    The aggregated results (also written to `workdir/sweep.json`).
  """
  start = time.time()
  arrays = arrays_lib.load_arrays(config)
  planned = plan_lib.plan_runs(config, workdir, arrays)
  if jax.process_index() == 0:
    workdirs.write_json(workdirs.output_path(workdir, workdirs.CONFIG_FILE),
                    json.loads(config.to_json_best_effort()))

  features = neighbours.pixel_features(arrays.images, config.sweep.floor_image_size)
  for run in planned:
    if run.arm == 'floor':
      _run_floor(run, config, arrays, features)
  del features

  trained = [run for run in planned if run.config is not None]
  groups = plan_lib.training_groups(planned, config.sweep.group_runs, config.sweep.group_arms)
  cache = compile_cache.CompileCache()  # The sweep's: runs of equal shapes compile once.
  remaining_work = sum(run.work for run in trained if not run.finished)
  work_done, seconds_training = 0.0, 0.0
  logging.info('Sweep: %d runs to train (%d finished already) in %d groups of up to %d, '
               '%d floor runs, in %s.', sum(not run.finished for run in trained),
               sum(run.finished for run in trained), len(groups), config.sweep.group_runs,
               len(planned) - len(trained), workdir)
  for i, group in enumerate(groups, 1):
    group_start = time.time()
    ran = _train_group(group, f'{i}/{len(groups)}', cache, config.sweep.run_devices)
    if not ran:
      continue
    seconds_training += time.time() - group_start
    work = sum(run.work for run in ran)
    work_done += work
    remaining_work -= work
    eta = seconds_training / work_done * remaining_work if work_done else 0.0
    logging.info('Sweep group %d/%d done (%d runs: %s) in %s; elapsed %s, ETA %s.', i,
                 len(groups), len(ran), ran[0].name if len(ran) == 1 else _cell_name(ran),
                 results_lib.duration(time.time() - group_start),
                 results_lib.duration(time.time() - start), results_lib.duration(eta))
    report_lib.write_reports(config, workdir, planned, arrays,
                             elapsed=time.time() - start, figures=False)
  summary = report_lib.write_reports(config, workdir, planned, arrays,
                                       elapsed=time.time() - start)
  logging.info('Sweep finished in %s; results in %s.', results_lib.duration(time.time() - start),
               workdirs.output_path(workdir, 'results.md'))
  return summary


