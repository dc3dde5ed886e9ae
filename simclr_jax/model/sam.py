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

`sam(base_optimizer, rho)` / `asam(...)` build one optax transformation on
`optax.contrib.sam` in opaque mode; `wrap(tx, mode, rho)` is what the optimizer
factory (state.py) calls with `config.pretrain.sam`. A train step computes the clean
gradient itself and hands SAM a `grad_fn` for the perturbed pass:

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_fn = lambda p, _: jax.grad(loss_fn, has_aux=True)(p)[0]
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)

Opaque mode is what BatchNorm needs: the perturbed pass happens inside
`update`, so the step keeps the BatchNorm statistics, the loss and the metrics
of the clean pass and discards those of the perturbed one (`loss_fn` must fix
its own randomness, e.g. one dropout rng, so that both passes see the same
function). Plain optimizers ignore `grad_fn` (`optax.with_extra_args_support`).

Both work on the global batch under `jax.jit`: no collectives are needed.
"""

import jax
import jax.numpy as jnp
import optax

from simclr_jax import errors

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
    raise errors.UserError(
        f'Unknown SAM mode {mode!r}; set --config.pretrain.sam to one of {MODES}.')


def wrap(base_optimizer, mode, rho, *, eta=ASAM_ETA):
  """`base_optimizer` inside SAM or ASAM, or unchanged for mode 'none'.

  Args:
    base_optimizer: the optimizer that applies the (perturbed) gradient.
    mode: 'none', 'sam' or 'asam' (config.pretrain.sam).
    rho: neighbourhood radius (config.pretrain.sam_rho).
    eta: ASAM's offset (config.pretrain.sam_eta).

  Returns:
    An optax transformation; with SAM, `update` needs `params` and `grad_fn`.
  """
  check_mode(mode)
  if mode == 'none':
    return base_optimizer
  return sam(base_optimizer, rho, adaptive=mode == 'asam', eta=eta)
