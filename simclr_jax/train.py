"""The trainer of every training mode: the train step and the loop.

`train_and_evaluate(config, workdir)` builds the mode's pieces once
(`tasks.create_task`), then runs the same loop for pretrain, finetune and
baseline: steps, periodic training summaries, evaluation on the selection split
with the best checkpoint kept, periodic checkpoints, and at the end the test
metrics of the checkpoint chosen on the selection split.

The loop is written for the global batch (big_vision style): one `jax.jit` step over
a device mesh, buffers donated, no host synchronisation between logging steps.
"""

import functools
import math

from absl import logging
from clu import metric_writers
from clu import metrics
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax import errors
from simclr_jax import evaluate
from simclr_jax import input_pipeline
from simclr_jax import plots
from simclr_jax import runs
from simclr_jax import sharding
from simclr_jax import state as state_lib
from simclr_jax import tasks


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')
  grad_norm: metrics.Average.from_output('grad_norm')
  param_norm: metrics.LastValue.from_output('param_norm')
  update_norm: metrics.Average.from_output('update_norm')


# Steps per dispatch by platform (config.steps_per_dispatch=0). On accelerators,
# enough that Python and launch overheads vanish beside small steps; on CPU one:
# a step inside lax.scan ran 2x slower there, and dispatch costs ~1 % of a step
# (docs/performance.md).
DEFAULT_STEPS_PER_DISPATCH = {'cpu': 1, 'gpu': 16, 'tpu': 16}


def itstime(step, every, total_steps):
  """Whether periodic work with period `every` (steps; 0 or None: never) is due at `step`.

  Due at multiples of `every` and always at the last step.
  """
  return bool(every) and step % every == 0 or step == total_steps


# ----------------------------------------------------------------------------- steps


