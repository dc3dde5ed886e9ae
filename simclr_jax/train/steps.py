"""The train steps of every training mode: one step, and k steps per dispatch.

`train_steps` runs k >= 1 steps under `lax.scan` (one step without control flow
when k = 1); `make_train_steps` jits it over the device mesh, and is the one
jitted train entry point that training and the benchmarks share. `objective`
gives a mode's loss, epoch hook and batch maker from the config and the model.

This module and everything it imports are free of TensorFlow (clu.metrics is
plain JAX), so the steps run where only JAX is installed.
"""

import dataclasses
import functools
from typing import Callable

from clu import metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax.data import batches
from simclr_jax.model import losses
from simclr_jax.parallel import sharding
from simclr_jax.train import kinds
from simclr_jax.train import optimizers


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')
  grad_norm: metrics.Average.from_output('grad_norm')
  param_norm: metrics.LastValue.from_output('param_norm')
  update_norm: metrics.Average.from_output('update_norm')


# Steps per dispatch by platform (config.train.steps_per_dispatch=0). On accelerators,
# enough that Python and launch overheads vanish beside small steps; on CPU one:
# a step inside lax.scan ran 2x slower there, and dispatch costs ~1 % of a step
# (docs/performance.md).
DEFAULT_STEPS_PER_DISPATCH = {'cpu': 1, 'gpu': 16, 'tpu': 16}


def train_step(state, batch, rng, *, loss_fn, steps_per_epoch, epoch_end, frozen=(),
               schedule=None):
  """One optimisation step shared by every mode: (state, batch) -> (state, metrics).

  The optimizer (state.tx) may be SAM/ASAM: it then takes the gradient again at
  the perturbed weights through `grad_fn`; BatchNorm statistics and the reported
  loss come from the clean pass only. The `frozen` parameter subtrees (a linear
  probe's encoder) get no gradient, so SAM neither perturbs nor back-propagates
  into them. `schedule` is the learning-rate schedule's runtime values
  (optimizers.schedule_values), passed to the optimizers of `optimizers.py`; None
  passes none (an optimizer built elsewhere). At the end of an epoch `epoch_end`
  updates the state (the temperature step-down) and the epoch's loss sum starts again.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_of_params(params):
    params = {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}
    return loss_fn(params, state.batch_stats, batch, step_rng, state.temperature)

  (loss, (new_stats, accuracy)), grads = jax.value_and_grad(
      loss_of_params, has_aux=True)(state.params)
  grad_fn = lambda params, _: jax.grad(loss_of_params, has_aux=True)(params)[0]
  extra = {} if schedule is None else {'schedule': schedule}
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn,
                                       **extra)
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


def train_steps(state, metrics, inputs, data, rngs, values, *, make_batch, loss_fn,
                epoch_end, frozen=()):
  """Up to k train steps in one dispatch (`lax.scan`): (state, metrics) -> (state, metrics).

  Args:
    state: the TrainState.
    metrics: TrainMetrics merged since the last summary; the steps' are merged in.
    inputs: per-step inputs stacked on a leading axis of k steps: 'row', 'position'
      int32 [k, B] (and 'image', 'label' when the data set is not on the devices;
      'partner' and then 'partner_image' with pretrain.positive_pairs=subject).
    data: the data set on the devices ({'images', 'labels'}), or None.
    rngs: {'dropout', 'augment'} keys of the run.
    values: what differs between runs that share this compiled function:
      int32 scalars 'num_steps' (the first num_steps of the k steps run, the rest
      are skipped) and 'steps_per_epoch', the learning-rate schedule's int32 [2]
      'schedule' (its length), and the task's values (class weights).
    make_batch: (uint8 images, labels, positions, key, values) -> the model batch;
      the images are a pair (rows, partners) where the inputs hold 'partner'.
    loss_fn, epoch_end, frozen: as `train_step`.

  Returns:
    The state after the steps and `metrics` merged with theirs.
  """

  def one_step(carry, step_inputs):
    state, metrics = carry
    images, labels = batches.DeviceDataset.images(data, step_inputs)
    batch = make_batch(images, labels, step_inputs['position'], rngs['augment'], values)
    state, step_metrics = train_step(state, batch, rngs['dropout'], loss_fn=loss_fn,
                                     steps_per_epoch=values['steps_per_epoch'],
                                     epoch_end=epoch_end, frozen=frozen,
                                     schedule=values['schedule'])
    return state, metrics.merge(step_metrics)

  def body(carry, x):
    index, step_inputs = x
    carry = jax.lax.cond(index < values['num_steps'],
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


def make_train_steps(config, objective, mesh, cache=None, key=None):
  """`train_steps` of `objective`, jitted over the mesh with the state and metrics donated.

  The one jitted train entry point: training and every benchmark call it, with
  k >= 1 steps per dispatch. With a `cache` (compile_cache.CompileCache) and the
  run's step key, runs of one key share one jitted function, so a sweep's runs of
  equal shapes trace and compile it once.
  """
  repl = sharding.replicated_sharding(mesh)
  make = lambda: jax.jit(bound_train_steps(config, objective), out_shardings=(repl, repl),
                         donate_argnums=(0, 1))
  return make() if cache is None else cache.get('train_steps', (key, mesh), make)


def bound_train_steps(config, objective):
  """`train_steps` with the mode's objective bound: (state, metrics, inputs, data, rngs, values)."""
  return functools.partial(train_steps, make_batch=objective.make_batch,
                           loss_fn=objective.loss_fn, epoch_end=objective.epoch_end,
                           frozen=kinds.frozen_subtrees(config))


