"""Tests of Grad-CAM, its variants and the CAM quality measures.

Known answers come from hand-built models whose maps can be written down: a
feature map A (sown and perturbed as `stage4`) followed by global average
pooling and a linear layer, where d logit_k / d A_ijc = W_ck / (h w) for every
position, or followed by flattening and a linear layer, where the gradient
varies over positions.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax.explain import gradcam
from simclr_jax.model import heads
from simclr_jax.model import resnet
from simclr_jax.data.datasets import synthetic_mri


class PooledLinear(nn.Module):
  """A = ReLU(x @ conv); logits = mean_ij(A) @ dense (the CAM paper's setting)."""
  num_classes: int = 3
  features: int = 4
  flatten: bool = False  # FlattenLinear: logits = flatten(A) @ dense instead.

  @nn.compact
  def __call__(self, x, train=False):
    del train
    a = nn.relu(nn.Conv(self.features, (1, 1), use_bias=False, name='conv')(x))
    a = self.perturb('stage4', a)
    self.sow('intermediates', 'stage4', a)
    pooled = a.reshape((a.shape[0], -1)) if self.flatten else a.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=False, name='dense')(pooled)


# A = ReLU(x @ conv); logits = flatten(A) @ dense (the reference's flatten head).
FlattenLinear = functools.partial(PooledLinear, flatten=True)


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


def _init(model, images, seed=0):
  """model.init compiled without LLVM optimisation: seconds instead of a minute."""
  init = jax.jit(functools.partial(model.init, train=False))
  key, x = jax.random.key(seed), jnp.asarray(images, jnp.float32)
  return init.lower(key, x).compile({'xla_backend_optimization_level': 0})(key, x)


def _tiny_resnet(kind, size=32, channels=1):
  """The project's classifier or SimCLR model with one basic block per stage."""
  common = dict(stage_sizes=(1, 1, 1, 1), block_cls=resnet.ResNetBlock, width=0.125,
                encoder_output='avgpool')
  if kind == 'classifier':
    model = heads.Classifier(num_classes=4, head_dropout=0.0, **common)
  else:
    model = heads.SimCLRModel(projection_dims=(8, 4), projection_dropout=0.0, **common)
  images = np.random.default_rng(0).uniform(size=(3, size, size, channels))
  variables = _init(model, images)
  return model, {k: variables[k] for k in ('params', 'batch_stats')}, images


def test_project_classifier_is_explained_at_any_stage():
  model, variables, images = _tiny_resnet('classifier', size=64)
  logits_direct = model.apply(variables, jnp.asarray(images, jnp.float32), train=False)
  for layer, cells in (('stage1', 16), ('stage2', 8), ('stage3', 4), ('stage4', 2)):
    assert gradcam.layer_shape(model, variables, images.shape[1:], layer) == (
        cells, cells, 8 * 2**(int(layer[-1]) - 1))
  heatmaps, logits = gradcam.cam(model, variables, images, 'gradcam', 'stage2')
  assert heatmaps.shape == (3, 64, 64)
  assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0 + 1e-6
  np.testing.assert_allclose(logits, logits_direct, rtol=1e-4, atol=1e-5)
  # With average pooling and a linear head, Grad-CAM at the last stage is the class
  # activation map of the head's weights (Zhou et al., 2016).
  heatmaps, logits = gradcam.cam(model, variables, images, 'gradcam', 'stage4')
  _, state = model.apply(variables, jnp.asarray(images, jnp.float32), train=False,
                         mutable=['intermediates'])
  a = np.asarray(state['intermediates']['encoder']['stage4'][0])
  dense = np.asarray(variables['params']['head']['dense']['kernel'])
  expected = np.einsum('nhwc,cn->nhw', a, dense[:, np.asarray(logits).argmax(-1)])
  expected = gradcam.upsample_and_normalise(jnp.asarray(np.maximum(expected, 0)), (64, 64))
  np.testing.assert_allclose(heatmaps, expected, atol=1e-4)
  # Batches of two (the last one padded) give the same maps as one batch of three.
  batched, _ = gradcam.cam(model, variables, images, 'gradcam', 'stage4', batch_size=2)
  np.testing.assert_allclose(batched, heatmaps, atol=1e-6)
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
    return jnp.stack([jnp.full_like(corner, 5.0), 10.0 * corner], axis=-1)


