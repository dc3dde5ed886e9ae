"""Tests of Grad-CAM, its variants and the CAM quality measures.

Known answers come from hand-built models whose maps can be written down: a
feature map A (sown and perturbed as `stage4`) followed by global average
pooling and a linear layer, where d logit_k / d A_ijc = W_ck / (h w) for every
position, or followed by flattening and a linear layer, where the gradient
varies over positions.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simclr_jax import gradcam
from simclr_jax import models


class PooledLinear(nn.Module):
  """A = ReLU(x @ conv); logits = mean_ij(A) @ dense (the CAM paper's setting)."""
  num_classes: int = 3
  features: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    del train
    a = nn.relu(nn.Conv(self.features, (1, 1), use_bias=False, name='conv')(x))
    a = self.perturb('stage4', a)
    self.sow('intermediates', 'stage4', a)
    return nn.Dense(self.num_classes, use_bias=False, name='dense')(a.mean(axis=(1, 2)))


class FlattenLinear(nn.Module):
  """A = ReLU(x @ conv); logits = flatten(A) @ dense (the reference's flatten head)."""
  num_classes: int = 3
  features: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    del train
    a = nn.relu(nn.Conv(self.features, (1, 1), use_bias=False, name='conv')(x))
    a = self.perturb('stage4', a)
    self.sow('intermediates', 'stage4', a)
    return nn.Dense(self.num_classes, use_bias=False, name='dense')(
        a.reshape((a.shape[0], -1)))


def _hand_model(module, size=6, channels=2, seed=0, batch=3):
  """The module with random (seeded) weights of our choosing, and a batch of images."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, size, size, channels)).astype(np.float32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), images))['params']
  params = {name: {'kernel': rng.normal(size=layer['kernel'].shape).astype(np.float32)}
            for name, layer in shapes.items()}
  return {'params': params}, images


def _activations(variables, images):
  return np.maximum(images @ variables['params']['conv']['kernel'][0, 0], 0.0)


def _normalise(maps):
  maps = np.maximum(maps, 0.0)
  peak = maps.max(axis=(1, 2), keepdims=True)
  return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def test_gradcam_of_pooled_linear_model_is_the_class_activation_map():
  model = PooledLinear()
  variables, images = _hand_model(model)
  heatmaps, logits = gradcam.cam(model, variables, images, 'gradcam')
  a = _activations(variables, images)
  dense = variables['params']['dense']['kernel']  # [C, K]
  np.testing.assert_allclose(logits, a.mean(axis=(1, 2)) @ dense, rtol=1e-5)
  predicted = logits.argmax(-1)
  expected = _normalise(np.einsum('nhwc,cn->nhw', a, dense[:, predicted]))
  assert heatmaps.shape == images.shape[:3]
  np.testing.assert_allclose(heatmaps, expected, atol=1e-5)
  # An explicitly chosen class gets that class's map.
  heatmaps, _ = gradcam.cam(model, variables, images, 'gradcam', class_index=[0, 1, 2])
  expected = _normalise(np.einsum('nhwc,cn->nhw', a, dense[:, [0, 1, 2]]))
  np.testing.assert_allclose(heatmaps, expected, atol=1e-5)


def test_hirescam_equals_gradcam_when_the_gradient_is_constant_over_space():
  model = PooledLinear()
  variables, images = _hand_model(model, seed=1)
  for k in range(3):
    gradcam_maps, _ = gradcam.cam(model, variables, images, 'gradcam', class_index=k)
    hirescam_maps, _ = gradcam.cam(model, variables, images, 'hirescam', class_index=k)
    np.testing.assert_allclose(hirescam_maps, gradcam_maps, atol=1e-5)


def test_gradcam_plus_plus_closed_form_ignores_negative_gradients():
  model = PooledLinear()
  variables, images = _hand_model(model, seed=2)
  size = images.shape[1] * images.shape[2]
  a = _activations(variables, images)
  dense = variables['params']['dense']['kernel']
  for k in range(3):
    heatmaps, _ = gradcam.cam(model, variables, images, 'gradcam++', class_index=k)
    g = dense[:, k] / size  # The same gradient at every position.
    # alpha = g^2 / (2 g^2 + sum(A) g^3) = 1 / (2 + sum(A) g); weight = alpha * ReLU(g).
    weights = np.maximum(g, 0.0) / (2.0 + a.sum(axis=(1, 2)) * g)
    expected = _normalise(np.einsum('nhwc,nc->nhw', a, weights))
    np.testing.assert_allclose(heatmaps, expected, atol=1e-5)
    # Channels of negative weight lower Grad-CAM's map but not Grad-CAM++'s.
    assert (dense[:, k] < 0).any() and (dense[:, k] > 0).any()


def test_hirescam_and_gradcam_differ_as_derived_for_a_flatten_head():
  model = FlattenLinear()
  variables, images = _hand_model(model, size=4, seed=3)
  a = _activations(variables, images)
  n, h, w, c = a.shape
  dense = variables['params']['dense']['kernel'].reshape(h, w, c, -1)
  k = 1
  gradients = dense[..., k]  # d logit_k / d A: different at every position.
  hirescam_maps, _ = gradcam.cam(model, variables, images, 'hirescam', class_index=k)
  gradcam_maps, _ = gradcam.cam(model, variables, images, 'gradcam', class_index=k)
  np.testing.assert_allclose(
      hirescam_maps, _normalise(np.einsum('nhwc,hwc->nhw', a, gradients)), atol=1e-5)
  np.testing.assert_allclose(
      gradcam_maps, _normalise(np.einsum('nhwc,c->nhw', a, gradients.mean(axis=(0, 1)))),
      atol=1e-5)
  assert np.abs(hirescam_maps - gradcam_maps).max() > 0.1


def test_maps_are_upsampled_to_the_input_and_normalised():
  maps = jnp.zeros((2, 2, 2)).at[0, 0, 1].set(3.0).at[1].set(0.5)
  heatmaps = np.asarray(gradcam.upsample_and_normalise(maps, (8, 8)))
  assert heatmaps.shape == (2, 8, 8)
  assert heatmaps.min() >= 0.0 and heatmaps.max() == pytest.approx(1.0)
  # The hot cell (top right) stays the brightest quadrant; a flat map stays flat.
  hot = np.unravel_index(heatmaps[0].argmax(), (8, 8))
  assert hot[0] < 4 <= hot[1]
  assert heatmaps[0, :4, 4:].mean() > heatmaps[0, 4:, :4].mean() + 0.5
  np.testing.assert_allclose(heatmaps[1], 1.0)
  # A map without positive evidence stays zero instead of dividing by zero.
  zero = np.asarray(gradcam.upsample_and_normalise(jnp.zeros((1, 2, 2)), (4, 4)))
  np.testing.assert_array_equal(zero, 0.0)


def _tiny_resnet(kind, size=32, channels=1):
  config = ml_collections.ConfigDict(dict(
      model='resnet18', width=0.125, encoder_output='avgpool', dtype='float32',
      num_classes=4, head_dropout=0.0, projection_dims=(8, 4), projection_dropout=0.0))
  model = models.create_model(config, kind)
  images = np.random.default_rng(0).uniform(size=(3, size, size, channels))
  variables = model.init(jax.random.key(0), jnp.asarray(images, jnp.float32), train=False)
  return model, {k: variables[k] for k in ('params', 'batch_stats')}, images


def test_project_classifier_every_stage_and_batching():
  model, variables, images = _tiny_resnet('classifier', size=64)
  logits_direct = model.apply(variables, jnp.asarray(images, jnp.float32), train=False)
  sizes = {'stage1': 16, 'stage2': 8, 'stage3': 4, 'stage4': 2}
  for layer in ('stage2', 'stage4'):
    assert gradcam.layer_shape(model, variables, images.shape[1:], layer)[:2] == (
        sizes[layer], sizes[layer])
    heatmaps, logits = gradcam.cam(model, variables, images, 'gradcam', layer)
    assert heatmaps.shape == (3, 64, 64)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(logits, logits_direct, rtol=1e-4, atol=1e-5)
  # Batches of two (the last one padded) give the same maps as one batch of three.
  batched, _ = gradcam.cam(model, variables, images, 'gradcam', 'stage4', batch_size=2)
  whole, _ = gradcam.cam(model, variables, images, 'gradcam', 'stage4')
  np.testing.assert_allclose(batched, whole, atol=1e-6)
  with pytest.raises(ValueError, match="named 'stage9'.*stage1"):
    gradcam.cam(model, variables, images, 'gradcam', 'stage9')
  with pytest.raises(ValueError, match='Unknown CAM method'):
    gradcam.cam(model, variables, images, 'gradcam-xl')


def test_simclr_model_needs_a_reference_embedding():
  model, variables, images = _tiny_resnet('simclr')
  with pytest.raises(ValueError, match='no classifier head'):
    gradcam.cam(model, variables, images, layer='stage2')
  h, _ = model.apply(variables, jnp.asarray(images, jnp.float32), train=False)
  reference = np.asarray(h[0])
  heatmaps, cosines = gradcam.cam(model, variables, images, layer='stage2',
                                  reference_embeddings=reference)
  expected = np.asarray(h) @ reference / (
      np.linalg.norm(h, axis=-1) * np.linalg.norm(reference))
  np.testing.assert_allclose(cosines, expected, rtol=1e-4)
  assert heatmaps.shape == (3, 32, 32)


# ----------------------------------------------------------------------------- quality


def test_mask_energy_known_answers():
  masks = np.zeros((3, 8, 8, 1), np.uint8)
  masks[:, 2:6, 2:6] = 1  # A quarter of the image.
  uniform = np.ones((3, 8, 8))
  np.testing.assert_allclose(gradcam.mask_energy(uniform, masks), 0.25)
  np.testing.assert_allclose(gradcam.mask_area_share(masks, (8, 8)), 0.25)
  np.testing.assert_allclose(gradcam.mask_energy(masks[..., 0] * 0.7, masks), 1.0)
  np.testing.assert_allclose(gradcam.mask_energy(1 - masks[..., 0], masks), 0.0)
  # Masks at twice the heatmaps' size are reduced to the share each pixel covers.
  large = np.repeat(np.repeat(masks, 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(gradcam.mask_energy(uniform, large), 0.25, atol=1e-6)
  assert np.isnan(gradcam.mask_energy(np.zeros((1, 8, 8)), masks[:1]))[0]
  # Smooth random maps score about the area share.
  random = gradcam.random_heatmaps(400, (8, 8), (2, 2), seed=0)
  assert random.shape == (400, 8, 8) and random.max() <= 1.0
  assert gradcam.mask_energy(random, np.repeat(masks[:1], 400, 0)).mean() == pytest.approx(
      0.25, abs=0.02)


def test_imputation_keeps_kept_pixels_and_never_reads_removed_ones():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 16, 16, 2)).astype(np.float32)
  removed = np.zeros((2, 16, 16), bool)
  removed[:, 4:12, 4:12] = True
  imputed = gradcam.impute_removed(images, removed)
  np.testing.assert_array_equal(imputed[~removed], images[~removed])
  altered = images.copy()
  altered[removed] = 1000.0
  np.testing.assert_allclose(gradcam.impute_removed(altered, removed), imputed, rtol=1e-6)
  # Inside the hole the values are local means of kept pixels: within their range.
  assert imputed[removed].min() >= images.min() and imputed[removed].max() <= images.max()
  flat = np.full((1, 16, 16, 1), 0.3, np.float32)
  np.testing.assert_allclose(gradcam.impute_removed(flat, removed[:1]), 0.3, rtol=1e-5)


class BrightSpot(nn.Module):
  """Class 1's logit is the brightness of the top-left corner; class 0's is constant."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    corner = x[:, :4, :4, 0].mean(axis=(1, 2))
    return jnp.stack([jnp.full_like(corner, 2.0), 10.0 * corner], axis=-1)


def test_deletion_drop_is_larger_for_the_relevant_pixels():
  images = np.full((4, 16, 16, 1), 0.1, np.float32)
  images[:, :4, :4] = 0.9  # Class 1 (logit 9 against 2).
  relevant = np.zeros((4, 16, 16), np.float32)
  relevant[:, :4, :4] = 1.0
  drops = gradcam.deletion_drop(BrightSpot(), {}, images, relevant, fraction=16 / 256)
  np.testing.assert_allclose(drops['confidence'], 1 / (1 + np.exp(-7.0)), rtol=1e-5)
  # Removing the corner (imputed from its dark surroundings) flips the class.
  assert (drops['top_drop'] > 0.9).all()
  assert (drops['random_drop'] < drops['top_drop'] - 0.5).all()
  with pytest.raises(ValueError, match='fraction'):
    gradcam.deletion_drop(BrightSpot(), {}, images, relevant, fraction=1.5)
