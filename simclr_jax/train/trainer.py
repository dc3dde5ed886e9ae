"""The training modes (pretrain, finetune, baseline): their checks and the loop.

`train_and_evaluate(config, workdir)` builds the mode's pieces once
(`recipes.create_recipe`), then runs the same loop for pretrain, finetune and
baseline: scanned steps (`steps.make_train_steps`), periodic training summaries,
evaluation on the selection split with the best checkpoint kept, periodic
checkpoints, and at the end the test metrics of the checkpoint chosen on the
selection split. The modes' entry for `run.py` is `train/mode.py`; the sweep calls
`train_and_evaluate` for each of its runs.

The loop is written for the global batch (big_vision style): one `jax.jit` step over
a device mesh, buffers donated, no host synchronisation between logging steps.
"""

import contextlib
import math
import time
from typing import NamedTuple

from absl import logging
from clu import periodic_actions
import flax
import jax
from jax.experimental import multihost_utils
import numpy as np

from simclr_jax import errors
from simclr_jax import plots
from simclr_jax.data import batches
from simclr_jax.metrics import classification
from simclr_jax.parallel import sharding
from simclr_jax.train import compile_cache
from simclr_jax.train import curves
from simclr_jax.train import evaluators
from simclr_jax.train import optimizers
from simclr_jax.train import preemption
from simclr_jax.train import recipes
from simclr_jax.train import state as state_lib
from simclr_jax.train import steps as steps_lib
from simclr_jax.train import workdirs


def itstime(step, every, total_steps):
  """Whether periodic work with period `every` (steps; 0 or None: never) is due at `step`.

  Due at multiples of `every` and always at the last step.
  """
  return bool(every) and step % every == 0 or step == total_steps