def test_deletion_drop_is_larger_for_the_relevant_pixels():
  images = np.full((4, 16, 16, 1), 0.1, np.float32)
  images[:, :4, :4] = 0.9  # Class 1: logit 9 against 5.
  relevant = np.zeros((4, 16, 16), np.float32)
  relevant[:, :4, :4] = 1.0
  drops = gradcam.deletion_drop(BrightSpot(), {}, images, relevant, fraction=16 / 256)
  np.testing.assert_allclose(drops['confidence'], 1 / (1 + np.exp(-4.0)), rtol=1e-5)
  # Removing the corner (imputed from its dark surroundings: logit 1) flips the class.
  np.testing.assert_allclose(drops['top_drop'], drops['confidence'] - 1 / (1 + np.exp(4.0)),
                             rtol=1e-4)
  assert (drops['random_drop'] < drops['top_drop'] - 0.5).all()
  with pytest.raises(ValueError, match='fraction'):
    gradcam.deletion_drop(BrightSpot(), {}, images, relevant, fraction=1.5)


# ----------------------------------------------------------------------------- trained


def _train_small_classifier(images, labels, epochs, seed=0):
  """The project's ResNet cut to two basic blocks (stage2 is the last stage, 8 x 8
  cells at 64 px), trained with AdamW and horizontal flips."""
  model = heads.Classifier(stage_sizes=(1, 1), block_cls=resnet.ResNetBlock,
                            num_classes=4, width=0.25, encoder_output='avgpool',
                            head_dropout=0.0)
  variables = _init(model, images[:2], seed)
  params, batch_stats = variables['params'], variables['batch_stats']
  tx = optax.adamw(3e-3, weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates['batch_stats']
    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  rng = np.random.default_rng(seed)
  batch_size = 32
  for _ in range(epochs):
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      rows = order[start:start + batch_size]
      flip = rng.uniform(size=batch_size) < 0.5
      x = np.where(flip[:, None, None, None], images[rows][:, :, ::-1], images[rows])
      params, batch_stats, opt_state = step(params, batch_stats, opt_state, x, labels[rows])
  return model, {'params': params, 'batch_stats': batch_stats}


def test_trained_classifier_heatmaps_on_synthetic_mri():
  """Quality of Grad-CAM after a short run on synthetic_mri (small, at 64 px).

  Deletion faithfulness holds: removing the 20 % most relevant pixels lowers the
  predicted class's probability more than removing random pixels (by 0.05-0.26
  over the seeds and epochs tried, for 80-100 % of the images).

  Mask energy is printed but NOT asserted above uniform, because here it does
  not measure learning. Trained small models score 0.7-1.3 x the uniform map
  across seeds and settings (and, after a CPU-sized run, are near the majority
  share on held-out subjects), while the same Grad-CAM on the same network with
  random weights scores 1.5-1.6 x: the class-signal mask covers the image's
  high-contrast structures (brain outline, sulci, ventricles), to which any
  convolutional network responds. At 4 x 4 cells even the mask itself,
  averaged into the cells, scores only about 1.2 x. The test pins that
  confound instead, so that a change to the data or to the measure shows here.
  """
  data = synthetic_mri.generate(num_subjects=24, slices_per_subject=8, image_size=64)
  images = data['image'].astype(np.float32) / 255.0
  test = data['subject_id'] % 4 == 0  # Six held-out subjects.
  model, variables = _train_small_classifier(images[~test], data['label'][~test], 20)
  images, masks = images[test], data['mask'][test]
  heatmaps, logits = gradcam.cam(model, variables, images, 'gradcam', 'stage2')
  quality = gradcam.evaluate_heatmaps(model, variables, images, heatmaps, masks,
                                      method='gradcam', layer='stage2', fractions=(0.2,))
  accuracy = np.mean(logits.argmax(-1) == data['label'][test])
  print(f'held-out accuracy {accuracy:.3f}; {quality}')
  deletion = quality['deletion'][0]
  assert deletion['top_drop'] > deletion['random_drop'] + 0.03
  assert deletion['share_of_images_top_above_random'] > 0.6
  energy = quality['mask_energy']
  assert energy['random'] == pytest.approx(energy['uniform'], abs=0.02)
  assert energy['untrained_model'] > 1.3 * energy['uniform']
