"""Tests of simclr_jax.sam against SAM/ASAM steps computed by hand in NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from simclr_jax import sam

RHO = 0.5
LEARNING_RATE = 0.1
MOMENTUM = 0.9

# A tiny least-squares problem: loss(w, b) = mean((x @ w + b - y)^2).
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(8, 3))
Y = _RNG.normal(size=8)
PARAMS = {'w': np.array([0.5, -1.0, 0.0]), 'b': np.array([0.2])}


def _numpy_grad(params):
  residual = X @ params['w'] + params['b'] - Y
  return {'w': 2 * X.T @ residual / len(Y), 'b': np.array([2 * residual.mean()])}


def _numpy_perturbation(grads, params, adaptive, rho=RHO, eta=sam.ASAM_ETA):
  """e = rho * T^2 g / ||T g|| with T = |w| + eta (ASAM) or T = 1 (SAM)."""
  scale = {k: np.abs(params[k]) + eta if adaptive else np.ones_like(params[k])
           for k in params}
  norm = np.sqrt(sum(np.sum((scale[k] * grads[k])**2) for k in params))
  return {k: rho * scale[k]**2 * grads[k] / norm for k in params}


def _numpy_sam_steps(num_steps, adaptive, momentum, rho=RHO):
  """Perturb-then-descend with SGD (+ optax-style momentum trace) by hand."""
  params = {k: v.copy() for k, v in PARAMS.items()}
  trace = {k: np.zeros_like(v) for k, v in params.items()}
  for _ in range(num_steps):
    e = _numpy_perturbation(_numpy_grad(params), params, adaptive, rho)
    perturbed_grads = _numpy_grad({k: params[k] + e[k] for k in params})
    for k in params:
      trace[k] = momentum * trace[k] + perturbed_grads[k]
      params[k] = params[k] - LEARNING_RATE * trace[k]
  return params


def _loss_fn(params):
  """Least-squares loss with an aux that depends on the parameters."""
  residual = X.astype(np.float32) @ params['w'] + params['b'] - Y
  loss = jnp.mean(residual**2)
  return loss, {'loss': loss, 'w_sum': jnp.sum(params['w'])}


def _float32(tree):
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree)


def _base_optimizer(momentum):
  return optax.sgd(LEARNING_RATE, momentum=momentum or None)


def _run_transformation(tx, num_steps):
  """Steps `tx` as `tx.update(clean_grads, ..., grad_fn=...)` under jit."""

  @jax.jit
  def step(params, opt_state):
    grads, _ = jax.grad(_loss_fn, has_aux=True)(params)
    grad_fn = lambda p, _: jax.grad(_loss_fn, has_aux=True)(p)[0]
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state

  params = _float32(PARAMS)
  opt_state = tx.init(params)
  for _ in range(num_steps):
    params, opt_state = step(params, opt_state)
  return params


def _run_step_gradients(mode, rho, num_steps, momentum):
  """Steps the base optimizer on `sam_step_gradients` under jit."""
  tx = _base_optimizer(momentum)

  @jax.jit
  def step(params, opt_state):
    _, _, grads, _ = sam.sam_step_gradients(_loss_fn, params, mode, rho)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = _float32(PARAMS)
  opt_state = tx.init(params)
  for _ in range(num_steps):
    params, opt_state = step(params, opt_state)
  return params


def _assert_trees_close(actual, expected, rtol=1e-5):
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=rtol,
                               atol=1e-6, err_msg=key)


@pytest.mark.parametrize('adaptive', [False, True])
def test_sam_perturbation_matches_numpy(adaptive):
  grads = _numpy_grad(PARAMS)
  e = sam.sam_perturbation(_float32(grads), _float32(PARAMS), RHO, adaptive)
  _assert_trees_close(e, _numpy_perturbation(grads, PARAMS, adaptive))


@pytest.mark.parametrize('adaptive', [False, True])
@pytest.mark.parametrize('num_steps, momentum', [(1, 0.0), (2, MOMENTUM)])
def test_sam_transformation_matches_hand_computed_steps(
    adaptive, num_steps, momentum):
  tx = sam.sam(_base_optimizer(momentum), RHO, adaptive=adaptive)
  _assert_trees_close(_run_transformation(tx, num_steps),
                      _numpy_sam_steps(num_steps, adaptive, momentum))


def test_asam_is_adaptive_sam():
  tx = sam.asam(_base_optimizer(MOMENTUM), RHO)
  _assert_trees_close(_run_transformation(tx, 2),
                      _numpy_sam_steps(2, True, MOMENTUM))


@pytest.mark.parametrize('mode', ['sam', 'asam'])
@pytest.mark.parametrize('num_steps, momentum', [(1, 0.0), (2, MOMENTUM)])
def test_sam_step_gradients_match_hand_computed_steps(
    mode, num_steps, momentum):
  _assert_trees_close(
      _run_step_gradients(mode, RHO, num_steps, momentum),
      _numpy_sam_steps(num_steps, mode == 'asam', momentum))


def test_rho_zero_is_the_base_optimizer():
  base = _numpy_sam_steps(2, False, MOMENTUM, rho=0.0)  # Plain SGD + momentum.
  for mode in ('none', 'sam', 'asam'):
    _assert_trees_close(_run_step_gradients(mode, 0.0, 2, MOMENTUM), base)
  for adaptive in (False, True):
    tx = sam.sam(_base_optimizer(MOMENTUM), 0.0, adaptive=adaptive)
    _assert_trees_close(_run_transformation(tx, 2), base)


def test_sam_step_gradients_returns_clean_loss_aux_and_grad_norm():
  params = _float32(PARAMS)
  loss, aux, grads, grad_norm = sam.sam_step_gradients(
      _loss_fn, params, 'asam', RHO)
  clean_loss, clean_aux = _loss_fn(params)
  np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
  np.testing.assert_allclose(aux['w_sum'], clean_aux['w_sum'], rtol=1e-6)
  clean_grads = _numpy_grad(PARAMS)
  np.testing.assert_allclose(
      grad_norm, np.sqrt(sum(np.sum(g**2) for g in clean_grads.values())),
      rtol=1e-5)
  assert not np.allclose(grads['w'], clean_grads['w'])  # Perturbed pass.


@pytest.mark.parametrize('mode, expected_passes', [
    ('none', 1), ('sam', 2), ('asam', 2)])
def test_forward_backward_passes_per_step(mode, expected_passes):
  passes = []

  def counting_loss_fn(params):
    passes.append(mode)
    return _loss_fn(params)

  jax.make_jaxpr(lambda p: sam.sam_step_gradients(
      counting_loss_fn, p, mode, RHO))(_float32(PARAMS))
  assert len(passes) == expected_passes


def test_zero_gradient_gives_finite_step():
  params = _float32(PARAMS)
  flat_loss_fn = lambda p: (0.0 * _loss_fn(p)[0], None)
  for mode in ('sam', 'asam'):
    _, _, grads, _ = sam.sam_step_gradients(flat_loss_fn, params, mode, RHO)
    assert all(np.isfinite(g).all() and not g.any()
               for g in jax.tree.leaves(grads))


def test_unknown_mode_names_the_config_field():
  with pytest.raises(ValueError, match='config.sam'):
    sam.sam_step_gradients(_loss_fn, _float32(PARAMS), 'adam', RHO)


class _TinyBatchNormModel(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(1)(nn.relu(x))[:, 0]


class _TrainState(train_state.TrainState):
  batch_stats: dict


def test_batch_stats_come_from_the_clean_pass_of_a_jitted_train_step():
  model = _TinyBatchNormModel()
  x, y = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  state = _TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def train_step(state):
    def loss_fn(params):
      predictions, updates = state.apply_fn(
          {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
          mutable=['batch_stats'])
      loss = jnp.mean((predictions - y)**2)
      return loss, (updates['batch_stats'], {'loss': loss})

    loss, (batch_stats, metrics), grads, grad_norm = sam.sam_step_gradients(
        loss_fn, state.params, 'asam', 2.0)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), (
        loss, metrics, grad_norm, batch_stats, loss_fn(state.params))

  new_state, (loss, metrics, grad_norm, batch_stats, clean) = train_step(state)
  clean_loss, (clean_batch_stats, _) = clean
  np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], clean_loss, rtol=1e-6)
  assert np.isfinite(grad_norm)
  for actual, expected in zip(jax.tree.leaves(new_state.batch_stats),
                              jax.tree.leaves(clean_batch_stats)):
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
  assert new_state.step == 1
  assert not np.allclose(new_state.params['Dense_0']['kernel'],
                         state.params['Dense_0']['kernel'])
