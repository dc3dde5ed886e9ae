"""Tests of simclr_jax.losses against direct NumPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax.model import losses


def _numpy_nt_xent(z1, z2, temperature):
  """NT-Xent and contrastive accuracy by a double loop in float64."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  n = len(z)
  loss, hits = 0.0, 0
  for i in range(n):
    positive = (i + n // 2) % n
    similarities = {}
    for j in range(n):
      if j != i:
        similarities[j] = z[i] @ z[j] / (
            np.linalg.norm(z[i]) * np.linalg.norm(z[j]) * temperature)
    denominator = sum(np.exp(s) for s in similarities.values())
    loss -= np.log(np.exp(similarities[positive]) / denominator)
    hits += max(similarities, key=similarities.get) == positive
  return loss / n, hits / n


def _random_pairs(num_pairs, dims=16, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_pairs, dims)).astype(np.float32),
          rng.normal(size=(num_pairs, dims)).astype(np.float32))


@pytest.mark.parametrize('num_pairs', [1, 2, 5, 8])
@pytest.mark.parametrize('temperature', [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_loss_matches_numpy(num_pairs, temperature):
  z1, z2 = _random_pairs(num_pairs, seed=num_pairs)
  expected_loss, _ = _numpy_nt_xent(z1, z2, temperature)
  loss = losses.nt_xent_loss(z1, z2, temperature)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)


def test_nt_xent_loss_matches_optax_ntxent():
  z1, z2 = _random_pairs(6, seed=1)
  group = np.concatenate([np.arange(6), np.arange(6)])
  expected = optax.losses.ntxent(jnp.concatenate([z1, z2]), group, 0.2)
  np.testing.assert_allclose(
      losses.nt_xent_loss(z1, z2, 0.2), expected, rtol=1e-5)


def test_nt_xent_accuracy_matches_numpy():
  z1, z2 = _random_pairs(8, dims=4, seed=2)
  z2 = z1 + 0.7 * z2  # Partly aligned: some anchors right, some wrong.
  _, expected_accuracy = _numpy_nt_xent(z1, z2, 1.0)
  assert 0.0 < expected_accuracy < 1.0
  np.testing.assert_allclose(losses.nt_xent_accuracy(z1, z2),
                             expected_accuracy)


def test_nt_xent_is_invariant_to_scaling_each_projection():
  z1, z2 = _random_pairs(5, seed=3)
  scales = np.random.default_rng(4).uniform(0.01, 100.0, size=(5, 1))
  np.testing.assert_allclose(
      losses.nt_xent_loss(z1 * scales, z2 * 7.3, 0.1),
      losses.nt_xent_loss(z1, z2, 0.1), rtol=1e-5)


def test_aligned_pairs_have_lower_loss_and_full_accuracy():
  z1, z2 = _random_pairs(8, seed=5)
  aligned_loss = losses.nt_xent_loss(z1, 2.0 * z1, 0.5)
  random_loss = losses.nt_xent_loss(z1, z2, 0.5)
  assert aligned_loss < random_loss
  assert losses.nt_xent_accuracy(z1, 2.0 * z1) == 1.0


def test_nt_xent_gradient_is_finite_for_a_zero_projection_under_jit():
  z1, z2 = _random_pairs(4, seed=6)
  z1[0] = 0.0
  grad_fn = jax.jit(jax.grad(losses.nt_xent_loss, argnums=(0, 1)))
  grads = grad_fn(z1, z2, jnp.float32(0.1))
  assert all(np.isfinite(g).all() for g in grads)


def test_nt_xent_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='same shape'):
    losses.nt_xent_loss(np.zeros((4, 8)), np.zeros((3, 8)), 0.5)


def _numpy_cross_entropy(logits, labels):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels]


def test_cross_entropy_loss_matches_numpy():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=6)
  per_example = _numpy_cross_entropy(logits, labels)
  np.testing.assert_allclose(
      losses.cross_entropy_loss(logits, labels), per_example.mean(),
      rtol=1e-6)
  weights = np.array([1, 0, 1, 1, 0, 0.5], np.float32)
  np.testing.assert_allclose(
      losses.cross_entropy_loss(logits, labels, weights),
      (weights * per_example).sum() / weights.sum(), rtol=1e-6)
  valid = np.array([True, True, False, False, False, False])
  np.testing.assert_allclose(
      losses.cross_entropy_loss(logits, labels, valid), per_example[:2].mean(),
      rtol=1e-6)


def test_cross_entropy_loss_of_an_all_padding_batch_is_zero():
  loss = losses.cross_entropy_loss(np.ones((3, 4)), np.zeros(3, np.int32),
                                   np.zeros(3))
  assert loss == 0.0


@pytest.mark.parametrize('epoch_loss, expected', [
    (3.5, 0.5), (3.0, 0.5), (2.5, 0.3), (1.5, 0.1), (0.5, 0.05)])
def test_temperature_for_loss_steps_down(epoch_loss, expected):
  steps = ((3.0, 0.3), (2.0, 0.1), (1.0, 0.05))
  assert losses.temperature_for_loss(epoch_loss, 0.5, steps) == np.float32(expected)
  # Inside jit too (the train step runs it at each epoch's end).
  assert jax.jit(losses.temperature_for_loss, static_argnums=(1, 2))(
      epoch_loss, 0.5, steps) == np.float32(expected)


def test_temperature_for_loss_without_steps_is_base():
  assert losses.temperature_for_loss(0.0, 0.5, ()) == np.float32(0.5)
