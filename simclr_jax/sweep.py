"""Sweep mode: runs the label-fraction study that `sweep_plan.py` plans.

For each protocol the runs go in plan order: the raw-pixel floor arm (no
training: 1-nearest-neighbour on pixels from the same labeled subset), the SimCLR
pretraining, then the baseline and fine-tuning runs side by side, seed by seed.
Each trained run is a `train.train_and_evaluate` workdir; running the same
command again skips finished runs (their `metrics.json` exists, with the same
config) and resumes unfinished ones from their checkpoints. After every run the
reports (`sweep_report.py`) are rewritten from the finished runs.
"""

import json
import time

from absl import logging
import jax
import numpy as np

from simclr_jax import data as data_lib
from simclr_jax import evaluate
from simclr_jax import neighbours
from simclr_jax import runs
from simclr_jax import splits as splits_lib
from simclr_jax import sweep_plan
from simclr_jax import sweep_report
from simclr_jax import sweep_results
from simclr_jax import train


def raw_pixel_floor(features, labels, subject_ids, train_idx, test_idx, num_classes):
  """1-nearest-neighbour on raw pixels (correlation) from `train_idx`: Predictions of test."""
  predicted = neighbours.knn_classify(features[train_idx], labels[train_idx],
                                      features[test_idx], k=1, num_classes=num_classes,
                                      metric='correlation')
  return evaluate.Predictions(
      rows=np.asarray(test_idx, np.int64), subject_ids=subject_ids[test_idx],
      labels=labels[test_idx], probabilities=np.eye(num_classes, dtype=np.float32)[predicted])


def _run_floor(run, config, arrays, features):
  """Computes and writes one floor run; a finished one with the same settings is kept."""
  settings = {'mode': 'floor', 'metric': 'correlation', 'k': 1,
              'floor_image_size': config.floor_image_size, 'task': run.task, 'fold': run.fold,
              'label_fraction': run.fraction, 'label_seed': run.seed,
              **{k: v for k, v in sweep_plan.PROTOCOLS[run.protocol].items()
                 if k in ('split_scheme', 'include_test_in_pretrain', 'selection_split')}}
  if run.finished:
    previous = runs.read_metrics(run.workdir)
    if all(previous.get(k) == v for k, v in settings.items()):
      return False
  splits = sweep_plan.protocol_splits(config, run.protocol, arrays, run.fold)
  train_idx = splits_lib.label_subset(arrays.labels, splits['train'], run.fraction, run.seed)
  labels, class_names = data_lib.task_labels(arrays, sweep_plan.task_config(config, run.task))
  start = time.time()
  predictions = raw_pixel_floor(features, labels, arrays.subject_ids, train_idx,
                                splits['test'], len(class_names))
  result = evaluate.prediction_metrics(predictions, len(class_names))
  result.update(settings)
  result.update({'chosen_step': None, 'num_train_images': int(len(train_idx)),
                 'num_train_subjects': int(len(np.unique(arrays.subject_ids[train_idx]))),
                 'class_names': class_names,
                 'label_counts': np.bincount(labels[train_idx],
                                             minlength=len(class_names)).tolist()})
  runs.write_predictions(run.workdir, predictions)
  runs.write_wall_time(run.workdir, time.time() - start)
  runs.write_metrics(run.workdir, result)
  return True


def _run_training(run, counter):
  """Trains one run unless finished; returns whether it ran."""
  runs.check_workdir_config(run.config, run.workdir)  # A finished run must match too.
  if run.finished:
    return False
  logging.info('Sweep run %s: %s in %s.', counter, run.name, run.workdir)
  start = time.time()
  train.train_and_evaluate(run.config, run.workdir)
  runs.write_wall_time(run.workdir, time.time() - start)
  return True


def run_sweep(config, workdir):
  """Runs (or completes) the label-fraction study and writes its reports.

  Args:
    config: a sweep config (configs/sweep.py).
    workdir: where the runs and the reports go.

  Returns:
    The aggregated results (also written to `workdir/sweep.json`).
  """
  sweep_plan.check_sweep_config(config)
  start = time.time()
  arrays = data_lib.load_arrays(config)
  planned = sweep_plan.plan_runs(config, workdir, arrays)
  if jax.process_index() == 0:
    runs.write_json(runs.output_path(workdir, runs.CONFIG_FILE),
                    json.loads(config.to_json_best_effort()))

  features = neighbours.pixel_features(arrays.images, config.floor_image_size)
  for run in planned:
    if run.arm == 'floor':
      _run_floor(run, config, arrays, features)
  del features

  trained = [run for run in planned if run.config is not None]
  remaining_work = sum(run.work for run in trained if not run.finished)
  work_done, seconds_training = 0.0, 0.0
  logging.info('Sweep: %d runs to train (%d finished already), %d floor runs, in %s.',
               sum(not run.finished for run in trained),
               sum(run.finished for run in trained), len(planned) - len(trained), workdir)
  for i, run in enumerate(trained, 1):
    run_start = time.time()
    if not _run_training(run, f'{i}/{len(trained)}'):
      continue
    seconds_training += time.time() - run_start
    work_done += run.work
    remaining_work -= run.work
    eta = seconds_training / work_done * remaining_work if work_done else 0.0
    logging.info('Sweep run %d/%d done (%s) in %s; elapsed %s, ETA %s.', i, len(trained),
                 run.name, sweep_results.duration(time.time() - run_start),
                 sweep_results.duration(time.time() - start), sweep_results.duration(eta))
    sweep_report.write_reports(config, workdir, planned, arrays,
                               elapsed=time.time() - start, figures=False)
  summary = sweep_report.write_reports(config, workdir, planned, arrays,
                                       elapsed=time.time() - start)
  logging.info('Sweep finished in %s; results in %s.', sweep_results.duration(time.time() - start),
               runs.output_path(workdir, 'results.md'))
  return summary


