"""Tests of simclr_jax.sam against SAM/ASAM steps computed by hand in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax.model import sam

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


def _run_wrapped(mode, rho, num_steps, momentum):
  """Steps `sam.wrap(base, mode, rho)` as train.train_step calls it, under jit."""
  return _run_transformation(
      optax.with_extra_args_support(sam.wrap(_base_optimizer(momentum), mode, rho)),
      num_steps)


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
def test_wrapped_optimizer_matches_hand_computed_steps(
    mode, num_steps, momentum):
  _assert_trees_close(
      _run_wrapped(mode, RHO, num_steps, momentum),
      _numpy_sam_steps(num_steps, mode == 'asam', momentum))


def test_rho_zero_is_the_base_optimizer():
  base = _numpy_sam_steps(2, False, MOMENTUM, rho=0.0)  # Plain SGD + momentum.
  for mode in ('none', 'sam', 'asam'):
    _assert_trees_close(_run_wrapped(mode, 0.0, 2, MOMENTUM), base)
  for adaptive in (False, True):
    tx = sam.sam(_base_optimizer(MOMENTUM), 0.0, adaptive=adaptive)
    _assert_trees_close(_run_transformation(tx, 2), base)


def test_sam_update_takes_the_gradient_at_the_perturbed_weights():
  """The update applies g(w + e), not the clean gradient it was handed."""
  params = _float32(PARAMS)
  tx = sam.wrap(optax.sgd(1.0), 'asam', RHO)
  clean_grads, _ = jax.grad(_loss_fn, has_aux=True)(params)
  grad_fn = lambda p, _: jax.grad(_loss_fn, has_aux=True)(p)[0]
  updates, _ = tx.update(clean_grads, tx.init(params), params, grad_fn=grad_fn)
  e = _numpy_perturbation(_numpy_grad(PARAMS), PARAMS, adaptive=True)
  perturbed = _numpy_grad({k: PARAMS[k] + e[k] for k in PARAMS})
  _assert_trees_close({k: -updates[k] for k in updates}, perturbed)
  assert not np.allclose(-updates['w'], _numpy_grad(PARAMS)['w'])


@pytest.mark.parametrize('mode, expected_passes', [
    ('none', 1), ('sam', 2), ('asam', 2)])
def test_forward_backward_passes_per_step(mode, expected_passes):
  passes = []

  def counting_loss_fn(params):
    passes.append(mode)
    return _loss_fn(params)

  tx = optax.with_extra_args_support(sam.wrap(_base_optimizer(MOMENTUM), mode, RHO))

  def step(params):
    grads, _ = jax.grad(counting_loss_fn, has_aux=True)(params)
    grad_fn = lambda p, _: jax.grad(counting_loss_fn, has_aux=True)(p)[0]
    return tx.update(grads, tx.init(params), params, grad_fn=grad_fn)

  jax.make_jaxpr(step)(_float32(PARAMS))
  assert len(passes) == expected_passes


def test_zero_gradient_gives_finite_step():
  params = _float32(PARAMS)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for mode in ('sam', 'asam'):
    tx = sam.wrap(optax.sgd(1.0), mode, RHO)
    updates, _ = tx.update(zeros, tx.init(params), params, grad_fn=lambda p, _: zeros)
    assert all(np.isfinite(g).all() and not g.any()
               for g in jax.tree.leaves(updates))


def test_unknown_mode_names_the_config_field():
  with pytest.raises(ValueError, match='config.pretrain.sam'):
    sam.wrap(optax.sgd(0.1), 'adam', RHO)
