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
import itertools
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
  """The mode's train step, jitted over the mesh with the state donated."""
  repl = sharding.replicated_sharding(mesh)
  step = functools.partial(train_step, loss_fn=loss_fn, steps_per_epoch=steps_per_epoch,
                           epoch_end=epoch_end, frozen=state_lib.frozen_subtrees(config))
  return jax.jit(step, in_shardings=(repl, sharding.data_sharding(mesh), repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


# ----------------------------------------------------------------------------- loop


def write_train_summary(writer, step, train_metrics, lr_fn, state, workdir):
  """Writes the training metrics since the last summary; stops a diverged run."""
  summary = train_metrics.compute()
  loss = float(summary['loss'])
  if not math.isfinite(loss):
    raise FloatingPointError(
        f'Training diverged: the loss is {loss} at step {step}; the last good '
        f'checkpoint is kept in {workdir}. Lower the learning rate (or sam_rho) and run '
        'the same command again with a new --workdir.')
  scalars = {f'train/{k}': float(v) for k, v in summary.items()}
  scalars['train/learning_rate'] = float(lr_fn(step - 1))
  scalars['train/temperature'] = float(state.temperature)
  writer.write_scalars(step, scalars)


def evaluate_and_keep_best(task, state, writer, step, checkpoints, mesh):
  """Evaluates the selection split and saves the best checkpoint when it improves."""
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
  return state


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
  per_epoch = input_pipeline.steps_per_epoch(len(task.data.train_idx), config.batch_size)
  total_steps = per_epoch * config.num_epochs
  eval_every = per_epoch * config.eval_every_epochs
  logging.info('%s: %d training images, %d steps per epoch, %d steps.', config.mode,
               len(task.data.train_idx), per_epoch, total_steps)

  lr_fn = state_lib.create_learning_rate_fn(config, total_steps)
  # The init key is config.seed itself, shared by both arms; dropout draws from the rest.
  rng = jax.random.key(config.seed)
  _, step_rng = jax.random.split(rng)
  state = state_lib.create_train_state(config, task.model, rng,
                                       state_lib.create_optimizer(config, lr_fn), mesh)
  checkpoints = runs.Checkpoints(workdir, config.keep_checkpoints)
  restored = checkpoints.restore_latest(state)
  state = task.start(state) if restored is None else restored
  start_step = int(state.step)
  if restored is not None:
    logging.info('Resumed from step %d of %s.', start_step, workdir)
  else:
    writer.write_hparams(hparams(config))

  p_train_step = make_train_step(config, task.loss_fn, task.epoch_end, mesh, per_epoch)
  batches = sharding.prefetch(task.make_batches(start_step=start_step),
                              sharding.data_sharding(mesh), size=config.prefetch)
  if start_step == 0 and config.num_summary_images:
    first = next(batches)
    write_views(writer, first, config.num_summary_images)
    batches = itertools.chain([first], batches)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps,
      every_secs=None)
  train_metrics = TrainMetrics.empty()
  for step in range(start_step + 1, total_steps + 1):
    state, step_metrics = p_train_step(state, next(batches), step_rng)
    train_metrics = train_metrics.merge(step_metrics)
    report_progress(step)
    # Batches are a function of (seed, step), so a run resumes exactly from any step;
    # the latest checkpoint is written at every evaluation and periodically.
    checkpoint_now = itstime(step, eval_every, total_steps) or itstime(
        step, config.checkpoint_every_steps, total_steps)
    if checkpoint_now or itstime(step, config.log_every_steps, total_steps):
      write_train_summary(writer, step, train_metrics, lr_fn, state, workdir)
      train_metrics = TrainMetrics.empty()
    if itstime(step, eval_every, total_steps):
      with report_progress.timed('eval'):
        state = evaluate_and_keep_best(task, state, writer, step, checkpoints, mesh)
    if checkpoint_now:
      checkpoints.save_latest(state)
  return write_final(task, checkpoints, state, writer, workdir, total_steps)


def write_final(task, checkpoints, state, writer, workdir, total_steps):
  """Test metrics of the checkpoint chosen on the selection split -> metrics.json."""
  config = task.config
  chosen = checkpoints.restore_best(state) or state
  checkpoints.close()
  test_metrics = task.test.run(chosen)
  train_labels = task.data.arrays.labels[task.data.train_idx]
  result = dict(test_metrics)
  result.update({
      'mode': config.mode, 'chosen_step': int(chosen.best_step),
      f'selection_{config.selection_split}_{task.selection_key}': float(chosen.best_metric),
      'num_train_images': int(len(task.data.train_idx)), 'total_steps': total_steps,
      'class_names': list(task.data.arrays.class_names),
      'label_counts': np.bincount(train_labels, minlength=config.num_classes).tolist(),
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


def write_views(writer, batch, num_images):
  """The first training batch's (augmented) images, once, to TensorBoard."""
  host = sharding.to_host(batch)
  if 'image1' in host:
    images = np.concatenate([host['image1'][:num_images], host['image2'][:num_images]], axis=2)
  else:
    images = host['image'][:num_images]
  writer.write_images(1, {'train/input_views': np.clip(images, 0, 1)})