def steps_per_dispatch(config):
  """Steps per dispatch: config.train.steps_per_dispatch, or 0 for the platform's default."""
  if config.train.steps_per_dispatch:
    return config.train.steps_per_dispatch
  return DEFAULT_STEPS_PER_DISPATCH.get(jax.default_backend(), 1)


def temperature_step_down(state, *, base, steps):
  """The reference's one-way step-down from the finished epoch's mean loss."""
  epoch_loss = state.epoch_loss[0] / jnp.maximum(state.epoch_loss[1], 1.0)
  temperature = losses.temperature_for_loss(epoch_loss, base, steps)
  return state.replace(temperature=jnp.minimum(state.temperature, temperature))


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a mode's train step computes; needs no data, so benchmarks build the real step.

  Attributes:
    loss_fn: (params, batch_stats, batch, rng, temperature) -> (loss, (new
      batch_stats, accuracy)); jittable.
    epoch_end: state -> state at the end of every epoch (the temperature
      step-down); jittable.
    make_batch: (uint8 images, labels, stream positions, augmentation key, run
      values) -> the batch `loss_fn` takes; jittable.
  """
  loss_fn: Callable
  epoch_end: Callable
  make_batch: Callable


def unchanged(state):
  return state


def objective(config, model):
  """The mode's Objective: its loss, its epoch hook and its batch maker."""
  if kinds.model_kind(config) == 'simclr':
    epoch_end = (functools.partial(temperature_step_down, base=config.pretrain.temperature,
                                   steps=tuple(map(tuple, config.pretrain.temperature_steps)))
                 if config.pretrain.temperature_schedule else unchanged)
    return Objective(functools.partial(losses.simclr_loss, apply_fn=model.apply,
                                       joint_views=config.pretrain.joint_views), epoch_end,
                     functools.partial(batches.simclr_batch, config=config))
  return Objective(functools.partial(losses.supervised_loss, apply_fn=model.apply), unchanged,
                   functools.partial(batches.labeled_batch, config=config))


def step_values(num_steps, steps_per_epoch, class_weights, schedule=None):
  """What differs between runs that share compiled steps, as `train_steps` takes it.

  `schedule`: `optimizers.schedule_values` of the run (default: none, zeros).
  """
  schedule = np.zeros(2, np.int32) if schedule is None else schedule
  return {'num_steps': np.int32(num_steps), 'steps_per_epoch': np.int32(steps_per_epoch),
          'class_weights': np.asarray(class_weights, np.float32),
          'schedule': np.asarray(schedule, np.int32)}


def example_arguments(config, mesh, num_steps, *, num_rows=None, seed=0, abstract=False):
  """Arguments of `train_steps` after the state: a random uint8 data set on the devices.

  The benchmarks, the TPU compilation check and the device check run the real
  steps (gather, augmentation, loss, optimizer) on these.

  Args:
    config: the run's config (its batch size, image size and classes).
    mesh: the device mesh.
    num_steps: k, the steps of one dispatch.
    num_rows: rows of the random data set (default: two batches).
    seed: seed of the random images, labels and rows.
    abstract: ShapeDtypeStructs with shardings instead of arrays (to lower and
      compile without running).

  Returns:
    (metrics, inputs, data, rngs, values): the arguments after the state.
  """
  batch, size = config.train.batch_size, config.data.image_size
  num_rows = num_rows or 2 * batch
  rng = np.random.default_rng(seed)
  data = {'images': rng.integers(0, 256, (num_rows, size, size, 1), np.uint8),
          'labels': rng.integers(0, config.model.num_classes, num_rows).astype(np.int32)}
  inputs = {'row': rng.integers(0, num_rows, (num_steps, batch)).astype(np.int32),
            'position': np.arange(num_steps * batch, dtype=np.int32).reshape(num_steps, batch)}
  values = step_values(num_steps, 1000, np.ones(config.model.num_classes),
                       optimizers.schedule_values(config, 1000))
  repl, rows = sharding.replicated_sharding(mesh), sharding.data_sharding(mesh, batch_axis=1)
  if abstract:
    like = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
    metrics = jax.tree.map(lambda x: like(x, repl), jax.eval_shape(TrainMetrics.empty))
    return (metrics, jax.tree.map(lambda x: like(x, rows), inputs),
            jax.tree.map(lambda x: like(x, repl), data), {'dropout': key, 'augment': key},
            jax.tree.map(lambda x: like(np.asarray(x), repl), values))
  rngs = {'dropout': jax.random.key(seed + 1), 'augment': batches.augment_key(seed)}
  return (sharding.replicate_tree(TrainMetrics.empty(), mesh),
          sharding.to_global(sharding.local_rows(inputs, 1), rows), sharding.replicate_tree(data, mesh),
          sharding.replicate_tree(rngs, mesh), sharding.replicate_tree(values, mesh))
