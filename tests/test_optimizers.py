"""The optimizers: the one-cycle schedule's length a runtime value, SGD inside SAM unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax.model import sam
from simclr_jax.train import optimizers
from tests.conftest import tiny_config


@pytest.mark.parametrize('total_steps', [2, 7, 100, 960, 3001])
def test_runtime_schedule_equals_optax_onecycle_bit_for_bit(total_steps):
  config = tiny_config(None, 'pretrain', **{'pretrain.optimizer.warmup_fraction': 0.3})
  opt = config.pretrain.optimizer
  expected = optax.cosine_onecycle_schedule(
      transition_steps=total_steps, peak_value=opt.learning_rate, pct_start=0.3)
  boundaries = jnp.asarray(optimizers.schedule_values(config, total_steps))
  # One compiled function for every length: the boundaries are an argument.
  schedule = jax.jit(jax.vmap(lambda c, b: optimizers.learning_rate(config, c, b), (0, None)))
  counts = np.arange(total_steps + 3, dtype=np.int32)
  got = np.asarray(schedule(counts, boundaries))
  want = np.asarray(jax.jit(jax.vmap(expected))(counts))
  np.testing.assert_array_equal(got, want)
  other = schedule(counts, jnp.asarray(optimizers.schedule_values(config, 2 * total_steps)))
  assert schedule._cache_size() == 1 and not np.array_equal(np.asarray(other), got)


def _gradient_steps(tx, params, num_steps, **extra):
  """Updates of `tx` over a few steps of a quadratic loss; SAM gets its grad_fn."""
  loss = lambda p: sum(jnp.sum((x - 1.5) ** 2 * (i + 1)) for i, x in
                       enumerate(jax.tree.leaves(p)))
  grad_fn = lambda p, _: jax.grad(loss)(p)
  state = tx.init(params)
  history = []
  for _ in range(num_steps):
    updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=grad_fn,
                               **extra)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


@pytest.mark.parametrize('mode', ['none', 'asam'])
def test_pretraining_optimizer_equals_sgd_in_sam_at_a_fixed_length(mode):
  config = tiny_config(None, 'pretrain', **{'pretrain.sam': mode, 'pretrain.sam_rho': 0.5})
  section, total = config.pretrain, 12
  reference = optax.with_extra_args_support(sam.wrap(
      optax.chain(optax.add_decayed_weights(section.optimizer.weight_decay),
                  optax.sgd(optimizers.create_learning_rate_fn(config, total),
                            momentum=section.optimizer.momentum)),
      mode, section.sam_rho, eta=section.sam_eta))
  params = {'a': jnp.linspace(-1.0, 2.0, 6).reshape(2, 3), 'b': jnp.array([0.3, -0.7])}
  want = _gradient_steps(reference, params, 8)
  got = _gradient_steps(optimizers.create_optimizer(config), params, 8,
                        schedule=optimizers.schedule_values(config, total))
  for g, w in zip(got, want):
    jax.tree.map(np.testing.assert_array_equal, g, w)
  # Another length is another schedule through the same optimizer object.
  longer = _gradient_steps(optimizers.create_optimizer(config), params, 8,
                           schedule=optimizers.schedule_values(config, 1000))
  assert not np.allclose(longer[-1]['a'], got[-1]['a'])


def test_fine_tuning_keeps_its_constant_rate_and_ignores_the_schedule():
  config = tiny_config(None, 'baseline')
  rate = optimizers.create_learning_rate_fn(config, 10)
  assert float(rate(0)) == float(rate(9)) == pytest.approx(
      config.supervised.optimizer.learning_rate)
  params = {'a': jnp.ones((2, 2))}
  tx = optimizers.create_optimizer(config)
  a = _gradient_steps(tx, params, 3, schedule=np.array([1, 2], np.int32))
  b = _gradient_steps(tx, params, 3, schedule=np.array([5, 50], np.int32))
  np.testing.assert_array_equal(a[-1]['a'], b[-1]['a'])