def next_boundary(step, total_steps, periods):
  """The first step after `step` at which periodic work with one of `periods` is due."""
  candidates = [total_steps] + [(step // p + 1) * p for p in periods if p]
  return min(c for c in candidates if c > step)


# ----------------------------------------------------------------------------- loop


def summary_period(log_every_steps, steps_per_dispatch):
  """Summary period in steps: `log_every_steps` rounded up to whole dispatches.

  A summary never cuts a scanned dispatch of k steps short (evaluations and
  checkpoints at fixed steps still may).
  """
  if not log_every_steps:
    return log_every_steps
  return -(-log_every_steps // steps_per_dispatch) * steps_per_dispatch


def write_train_summary(writer, step, train_metrics, lr_fn, state, workdir):
  """Writes the training metrics since the last summary; stops a diverged run.

  The metrics and the temperature come from the devices in one transfer.
  """
  summary, temperature = jax.device_get((train_metrics.compute(), state.temperature))
  loss = float(summary['loss'])
  if not math.isfinite(loss):
    raise errors.TrainingDivergedError(
        f'Training diverged: the loss is {loss} at step {step}; the last good '
        f'checkpoint is kept in {workdir}. Lower the learning rate (or sam_rho) and run '
        'the same command again with a new --workdir.')
  scalars = {f'train/{k}': float(v) for k, v in summary.items()}
  scalars['train/learning_rate'] = float(lr_fn(step - 1))
  scalars['train/temperature'] = float(temperature)
  writer.write_scalars(step, scalars)


def evaluate_and_keep_best(recipe, state, best, writer, step, checkpoints, mesh):
  """Evaluates the selection split; keeps and saves the state when it is the best so far.

  Returns:
    (state, best): the state (its bookkeeping updated) and the best state so far,
    a copy kept on the devices (the steps donate the state's buffers), `best`
    unchanged when this evaluation did not improve on it.
  """
  state = recipe.before_eval(state)
  selection = recipe.selection.run(state)
  split = recipe.config.eval.selection_split
  writer.write_scalars(step, {f'{split}/{k}': v for k, v in selection.items()
                              if isinstance(v, (int, float))})
  value = np.float32(selection[recipe.selection_key])
  if value > np.float32(state.best_metric):
    state = state.replace(best_metric=sharding.replicate(value, mesh),
                          best_step=sharding.replicate(np.int32(step), mesh))
    checkpoints.save_best(state)
    best = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
  return state, best


def train_and_evaluate(config, workdir, cache=None):
  """Trains `config.mode` in `workdir`, resuming if a checkpoint exists.

  Args:
    config: a checked pretrain, finetune or baseline config.
    workdir: the run's directory.
    cache: the compile_cache.CompileCache to share compiled steps with other runs
      (a sweep passes its own); None: the run's own.

  Returns:
    The test metrics of the checkpoint chosen on the selection split (also written
    to `workdir/metrics.json`).
  """
  mesh = sharding.create_mesh()
  cache = compile_cache.CompileCache() if cache is None else cache
  run = RunLoop(config, workdir, mesh, cache)
  recipe = run.recipe
  p_train_steps = steps_lib.make_train_steps(run.config, recipe.objective, mesh, cache,
                                             recipe.key)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=run.total_steps, writer=run.writer, every_steps=run.log_every,
      every_secs=None)
  state, train_metrics = run.take_start()
  while not run.done:
    num_steps = run.next_num_steps()
    state, train_metrics = p_train_steps(
        state, train_metrics, dispatch_inputs(recipe, run.step, num_steps, run.k),
        recipe.device_data.arrays, run.rngs,
        sharding.replicate_tree(run.step_values(num_steps), mesh))
    first_step, last_step = run.step + 1, run.step + num_steps
    for step in range(first_step, last_step + 1):
      report_progress(step)  # clu's periodic actions want every step.
    # SIGTERM: save, then stop.
    due = run.advance(num_steps, preemption.reached_stop_step(first_step, last_step))
    state, train_metrics = run.periodic(state, train_metrics, due, report_progress.timed)
    if due.stop:
      stop(run.checkpoints, run.writer, run.step, workdir)
  return run.finish(state)


class Due(NamedTuple):
  """The periodic work due after a dispatch: summary, evaluation, checkpoint, stop."""
  summary: bool
  evaluate: bool
  checkpoint: bool
  stop: bool


class RunLoop:
  """One run's loop around its dispatches: `train_and_evaluate`'s, and each run's of a group.

  Built from a config and a workdir (the recipe, the writer, the checkpoints, the
  state to start from: restored, or fresh), it keeps the run's bookkeeping (its
  step, its best state, its checkpoint clock) while the caller owns the state and
  the train metrics and runs the dispatches: `next_num_steps`, `host_inputs` and
  `step_values` say what the next dispatch runs, `advance` what is due after it,
  `periodic` does it (summary, evaluation with the best kept, checkpoint) on the
  run's own state, `finish` writes the test metrics.
  """

  def __init__(self, config, workdir, mesh, cache):
    self.mesh, self.workdir = mesh, workdir
    self.recipe = recipe = recipes.create_recipe(config, mesh, cache)
    self.config = config = recipe.config
    workdirs.check_workdir_config(config, workdir)
    self.writer = curves.create_writer(workdir)
    self.per_epoch = per_epoch = recipe.rows.steps_per_epoch
    self.total_steps = total_steps = per_epoch * config.train.num_epochs
    self.eval_every = per_epoch * config.eval.every_epochs
    logging.info('%s: %d training images, batches of %d, %d steps per epoch, %d steps.',
                 config.mode, len(recipe.rows.rows), recipe.rows.batch_size, per_epoch,
                 total_steps)
    self.lr_fn = optimizers.create_learning_rate_fn(config, total_steps)
    self.schedule = optimizers.schedule_values(config, total_steps)
    # The init key is config.seed itself, shared by both arms; dropout draws from the rest.
    rng = jax.random.key(config.seed)
    self.host_rngs = {'dropout': jax.random.split(rng)[1],
                      'augment': batches.augment_key(config.seed)}
    self.rngs = sharding.replicate_tree(self.host_rngs, mesh)
    tx = cache.get('optimizer', recipe.key, lambda: optimizers.create_optimizer(config))
    state = state_lib.create_train_state(config, recipe.model, rng, tx, mesh, cache=cache,
                                         key=recipe.key)
    self.checkpoints = workdirs.Checkpoints(workdir, config.train.keep_checkpoints)
    restored = self.checkpoints.restore_latest(state)
    self._start = recipe.start(state) if restored is None else restored
    self.step = int(self._start.step)
    self.writer.truncate_after(self.step)  # What comes after is replayed.
    if restored is not None:
      logging.info('Resumed from step %d of %s.', self.step, workdir)
    if preemption.stop_requested_anywhere():  # Signalled before this run's first step.
      stop(self.checkpoints, self.writer, self.step if restored is not None else None, workdir)
    if restored is None:
      self.writer.write_hparams(hparams(config))
      write_views(self.writer, recipe, self.rngs, config.train.num_summary_images, cache)
    self.k = steps_lib.steps_per_dispatch(config)
    self.log_every = summary_period(config.train.log_every_steps, self.k)
    self.periods = (self.log_every, self.eval_every, config.train.checkpoint_every_steps)
    self.clock = CheckpointClock(config.train.checkpoint_every_minutes)
    self.best = None  # The best state of this call, a copy on the devices.

  @property
  def done(self):
    return self.step >= self.total_steps

  def take_start(self):
    """(state, empty train metrics) to start from; the caller owns them from now on."""
    state, self._start = self._start, None
    return state, sharding.replicate_tree(steps_lib.TrainMetrics.empty(), self.mesh)

  def next_num_steps(self):
    """Steps of the next dispatch: up to k, never past the next periodic work; 0 when done."""
    if self.done:
      return 0
    return min(self.k, next_boundary(self.step, self.total_steps, self.periods) - self.step)

  def host_inputs(self, num_steps):
    """Host inputs of the next `num_steps` steps, stacked on a leading axis of k steps."""
    return host_dispatch_inputs(self.recipe, self.step, num_steps, self.k)

  def step_values(self, num_steps):
    """The run's `steps_lib.step_values` of a dispatch of `num_steps` steps (host)."""
    return steps_lib.step_values(num_steps, self.per_epoch, self.recipe.class_weights,
                                 self.schedule)

  def advance(self, num_steps, stop_now):
    """Counts `num_steps` steps as run; the Due work after them (`stop_now`: SIGTERM)."""
    self.step += num_steps
    # Batches are a function of (seed, step) and evaluations of the state, so a run
    # resumed from any checkpoint replays the same steps and the same choices of best.
    step, total, every = self.step, self.total_steps, self.config.train.checkpoint_every_steps
    summary_now = itstime(step, self.log_every, total)
    checkpoint_now = (stop_now or itstime(step, every, total)
                      or summary_now and self.clock.due())
    return Due(summary_now, itstime(step, self.eval_every, total), checkpoint_now, stop_now)

  def periodic(self, state, train_metrics, due, timed=None):
    """The `due` work on the run's state: summary, evaluation, checkpoint.

    `timed`: name -> a context that times the evaluation (ReportProgress.timed).

    Returns:
      (state, train_metrics): the state with its bookkeeping updated, the train
      metrics emptied after a summary.
    """
    if due.checkpoint or due.summary:
      write_train_summary(self.writer, self.step, train_metrics, self.lr_fn, state,
                          self.workdir)
      train_metrics = sharding.replicate_tree(steps_lib.TrainMetrics.empty(), self.mesh)
    if due.evaluate:
      with timed('eval') if timed else contextlib.nullcontext():
        state, self.best = evaluate_and_keep_best(
            self.recipe, state, self.best, self.writer, self.step, self.checkpoints, self.mesh)
    if due.checkpoint:
      self.checkpoints.save_latest(state)
      self.clock.restart()
    return state, train_metrics

  def finish(self, state):
    """`write_final` of the run's last state: its test metrics, metrics.json."""
    return write_final(self.recipe, self.checkpoints, state, self.best, self.writer,
                       self.workdir, self.total_steps)


class CheckpointClock:
  """Whether `minutes` have passed since the last checkpoint (None: never by time).

  Asked at summaries only; with several processes process 0's clock decides for all,
  so that every process saves at the same step.
  """

  def __init__(self, minutes):
    self.seconds = None if minutes is None else 60.0 * minutes
    self.restart()

  def restart(self):
    self.start = time.monotonic()

  def due(self):
    if self.seconds is None:
      return False
    due = time.monotonic() - self.start >= self.seconds
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(np.bool_(due)))
    return due


def stop(checkpoints, writer, step, workdir):
  """Waits for the checkpoint saves in flight, then raises preemption.Stopped."""
  checkpoints.close()
  writer.flush()
  raise preemption.Stopped(step, workdir, preemption.reason())


def write_final(recipe, checkpoints, state, best, writer, workdir, total_steps):
  """Test metrics of the checkpoint chosen on the selection split -> metrics.json.

  `best` is the best state of this call, if it found one; a resumed run whose
  best came before the resumption reads it from its checkpoint.
  """
  config = recipe.config
  if best is None or int(best.best_step) < int(state.best_step):
    best = checkpoints.restore_best(state)
  chosen = state if best is None else best
  checkpoints.close()
  if isinstance(recipe.test, evaluators.ClassifierEvaluator):
    predictions = recipe.test.predictions(chosen)
    workdirs.write_predictions(workdir, predictions)
    test_metrics = classification.prediction_metrics(predictions, config.model.num_classes)
  else:
    test_metrics = recipe.test.run(chosen)
  rows_of = recipe.rows_of
  result = dict(test_metrics)
  result.update({
      'mode': config.mode, 'task': config.labels.task, 'fold': config.split.fold,
      'chosen_step': int(chosen.best_step),
      f'selection_{config.eval.selection_split}_{recipe.selection_key}': float(chosen.best_metric),
      'selection_classes': rows_of.selection_classes,
      'num_train_images': int(len(rows_of.train_idx)),
      'num_train_subjects': int(len(np.unique(rows_of.arrays.subject_ids[rows_of.train_idx]))),
      'total_steps': total_steps, 'class_names': list(rows_of.class_names),
      'label_counts': np.bincount(rows_of.labels[rows_of.train_idx],
                                  minlength=config.model.num_classes).tolist(),
  })
  writer.write_scalars(total_steps, {f'test/{k}': v for k, v in test_metrics.items()
                                     if isinstance(v, (int, float))})
  if 'confusion_matrix' in test_metrics and jax.process_index() == 0:
    image = plots.plot_confusion_matrix(
        np.asarray(test_metrics['confusion_matrix']), result['class_names'],
        workdirs.output_path(workdir, 'confusion_matrix.png'),
        title=f'{config.mode} (test, checkpoint chosen on {config.eval.selection_split})')
    writer.write_images(total_steps, {'test/confusion_matrix': image[None]})
  workdirs.write_metrics(workdir, result)
  writer.flush()
  logging.info('Test metrics of the step-%d checkpoint: %s', result['chosen_step'],
               {k: v for k, v in test_metrics.items() if isinstance(v, float)})
  return result


def hparams(config):
  """The config as flat TensorBoard hyperparameters."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def host_dispatch_inputs(recipe, step, num_steps, k):
  """Host inputs of steps step .. step + num_steps - 1, stacked and padded to k steps.

  The padding repeats the last step's inputs (step `step`'s when num_steps is 0):
  the dispatch skips those steps.
  """
  steps = [recipe.rows.step_inputs(s) for s in range(step, step + max(num_steps, 1))]
  steps += [steps[-1]] * (k - len(steps))
  return {name: np.stack([s[name] for s in steps]) for name in steps[0]}


def dispatch_inputs(recipe, step, num_steps, k):
  """Inputs of steps step .. step + num_steps - 1, padded to k steps, as global arrays."""
  return recipe.device_data.inputs(host_dispatch_inputs(recipe, step, num_steps, k),
                                   batch_axis=1)


def write_views(writer, recipe, rngs, num_images, cache):
  """The first training batch's augmented images, once, to TensorBoard."""
  if not num_images:
    return
  inputs = recipe.device_data.inputs(recipe.rows.step_inputs(0))

  def first_batch(data, inputs, key, values):
    images, labels = batches.DeviceDataset.images(data, inputs)
    return recipe.objective.make_batch(images, labels, inputs['position'], key, values)

  views = cache.get('views', recipe.key, lambda: jax.jit(first_batch))
  host = sharding.to_host(views(recipe.device_data.arrays, inputs, rngs['augment'],
                                {'class_weights': recipe.class_weights}))
  if 'image1' in host:
    images = np.concatenate([host['image1'][:num_images], host['image2'][:num_images]], axis=2)
  else:
    images = host['image'][:num_images]
  writer.write_images(1, {'train/input_views': np.clip(images, 0, 1)})
