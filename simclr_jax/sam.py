"""Sharpness-aware minimisation: SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021).

One SAM step evaluates the gradient g at the weights w, moves to the worst
nearby point w + e, and hands the gradient there, g(w + e), to the base
optimizer, which updates w itself:

  SAM:   e = rho * g / ||g||
  ASAM:  e = rho * T^2 g / ||T g||,   T = |w| + eta  (element-wise)

ASAM's eta (default 0.01, the value of the ASAM authors' code) keeps weights
at zero perturbable. Unlike that code, which scales only tensors named
`weight`, T here scales every parameter (biases and BatchNorm scales too);
eta=0 gives the popular davda54/sam `adaptive=True` form.

Two entry points share `sam_perturbation`:

* `sam_step_gradients` (what train.py uses): the two passes inside a train
  step; the TrainState keeps the plain base optimizer, so `apply_gradients`
  and checkpoints stay as they are. BatchNorm statistics, the loss and the
  metrics all come from the clean pass; the perturbed pass's are discarded.

    def loss_fn(params):  # -> (loss, (new_batch_stats, metrics))
      ...                 # one dropout rng for both passes
    loss, (batch_stats, metrics), grads, grad_norm = sam.sam_step_gradients(
        loss_fn, state.params, config.sam, config.sam_rho)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)

* `sam(base_optimizer, rho)` / `asam(...)`: one optax transformation, built on
  `optax.contrib.sam` in opaque mode, for code that calls `tx.update` itself:

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_fn = lambda p, _: jax.grad(loss_fn, has_aux=True)(p)[0]
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)

Both work on the global batch under `jax.jit`: no collectives are needed.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

MODES = ('none', 'sam', 'asam')
ASAM_ETA = 0.01
# Floor of the gradient norm: a zero gradient gives a zero perturbation, not NaN.
_NORM_EPSILON = 1e-12


def sam_perturbation(grads, params, rho, adaptive=False, eta=ASAM_ETA):
  """The weight perturbation e of SAM (or ASAM when `adaptive`).

  Args:
    grads: gradient pytree at `params`.
    params: parameter pytree (used by ASAM only).
    rho: neighbourhood radius; 0 gives a zero perturbation.
    adaptive: ASAM's scale-invariant form instead of plain SAM.
    eta: ASAM's offset of the element-wise scale |w| + eta.

  Returns:
    A pytree like `params`: the e to add to the weights.
  """
  if not adaptive:
    scale = rho / (optax.tree.norm(grads) + _NORM_EPSILON)
    return jax.tree.map(lambda g: scale * g, grads)
  weight_scales = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
  scaled_grads = jax.tree.map(lambda t, g: t * g, weight_scales, grads)
  scale = rho / (optax.tree.norm(scaled_grads) + _NORM_EPSILON)
  return jax.tree.map(lambda t, tg: scale * t * tg, weight_scales, scaled_grads)


def adversarial_step(rho, adaptive=False, eta=ASAM_ETA):
  """SAM's ascent step as the `adv_optimizer` of `optax.contrib.sam`.

  `optax.contrib.sam` negates its adversarial optimizer's output (it expects a
  descent step such as `optax.sgd(rho)`), so this returns -e.

  Args:
    rho: neighbourhood radius.
    adaptive: ASAM instead of SAM.
    eta: ASAM's offset.

  Returns:
    A stateless `optax.GradientTransformation` that needs `params`.
  """

  def minus_perturbation(grads, params):
    if params is None:
      raise ValueError('SAM needs the parameters: call update(..., params).')
    return optax.tree.scale(-1.0, sam_perturbation(grads, params, rho,
                                                   adaptive, eta))

  return optax.stateless(minus_perturbation)


def sam(base_optimizer, rho, *, adaptive=False, eta=ASAM_ETA):
  """SAM (or ASAM) around any optax optimizer, as one transformation.

  Args:
    base_optimizer: the optimizer that applies the perturbed gradient (the
      reference: SGD with momentum 0.9 and a one-cycle cosine schedule).
    rho: neighbourhood radius.
    adaptive: ASAM instead of SAM.
    eta: ASAM's offset.

  Returns:
    A `GradientTransformationExtraArgs` whose `update(grads, state, params,
    grad_fn=...)` takes the clean gradient and `grad_fn(params, i) -> grads`,
    calls `grad_fn` once at w + e, and returns the base optimizer's update.
  """
  return optax.contrib.sam(
      base_optimizer, adversarial_step(rho, adaptive, eta),
      sync_period=2, opaque_mode=True)


def asam(base_optimizer, rho, *, eta=ASAM_ETA):
  """ASAM around any optax optimizer: `sam(..., adaptive=True)`."""
  return sam(base_optimizer, rho, adaptive=True, eta=eta)


def check_mode(mode):
  """Raises a ValueError naming the fix when `mode` is not a SAM mode."""
  if mode not in MODES:
    raise ValueError(
        f'Unknown SAM mode {mode!r}; set config.sam to one of {MODES}.')


def sam_step_gradients(
    loss_fn: Callable[[Any], tuple[jax.Array, Any]],
    params,
    mode: str,
    rho: float,
    *,
    eta: float = ASAM_ETA,
):
  """Loss, aux and the gradient to apply of one (A)SAM or plain step.

  Mode 'none' runs one forward/backward pass; 'sam' and 'asam' run two, the
  second at w + e, whose loss and aux are discarded.

  Args:
    loss_fn: `params -> (loss, aux)`; aux carries e.g. new BatchNorm statistics
      and metrics. It must fix its own randomness (dropout rng) so that both
      passes see the same function.
    params: parameter pytree.
    mode: 'none', 'sam' or 'asam' (config.sam); a Python string.
    rho: neighbourhood radius (config.sam_rho).
    eta: ASAM's offset.

  Returns:
    (loss, aux, grads, grad_norm): loss and aux of the clean pass, the gradient
    for the base optimizer (at w + e, or at w for 'none'), and the global norm
    of the clean gradient.
  """
  check_mode(mode)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  grad_norm = optax.tree.norm(grads)
  if mode != 'none':
    perturbation = sam_perturbation(grads, params, rho,
                                    adaptive=mode == 'asam', eta=eta)
    grads, _ = jax.grad(loss_fn, has_aux=True)(
        optax.apply_updates(params, perturbation))
  return loss, aux, grads, grad_norm