def train_step(state, batch, rng, *, loss_fn, steps_per_epoch, epoch_end, frozen=()):
  """One optimisation step shared by every mode: (state, batch) -> (state, metrics).

  The optimizer (state.tx) may be SAM/ASAM: it then takes the gradient again at
  the perturbed weights through `grad_fn`; BatchNorm statistics and the reported
  loss come from the clean pass only. The `frozen` parameter subtrees (a linear
  probe's encoder) get no gradient, so SAM neither perturbs nor back-propagates
  into them. At the end of an epoch `epoch_end` updates the state (the
  temperature step-down) and the epoch's loss sum starts again.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_of_params(params):
    params = {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}
    return loss_fn(params, state.batch_stats, batch, step_rng, state.temperature)

  (loss, (new_stats, accuracy)), grads = jax.value_and_grad(
      loss_of_params, has_aux=True)(state.params)
  grad_fn = lambda params, _: jax.grad(loss_of_params, has_aux=True)(params)[0]
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=new_stats,
                            epoch_loss=state.epoch_loss + jnp.stack([loss, 1.0]))
  new_state = jax.lax.cond(
      new_state.step % steps_per_epoch == 0,
      lambda s: epoch_end(s).replace(epoch_loss=jnp.zeros_like(s.epoch_loss)),
      lambda s: s, new_state)
  update_norm = optax.tree.norm(jax.tree.map(lambda a, b: a - b, params, state.params))
  step_metrics = TrainMetrics.single_from_model_output(
      loss=loss, accuracy=accuracy, grad_norm=optax.tree.norm(grads),
      param_norm=optax.tree.norm(params), update_norm=update_norm)
  return new_state, step_metrics


def make_train_step(config, loss_fn, epoch_end, mesh, steps_per_epoch):
  """One train step on a model batch, jitted over the mesh with the state donated."""
  repl = sharding.replicated_sharding(mesh)
  step = functools.partial(train_step, loss_fn=loss_fn, steps_per_epoch=steps_per_epoch,
                           epoch_end=epoch_end, frozen=state_lib.frozen_subtrees(config))
  return jax.jit(step, in_shardings=(repl, sharding.data_sharding(mesh), repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def train_steps(state, metrics, inputs, data, rngs, run_values, *, make_batch, loss_fn,
                epoch_end, frozen=()):
  """Up to k train steps in one dispatch (`lax.scan`): (state, metrics) -> (state, metrics).

  Args:
    state: the TrainState.
    metrics: TrainMetrics merged since the last summary; the steps' are merged in.
    inputs: per-step inputs stacked on a leading axis of k steps: 'row', 'position'
      int32 [k, B] (and 'image', 'label' when the data set is not on the devices).
    data: the data set on the devices ({'images', 'labels'}), or None.
    rngs: {'dropout', 'augment'} keys of the run.
    run_values: what differs between runs that share this compiled function:
      int32 scalars 'num_steps' (the first num_steps of the k steps run, the rest
      are skipped) and 'steps_per_epoch', and the task's values (class weights).
    make_batch: (uint8 images, labels, positions, key, run_values) -> the model batch.
    loss_fn, epoch_end, frozen: as `train_step`.

  Returns:
    The state after the steps and `metrics` merged with theirs.
  """

  def one_step(carry, step_inputs):
    state, metrics = carry
    images, labels = input_pipeline.DeviceData.images(data, step_inputs)
    batch = make_batch(images, labels, step_inputs['position'], rngs['augment'], run_values)
    state, step_metrics = train_step(state, batch, rngs['dropout'], loss_fn=loss_fn,
                                     steps_per_epoch=run_values['steps_per_epoch'],
                                     epoch_end=epoch_end, frozen=frozen)
    return state, metrics.merge(step_metrics)

  def body(carry, x):
    index, step_inputs = x
    carry = jax.lax.cond(index < run_values['num_steps'],
                         lambda c: one_step(c, step_inputs), lambda c: c, carry)
    return carry, None

  num_steps = jax.tree.leaves(inputs)[0].shape[0]
  if num_steps == 1:
    # No control flow: XLA CPU runs a step 2x slower inside a while loop or a
    # conditional than on its own (docs/performance.md).
    return one_step((state, metrics), jax.tree.map(lambda x: x[0], inputs))
  (state, metrics), _ = jax.lax.scan(
      body, (state, metrics), (jnp.arange(num_steps), inputs))
  return state, metrics


def make_train_steps(task, mesh):
  """The task's `train_steps`, jitted over the mesh with the state donated.

  One jitted function per `task.key` in the process, so that a sweep's runs of
  equal shapes trace and compile it once.
  """
  repl = sharding.replicated_sharding(mesh)
  steps = functools.partial(train_steps, make_batch=task.make_batch, loss_fn=task.loss_fn,
                            epoch_end=task.epoch_end,
                            frozen=state_lib.frozen_subtrees(task.config))
  return state_lib.memoized('train_steps', (task.key, mesh), lambda: jax.jit(
      steps, out_shardings=(repl, repl), donate_argnums=(0, 1)))


def steps_per_dispatch(config):
  """Steps per dispatch: config.steps_per_dispatch, or 0 for the platform's default."""
  if config.steps_per_dispatch:
    return config.steps_per_dispatch
  return DEFAULT_STEPS_PER_DISPATCH.get(jax.default_backend(), 1)


