"""The optimizer of each model kind, SAM/ASAM included, and its learning-rate schedule.

The SimCLR model trains with SGD + momentum inside SAM/ASAM and a one-cycle cosine
schedule (the reference), the classifier with AdamW at a constant learning rate.

The one-cycle schedule's length is a runtime value, not a constant of the compiled
step: `schedule_values(config, total_steps)` gives its boundaries, which the train
step passes to the optimizer's update (`schedule=...`), so pretrainings of any
length (the folds of a sweep differ in size) share one compiled step. The values
it gives equal `optax.cosine_onecycle_schedule`'s bit for bit (tests/test_optimizers.py).
"""

import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax.model import sam
from simclr_jax.train import kinds

# optax.cosine_onecycle_schedule's defaults: start at peak / 25, end at peak / 25e4.
_DIV_FACTOR, _FINAL_DIV_FACTOR = 25.0, 1e4


def schedule_values(config, total_steps):
  """The schedule's runtime values: int32 [2], the one-cycle's (peak step, last step).

  Computed on the host as `optax.cosine_onecycle_schedule` computes its boundaries
  (the warm-up's end truncated from `warmup_fraction * total`). The constant
  schedule of fine-tuning ignores them.
  """
  if kinds.model_kind(config) != 'simclr':
    return np.zeros(2, np.int32)
  total = max(total_steps, 2)
  return np.array([int(config.pretrain.optimizer.warmup_fraction * total), int(total)],
                  np.int32)


def onecycle(count, boundaries, peak_value):
  """`optax.cosine_onecycle_schedule(T, peak_value, pct_start)(count)` with traced boundaries.

  The same operations as optax's `piecewise_interpolate_schedule('cosine', ...)`,
  whose boundaries must be Python ints; here they are `schedule_values`' array.
  """
  bounds = jnp.concatenate([jnp.zeros(1, boundaries.dtype), boundaries])
  values = jnp.cumprod(jnp.stack((peak_value / _DIV_FACTOR, _DIV_FACTOR,
                                  1.0 / (_DIV_FACTOR * _FINAL_DIV_FACTOR))))
  interval_sizes = jnp.maximum(bounds[1:] - bounds[:-1], 1)
  indicator = jnp.logical_and(bounds[:-1] <= count, count < bounds[1:])
  pct = (count - bounds[:-1]) / interval_sizes
  start, end = values[:-1], values[1:]
  interpolated = end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1)
  return indicator.dot(interpolated) + (bounds[-1] <= count) * values[-1]


def learning_rate(config, count, boundaries):
  """The learning rate at optimizer step `count` (jittable): one-cycle or constant."""
  if kinds.model_kind(config) == 'simclr':
    return onecycle(count, boundaries, config.pretrain.optimizer.learning_rate)
  return jnp.asarray(config.supervised.optimizer.learning_rate, jnp.float32)


def create_learning_rate_fn(config, total_steps):
  """step -> learning rate on the host, for the summaries: `learning_rate` at this length."""
  boundaries = jnp.asarray(schedule_values(config, total_steps))
  return lambda step: learning_rate(config, jnp.asarray(step, jnp.int32), boundaries)


def scale_by_runtime_schedule(config):
  """optax.scale_by_learning_rate of `learning_rate`, its boundaries given to `update`.

  `update(updates, state, params, schedule=boundaries)`; state and arithmetic are
  optax's own (`scale_by_schedule`), so the updates equal those of the schedule
  built at a fixed length.
  """
  make = lambda boundaries: optax.scale_by_learning_rate(
      lambda count: learning_rate(config, count, boundaries))

  def update(updates, state, params=None, *, schedule, **extra_args):
    del extra_args
    return make(jnp.asarray(schedule)).update(updates, state, params)

  return optax.GradientTransformationExtraArgs(make(jnp.zeros(2, jnp.int32)).init, update)


def _only_grad_fn(tx):
  """`tx` (SAM) given only the `grad_fn` extra argument (optax passes every one to all)."""

  def update(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    return tx.update(updates, state, params, grad_fn=grad_fn)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def create_optimizer(config):
  """The mode's optimizer as one optax transformation, SAM/ASAM included.

  SGD + momentum (pretrain) or AdamW (finetune, baseline), wrapped in the SAM or
  ASAM transform of `model/sam.py` when `config.pretrain.sam` (pretrain) or
  `config.supervised.sam` asks for it. `update` takes the extra arguments
  `grad_fn` (SAM's perturbed pass; the others ignore it) and `schedule`
  (`schedule_values`). SGD's learning rate is applied after SAM, as the last
  step of the chain: SGD is momentum then the learning rate, so this is SGD
  inside SAM with the schedule's length a runtime value. A linear probe's
  frozen encoder gets no updates (not even weight decay).
  """
  if kinds.model_kind(config) == 'simclr':
    section = config.pretrain
    tx = optax.chain(optax.add_decayed_weights(section.optimizer.weight_decay),
                     optax.trace(decay=section.optimizer.momentum))
  else:
    section = config.supervised
    tx = optax.adamw(optax.constant_schedule(section.optimizer.learning_rate),
                     weight_decay=section.optimizer.weight_decay)
  frozen = kinds.frozen_subtrees(config)
  if frozen:
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        lambda params: {k: 'frozen' if k in frozen else 'train' for k in params})
  # SAM outermost but for the learning rate: its perturbed pass sees every parameter
  # (the frozen ones get a zero gradient, hence no perturbation: see steps.train_step).
  tx = _only_grad_fn(sam.wrap(tx, section.sam, section.sam_rho, eta=section.sam_eta))
  if kinds.model_kind(config) == 'simclr':
    tx = optax.chain(tx, scale_by_runtime_schedule(config))
  return optax.with_extra_args_support(tx)
