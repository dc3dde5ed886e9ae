"""Losses: SimCLR's NT-Xent, weighted cross entropy, and the temperature step-down.

The losses are plain `jnp` over the GLOBAL batch: under `jax.jit` with sharded
inputs XLA inserts the cross-device gathers itself, so no collectives appear
here. Every function computes in float32 whatever the model's compute dtype.
"""

import jax
import jax.numpy as jnp
import optax

# Replaces a view's similarity with itself so that softmax ignores it; finite
# because -inf turns into NaN as soon as it meets a zero factor.
_SELF_SIMILARITY_MASK = -1e9
# Squared-norm floor of l2-normalisation: a zero embedding stays finite.
_NORM_EPSILON = 1e-12


def _l2_normalize(x):
  """Scales each row of `x` to unit l2 norm (a zero row stays zero)."""
  squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPSILON))


def _contrastive_logits(z1, z2, temperature):
  """Similarity logits of the 2N views and the index of each view's positive.

  Written with one matmul instead of `optax.losses.ntxent`, which builds the
  similarity matrix by broadcasting to [2N, 2N, D] and has no accuracy.

  Args:
    z1: [N, D] projections of the first views.
    z2: [N, D] projections of the second views; z2[i] is z1[i]'s positive.
    temperature: softmax temperature (a float or a scalar array).

  Returns:
    logits: [2N, 2N] cosine similarities / temperature, self-similarity masked.
    positives: int32 [2N], the column of each row's positive.
  """
  if z1.shape != z2.shape or z1.ndim != 2:
    raise ValueError(
        f'nt_xent expects two [N, D] arrays of the same shape, got {z1.shape} '
        f'and {z2.shape}; flatten the projections to [batch, features].')
  num_pairs = z1.shape[0]
  z = _l2_normalize(jnp.concatenate([z1, z2], axis=0).astype(jnp.float32))
  # Full float32 products: at a GPU's or TPU's default precision (TF32, one bf16 pass)
  # cosines near 1 lose ~3 digits, which a temperature of 0.05 multiplies by 20.
  logits = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
  logits = jnp.where(jnp.eye(2 * num_pairs, dtype=bool),
                     _SELF_SIMILARITY_MASK, logits)
  index = jnp.arange(num_pairs, dtype=jnp.int32)
  positives = jnp.concatenate([index + num_pairs, index])
  return logits, positives


def nt_xent_loss(z1, z2, temperature):
  """SimCLR's normalised-temperature cross entropy (NT-Xent) of a batch of pairs.

  The 2N views are anchors in turn: view i's positive is the other view of the
  same image, the remaining 2N - 2 views are its negatives, similarity is the
  cosine divided by `temperature`. The loss is the mean over the 2N anchors of
  -log softmax(similarities)[positive].

  Args:
    z1: [N, D] projections of the first views of N images.
    z2: [N, D] projections of the second views (z2[i] pairs with z1[i]).
    temperature: positive float or scalar array (an array avoids recompiling
      when the step-down changes it).

  Returns:
    The scalar float32 loss.
  """
  logits, positives = _contrastive_logits(z1, z2, temperature)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, positives).mean()


def nt_xent_accuracy(z1, z2):
  """Share of the 2N views whose most similar other view is their positive.

  Args:
    z1: [N, D] projections of the first views.
    z2: [N, D] projections of the second views.

  Returns:
    Scalar float32 in [0, 1]; independent of the temperature.
  """
  logits, positives = _contrastive_logits(z1, z2, 1.0)
  return jnp.mean(jnp.argmax(logits, axis=-1) == positives)


def cross_entropy_loss(logits, labels, weights=None):
  """Softmax cross entropy averaged over the (weighted) examples.

  Args:
    logits: [B, C] class scores.
    labels: int [B] class indices.
    weights: optional [B] example weights, e.g. the `valid` mask of a padded
      eval batch; None weighs every example 1.

  Returns:
    sum(weights * loss) / sum(weights) as float32; 0 when every weight is 0.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if weights is None:
    return losses.mean()
  weights = jnp.asarray(weights, jnp.float32)
  total_weight = jnp.sum(weights)
  # The floor only matters for an all-padding batch, whose numerator is 0.
  return jnp.sum(weights * losses) / jnp.maximum(
      total_weight, jnp.finfo(jnp.float32).tiny)


def temperature_for_loss(epoch_loss, base_temperature, steps):
  """The reference's NT-Xent temperature step-down, from an epoch's mean loss.

  With `steps = ((3.0, 0.3), (2.0, 0.1), (1.0, 0.05))` and base 0.5: a loss of
  3.5 keeps 0.5, 2.5 gives 0.3, 1.5 gives 0.1 and 0.5 gives 0.05.

  The result depends on the current loss only, so a loss that rises back above
  a threshold raises the temperature again; a caller that wants a one-way
  step-down takes the min with the current temperature. Written with
  `jnp.where`, so it runs inside the jitted train step at each epoch's end.

  Args:
    epoch_loss: mean NT-Xent loss of the epoch just finished (float or scalar array).
    base_temperature: temperature while no threshold has been passed.
    steps: (threshold, temperature) pairs (config.pretrain.temperature_steps).

  Returns:
    float32 scalar: the temperature of the last pair, in order, whose threshold
    `epoch_loss` is strictly below, else `base_temperature`.
  """
  temperature = jnp.float32(base_temperature)
  for threshold, step_temperature in steps:
    temperature = jnp.where(epoch_loss < threshold, jnp.float32(step_temperature),
                            temperature)
  return temperature


# ----------------------------------------------------------------------------- model losses


def simclr_loss(params, batch_stats, batch, rng, temperature, *, apply_fn,
                     joint_views):
  """NT-Xent of the two views; returns (loss, (new batch_stats, accuracy))."""
  variables = {'params': params, 'batch_stats': batch_stats}
  image1, image2 = batch['image1'], batch['image2']
  if joint_views:
    # Both views in one pass, BatchNorm over the 2N views (SimCLR's own choice).
    # Interleaving keeps each device's rows local: device d holds rows of both views.
    n = image1.shape[0]
    x = jnp.stack([image1, image2], axis=1).reshape((2 * n,) + image1.shape[1:])
    (_, z), updates = apply_fn(variables, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': rng})
    z = z.reshape((n, 2, -1))
    z1, z2 = z[:, 0], z[:, 1]
    new_stats = updates['batch_stats']
  else:
    # The reference: two separate calls, BatchNorm statistics per view batch.
    rng1, rng2 = jax.random.split(rng)
    (_, z1), updates = apply_fn(variables, image1, train=True, mutable=['batch_stats'],
                                rngs={'dropout': rng1})
    variables = {'params': params, 'batch_stats': updates['batch_stats']}
    (_, z2), updates = apply_fn(variables, image2, train=True, mutable=['batch_stats'],
                                rngs={'dropout': rng2})
    new_stats = updates['batch_stats']
  loss = nt_xent_loss(z1, z2, temperature)
  return loss, (new_stats, nt_xent_accuracy(z1, z2))


def supervised_loss(params, batch_stats, batch, rng, temperature, *, apply_fn):
  """Cross entropy weighted by batch['weight']; returns (loss, (new batch_stats, accuracy))."""
  del temperature
  logits, updates = apply_fn({'params': params, 'batch_stats': batch_stats},
                             batch['image'], train=True, mutable=['batch_stats'],
                             rngs={'dropout': rng})
  loss = cross_entropy_loss(logits, batch['label'], batch.get('weight'))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return loss, (updates['batch_stats'], accuracy)