def next_boundary(step, total_steps, periods):
  """The first step after `step` at which periodic work with one of `periods` is due."""
  candidates = [total_steps] + [(step // p + 1) * p for p in periods if p]
  return min(c for c in candidates if c > step)


# ----------------------------------------------------------------------------- loop


def write_train_summary(writer, step, train_metrics, lr_fn, state, workdir):
  """Writes the training metrics since the last summary; stops a diverged run."""
  summary = train_metrics.compute()
  loss = float(summary['loss'])
  if not math.isfinite(loss):
    raise errors.TrainingDivergedError(
        f'Training diverged: the loss is {loss} at step {step}; the last good '
        f'checkpoint is kept in {workdir}. Lower the learning rate (or sam_rho) and run '
        'the same command again with a new --workdir.')
  scalars = {f'train/{k}': float(v) for k, v in summary.items()}
  scalars['train/learning_rate'] = float(lr_fn(step - 1))
  scalars['train/temperature'] = float(state.temperature)
  writer.write_scalars(step, scalars)


def evaluate_and_keep_best(task, state, best, writer, step, checkpoints, mesh):
  """Evaluates the selection split; keeps and saves the state when it is the best so far.

  Returns:
    (state, best): the state (its bookkeeping updated) and the best state so far
    as a host copy (`best` unchanged when this evaluation did not improve on it).
  """
  state = task.before_eval(state)
  selection = task.selection.run(state)
  split = task.config.selection_split
  writer.write_scalars(step, {f'{split}/{k}': v for k, v in selection.items()
                              if isinstance(v, (int, float))})
  value = np.float32(selection[task.selection_key])
  if value > np.float32(state.best_metric):
    state = state.replace(best_metric=sharding.replicate(value, mesh),
                          best_step=sharding.replicate(np.int32(step), mesh))
    checkpoints.save_best(state)
    best = jax.device_get(state)
  return state, best


def train_and_evaluate(config, workdir):
  """Trains `config.mode` in `workdir`, resuming if a checkpoint exists.

  Returns:
    The test metrics of the checkpoint chosen on the selection split (also written
    to `workdir/metrics.json`).
  """
  mesh = sharding.create_mesh()
  task = tasks.create_task(config, mesh)
  config = task.config
  runs.check_workdir_config(config, workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  per_epoch = task.rows.steps_per_epoch
  total_steps = per_epoch * config.num_epochs
  eval_every = per_epoch * config.eval_every_epochs
  logging.info('%s: %d training images, batches of %d, %d steps per epoch, %d steps.',
               config.mode, len(task.rows.rows), task.rows.batch_size, per_epoch, total_steps)

  lr_fn = state_lib.create_learning_rate_fn(config, total_steps)
  # The init key is config.seed itself, shared by both arms; dropout draws from the rest.
  rng = jax.random.key(config.seed)
  rngs = sharding.replicate_tree({'dropout': jax.random.split(rng)[1],
                                  'augment': input_pipeline.augment_key(config.seed)}, mesh)
  tx = state_lib.memoized('optimizer', task.key,
                          lambda: state_lib.create_optimizer(config, lr_fn))
  state = state_lib.create_train_state(config, task.model, rng, tx, mesh, key=task.key)
  checkpoints = runs.Checkpoints(workdir, config.keep_checkpoints)
  restored = checkpoints.restore_latest(state)
  state = task.start(state) if restored is None else restored
  start_step = int(state.step)
  if restored is not None:
    logging.info('Resumed from step %d of %s.', start_step, workdir)
  else:
    writer.write_hparams(hparams(config))
    write_views(writer, task, rngs, config.num_summary_images)

  p_train_steps = make_train_steps(task, mesh)
  k = steps_per_dispatch(config)
  periods = (config.log_every_steps, eval_every, config.checkpoint_every_steps)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps,
      every_secs=None)
  train_metrics = sharding.replicate_tree(TrainMetrics.empty(), mesh)
  best = None  # The best state so far, on the host (the steps donate the device copy).
  step = start_step
  while step < total_steps:
    # Up to k steps per dispatch, never past the next summary, evaluation or checkpoint.
    num_steps = min(k, next_boundary(step, total_steps, periods) - step)
    state, train_metrics = p_train_steps(
        state, train_metrics, dispatch_inputs(task, step, num_steps, k), task.device_data.arrays, rngs,
        sharding.replicate_tree({'num_steps': np.int32(num_steps),
                                 'steps_per_epoch': np.int32(per_epoch), **task.run_values},
                                mesh))
    for step in range(step + 1, step + num_steps + 1):
      report_progress(step)  # clu's periodic actions want every step.
    # Batches are a function of (seed, step) and evaluations of the state, so a run
    # resumed from any checkpoint replays the same steps and the same choices of best.
    checkpoint_now = itstime(step, config.checkpoint_every_steps, total_steps)
    if checkpoint_now or itstime(step, config.log_every_steps, total_steps):
      write_train_summary(writer, step, train_metrics, lr_fn, state, workdir)
      train_metrics = sharding.replicate_tree(TrainMetrics.empty(), mesh)
    if itstime(step, eval_every, total_steps):
      with report_progress.timed('eval'):
        state, best = evaluate_and_keep_best(task, state, best, writer, step, checkpoints,
                                             mesh)
    if checkpoint_now:
      checkpoints.save_latest(state)
  return write_final(task, checkpoints, state, best, writer, workdir, total_steps)


def write_final(task, checkpoints, state, best, writer, workdir, total_steps):
  """Test metrics of the checkpoint chosen on the selection split -> metrics.json.

  `best` is the best state of this call, if it found one; a resumed run whose
  best came before the resumption reads it from its checkpoint.
  """
  config = task.config
  if best is None or int(best.best_step) < int(state.best_step):
    best = checkpoints.restore_best(state)
  chosen = state if best is None else best
  checkpoints.close()
  if isinstance(task.test, evaluate.ClassifierEvaluator):
    predictions = task.test.predict(chosen)
    runs.write_predictions(workdir, predictions)
    test_metrics = evaluate.prediction_metrics(predictions, config.num_classes)
  else:
    test_metrics = task.test.run(chosen)
  data = task.data
  result = dict(test_metrics)
  result.update({
      'mode': config.mode, 'task': config.task, 'fold': config.get('fold'),
      'chosen_step': int(chosen.best_step),
      f'selection_{config.selection_split}_{task.selection_key}': float(chosen.best_metric),
      'selection_classes': data.selection_classes,
      'num_train_images': int(len(data.train_idx)),
      'num_train_subjects': int(len(np.unique(data.arrays.subject_ids[data.train_idx]))),
      'total_steps': total_steps, 'class_names': list(data.class_names),
      'label_counts': np.bincount(data.labels[data.train_idx],
                                  minlength=config.num_classes).tolist(),
  })
  writer.write_scalars(total_steps, {f'test/{k}': v for k, v in test_metrics.items()
                                     if isinstance(v, (int, float))})
  if 'confusion_matrix' in test_metrics and jax.process_index() == 0:
    image = plots.plot_confusion_matrix(
        np.asarray(test_metrics['confusion_matrix']), result['class_names'],
        runs.output_path(workdir, 'confusion_matrix.png'),
        title=f'{config.mode} (test, checkpoint chosen on {config.selection_split})')
    writer.write_images(total_steps, {'test/confusion_matrix': image[None]})
  runs.write_metrics(workdir, result)
  writer.flush()
  logging.info('Test metrics of the step-%d checkpoint: %s', result['chosen_step'],
               {k: v for k, v in test_metrics.items() if isinstance(v, float)})
  return result


def hparams(config):
  """The config as flat TensorBoard hyperparameters."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def dispatch_inputs(task, step, num_steps, k):
  """Inputs of steps step .. step + num_steps - 1, padded to k steps, as global arrays."""
  steps = [task.rows.step_inputs(s) for s in range(step, step + num_steps)]
  steps += [steps[-1]] * (k - num_steps)  # Skipped inside the dispatch.
  stacked = {name: np.stack([s[name] for s in steps]) for name in steps[0]}
  return task.device_data.inputs(stacked, batch_axis=1)


def write_views(writer, task, rngs, num_images):
  """The first training batch's augmented images, once, to TensorBoard."""
  if not num_images:
    return
  inputs = task.device_data.inputs(task.rows.step_inputs(0))

  def first_batch(data, inputs, key):
    images, labels = input_pipeline.DeviceData.images(data, inputs)
    return task.make_batch(images, labels, inputs['position'], key, task.run_values)

  host = sharding.to_host(jax.jit(first_batch)(task.device_data.arrays, inputs,
                                                rngs['augment']))
  if 'image1' in host:
    images = np.concatenate([host['image1'][:num_images], host['image2'][:num_images]], axis=2)
  else:
    images = host['image'][:num_images]
  writer.write_images(1, {'train/input_views': np.clip(images, 0, 1)})
