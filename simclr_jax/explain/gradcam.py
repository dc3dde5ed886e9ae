"""Grad-CAM and its variants for the project's Flax models, and CAM quality measures.

Every ResNet stage marks its output with `self.perturb('stage{i}', x)` and sows it
into `intermediates`. Applying the model with a zero-valued `perturbations`
collection and differentiating the class score with respect to that collection
gives d score / d activation; the sown value is the activation itself. From the
activations A [h, w, C] and gradients G = d score / d A of one image:

- `gradcam` (Selvaraju et al., 2017): weights a_c = mean_ij G_ijc, map
  ReLU(sum_c a_c A_ijc).
- `hirescam` (Draelos & Carin, 2020): map ReLU(sum_c G_ijc A_ijc). Faithful to
  what the score used at each position; equal to Grad-CAM up to a constant when
  the gradient is constant over space (global average pooling + linear head).
- `gradcam++` (Chattopadhay et al., 2018) with the exponential trick: the score
  S is replaced by Y = exp(S); for a piecewise-linear (ReLU) network the higher
  derivatives of S vanish, so dY/dA = Y G, d2Y/dA2 = Y G^2, d3Y/dA3 = Y G^3 and
    alpha_ijc = G_ijc^2 / (2 G_ijc^2 + (sum_ab A_abc) G_ijc^3)  (0 where G = 0),
    w_c = sum_ij alpha_ijc ReLU(G_ijc),  map ReLU(sum_c w_c A_ijc).
  The factor Y = exp(S) common to all weights of an image is dropped: it cancels
  in the per-image normalisation.

Maps are upsampled bilinearly to the input size and divided by their maximum,
so 0 keeps meaning "no positive evidence" and the brightest pixel is 1.

Quality measures:
- `mask_energy`: the share of a heatmap's sum inside a mask (the class-signal
  mask of `synthetic_mri`); a uniform map scores the mask's area share. Read
  it against `evaluate_heatmaps`' controls too: the same CAM of the network
  with random weights (Adebayo et al., 2018) and the mask seen at the map's
  resolution. On synthetic_mri the mask covers the high-contrast structures,
  so even an untrained network scores about 1.5 x the uniform map.
- `deletion_drop`: in the spirit of ROAD (Rong et al., 2022), the drop in the
  predicted class's softmax probability when the top `fraction` of pixels by
  heatmap are removed, against removing as many random pixels. Removed pixels
  are imputed from the kept ones (see `impute_removed`), never from their own
  values, so the removal does not leak what it removed.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from simclr_jax import errors
from simclr_jax.parallel import sharding
from simclr_jax.metrics import classification

CAM_METHODS = ('gradcam', 'gradcam++', 'hirescam')


def _find(tree, layer, what):
  """The entry of a nested dict whose path ends with `layer` (e.g. encoder/stage4)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  matches = [path for path in flat if path[-1] == layer]
  if len(matches) != 1:
    names = sorted({path[-1] for path in flat})
    raise errors.UserError(
        f'The model has {len(matches)} {what} named {layer!r}; set the layer '
        f'(--config.cam.layer) to one of {names}.')
  return matches[0], flat[matches[0]]


def _inference_variables(variables):
  return {k: v for k, v in variables.items()
          if k not in ('intermediates', 'perturbations')}


def _zero_perturbations(model, variables, images):
  """Zeros shaped like every perturbed activation of the model for `images`."""
  shapes = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, mutable=['perturbations'])[1],
      variables, images)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['perturbations'])


def layer_shape(model, variables, image_shape, layer='stage4'):
  """(h, w, C) of a layer's activations for one input image of `image_shape` (H, W, C)."""
  variables = _inference_variables(variables)
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  perturbations = jax.eval_shape(
      lambda v, x: _zero_perturbations(model, v, x), variables, images)
  _, value = _find(perturbations, layer, 'perturbed layers')
  return tuple(value.shape[1:])


def _score(outputs, class_index, reference_embeddings):
  """Per-image score to explain, and what to return beside the maps.

  A classifier's outputs are logits [N, K]: the score is the logit of
  `class_index` (-1: the predicted class). A SimCLR model's outputs are (h, z):
  the score is the cosine between h and the reference embedding.
  """
  if isinstance(outputs, tuple):
    if reference_embeddings is None:
      raise ValueError(
          'This model has no classifier head (it returns embeddings); pass '
          'reference_embeddings= to explain the cosine with a reference image, or '
          'use the checkpoint of a finetune or baseline run.')
    h = outputs[0].astype(jnp.float32)
    reference = jnp.broadcast_to(reference_embeddings, h.shape).astype(jnp.float32)
    cosine = jnp.sum(h * reference, -1) / (
        jnp.linalg.norm(h, axis=-1) * jnp.linalg.norm(reference, axis=-1) + 1e-12)
    return cosine, cosine
  logits = outputs.astype(jnp.float32)
  target = jnp.where(class_index < 0, jnp.argmax(logits, -1), class_index)
  return jnp.take_along_axis(logits, target[:, None], -1)[:, 0], logits


def _layer_map(activations, gradients, method):
  """ReLU'd class-activation map [N, h, w] of one layer (formulas in the module doc)."""
  a = activations.astype(jnp.float32)
  g = gradients.astype(jnp.float32)
  if method == 'gradcam':
    weights = jnp.mean(g, axis=(1, 2), keepdims=True)
    return jax.nn.relu(jnp.sum(weights * a, -1))
  if method == 'hirescam':
    return jax.nn.relu(jnp.sum(g * a, -1))
  if method == 'gradcam++':
    g2 = g * g
    denominator = 2.0 * g2 + jnp.sum(a, axis=(1, 2), keepdims=True) * g2 * g
    safe = jnp.where(denominator != 0.0, denominator, 1.0)
    alpha = jnp.where((g != 0.0) & (denominator != 0.0), g2 / safe, 0.0)
    weights = jnp.sum(alpha * jax.nn.relu(g), axis=(1, 2), keepdims=True)
    return jax.nn.relu(jnp.sum(weights * a, -1))
  raise errors.UserError(f'Unknown CAM method {method!r}; set --config.cam.method to one '
                         f'of {CAM_METHODS}.')


def upsample_and_normalise(maps, size):
  """Bilinear upsampling of maps [N, h, w] to `size` (H, W), each divided by its maximum."""
  maps = jax.image.resize(maps, (maps.shape[0],) + tuple(size), 'bilinear')
  peak = jnp.max(maps, axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=('model', 'method', 'layer'))
def _cam(model, variables, images, class_index, reference_embeddings, *, method, layer):
  variables = _inference_variables(variables)
  perturbations = _zero_perturbations(model, variables, images)
  path, _ = _find(perturbations, layer, 'perturbed layers')

  def total_score(perturbations):
    outputs, state = model.apply({**variables, 'perturbations': perturbations}, images,
                                 train=False, mutable=['intermediates'])
    scores, returned = _score(outputs, class_index, reference_embeddings)
    # Images are independent in inference mode, so the gradient of the sum holds
    # each image's own gradient.
    return jnp.sum(scores), (returned, state['intermediates'])

  grads, (returned, intermediates) = jax.grad(total_score, has_aux=True)(perturbations)
  gradients = flax.traverse_util.flatten_dict(flax.core.unfreeze(grads))[path]
  sown = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  if path not in sown:
    raise ValueError(f'Layer {layer!r} is perturbed but not sown into intermediates; '
                     'sow and perturb the same value under the same name.')
  activations = sown[path][0]  # sow stores a tuple of the values sown.
  maps = _layer_map(activations, gradients, method)
  return upsample_and_normalise(maps, images.shape[1:3]), returned


def cam(model, variables, images, method='gradcam', layer='stage4', class_index=None,
        *, reference_embeddings=None, batch_size=None):
  """Class-activation heatmaps of a batch, jit-compiled per (model, method, layer).

  Args:
    model: a Flax module applied as `model.apply(variables, images, train=False)`
      whose explained layer is marked with `self.perturb(layer, x)` and sown into
      `intermediates` under the same name (every stage of `models.ResNet` is).
    variables: the model's variables (params, batch_stats).
    images: float32 [N, H, W, C] model inputs.
    method: one of CAM_METHODS.
    layer: name of the perturbed layer, e.g. 'stage4' (the last convolutional
      stage) to 'stage1'.
    class_index: None for each image's predicted class, an int for one class for
      all images, or an int array [N].
    reference_embeddings: only for a model without a classifier head (SimCLR):
      an embedding [D] or [N, D]; the explained score is then the cosine between
      each image's encoder output h and it.
    batch_size: if set, images go through in batches of this size, the last one
      padded so that one compiled shape serves them all.

  Returns:
    numpy (heatmaps float32 [N, H, W] in [0, 1], logits [N, K]); for a SimCLR model the
    second value is the cosines [N].

  Raises:
    ValueError: for an unknown method or layer, or a model without a classifier
      head and no reference embedding.
  """
  if method not in CAM_METHODS:
    raise errors.UserError(f'Unknown CAM method {method!r}; set --config.cam.method to one '
                           f'of {CAM_METHODS}.')
  images = np.asarray(images, np.float32)
  num_images = images.shape[0]
  class_index = np.broadcast_to(
      np.asarray(-1 if class_index is None else class_index, np.int32), (num_images,))
  if reference_embeddings is not None:
    reference_embeddings = np.asarray(reference_embeddings, np.float32)
    if reference_embeddings.ndim == 2:
      reference_embeddings = np.broadcast_to(
          reference_embeddings, (num_images, reference_embeddings.shape[-1]))
  batch_size = min(batch_size or num_images, num_images)
  run = functools.partial(_cam, model, variables, method=method, layer=layer)
  if reference_embeddings is not None and reference_embeddings.ndim == 2:
    return sharding.map_batches(run, (images, class_index, reference_embeddings),
                                batch_size)
  return sharding.map_batches(
      lambda x, c: run(x, c, reference_embeddings), (images, class_index), batch_size)


@functools.partial(jax.jit, static_argnames=('model',))
def _logits(model, variables, images):
  logits = model.apply(_inference_variables(variables), images, train=False)
  if isinstance(logits, tuple):
    raise ValueError('Deletion faithfulness needs a classifier; this model returns '
                     'embeddings.')
  return logits.astype(jnp.float32)


def probabilities(model, variables, images, batch_size=64):
  """Softmax class probabilities [N, K] of a classifier in inference mode.

  Batches are padded to `batch_size` so that one compiled shape serves them all.
  """
  images = np.asarray(images, np.float32)
  return classification.softmax(sharding.map_batches(functools.partial(_logits, model, variables),
                                               (images,), min(batch_size, len(images))))


# ----------------------------------------------------------------------------- quality


def _resize_masks(masks, size):
  """Masks [N, Hm, Wm(, 1)] -> float [N, H, W] share of each pixel inside the mask."""
  masks = np.asarray(masks, np.float32)
  if masks.ndim == 4:
    masks = masks[..., 0]
  if masks.shape[1:] == tuple(size):
    return masks
  # Antialiased (area-like) downsampling keeps each pixel's covered fraction.
  return np.asarray(jax.image.resize(masks, (masks.shape[0],) + tuple(size), 'linear',
                                     antialias=True)).clip(0.0, 1.0)


def mask_energy(heatmaps, masks):
  """Per-image share of heatmap energy (sum) inside the mask.

  Args:
    heatmaps: float [N, H, W], non-negative.
    masks: [N, Hm, Wm] or [N, Hm, Wm, 1], 1 inside; resized to the heatmaps'
      size (fractional at the mask's edges) if their sizes differ.

  Returns:
    float64 [N] in [0, 1]; NaN for an all-zero heatmap. A uniform heatmap scores
    the mask's area share (`mask_area_share`).
  """
  heatmaps = np.asarray(heatmaps, np.float64)
  masks = _resize_masks(masks, heatmaps.shape[1:])
  total = heatmaps.sum(axis=(1, 2))
  inside = (heatmaps * masks).sum(axis=(1, 2))
  return np.divide(inside, total, out=np.full(total.shape, np.nan), where=total > 0)


def mask_area_share(masks, size):
  """Per-image share of the image inside the mask: a uniform heatmap's mask energy."""
  return _resize_masks(masks, size).mean(axis=(1, 2)).astype(np.float64)


def random_heatmaps(num_images, size, layer_size, seed=0):
  """Random maps as smooth as a CAM: uniform noise at the layer's size, upsampled.

  Args:
    num_images: N.
    size: (H, W) of the output.
    layer_size: (h, w) of the explained layer, e.g. 4 x 4 for stage4 at 128 px.
    seed: numpy seed.

  Returns:
    float32 [N, H, W] in [0, 1], each divided by its maximum as CAMs are.
  """
  noise = np.random.default_rng(seed).uniform(size=(num_images,) + tuple(layer_size))
  return np.asarray(upsample_and_normalise(jnp.asarray(noise, jnp.float32), size))


def coarse_masks(masks, size, layer_size):
  """Masks seen at a layer's resolution: averaged into its cells, upsampled like a CAM.

  Their mask energy is what a map that knew the mask scores at that resolution:
  a thin rim and small structures cannot be outlined by 4 x 4 cells, so this,
  not 1, is the scale to read CAM mask energies against (a map piled onto a few
  cells can still beat it; it is a reference, not a bound).

  Args:
    masks: [N, Hm, Wm(, 1)], 1 inside.
    size: (H, W) of the output.
    layer_size: (h, w) of the explained layer.

  Returns:
    float32 [N, H, W] in [0, 1].
  """
  cells = _resize_masks(masks, tuple(layer_size))
  return np.asarray(upsample_and_normalise(jnp.asarray(cells), size))


def impute_removed(images, removed, sigmas=(1, 2, 4, 8, 16, 32), min_weight=0.1):
  """Fills removed pixels from the kept ones (a cheap stand-in for ROAD's imputation).

  Each removed pixel gets the Gaussian-weighted mean of the KEPT pixels around
  it (normalised convolution), at the smallest scale sigma (in pixels) where kept
  pixels carry at least `min_weight` of the kernel's weight; pixels with no kept
  neighbour even at the largest scale get the mean of the image's kept pixels.
  Removed values never enter, so the imputation does not leak what was removed,
  and removed regions come out smooth rather than as sharp black holes that a
  network would react to whatever they covered.

  Args:
    images: float [N, H, W, C].
    removed: bool [N, H, W], True where a pixel is removed (all channels).
    sigmas: increasing Gaussian scales tried, in pixels.
    min_weight: share of kernel weight the kept pixels must carry.

  Returns:
    float32 [N, H, W, C], equal to `images` where nothing was removed.
  """
  images = np.asarray(images, np.float32)
  keep = (~np.asarray(removed, bool)).astype(np.float32)[..., None]
  kept_sum = (images * keep).sum(axis=(1, 2), keepdims=True)
  kept_count = np.maximum(keep.sum(axis=(1, 2), keepdims=True), 1.0)
  filled = np.broadcast_to(kept_sum / kept_count, images.shape).copy()
  done = keep[..., 0] > 0
  for sigma in sigmas:
    blur = functools.partial(scipy.ndimage.gaussian_filter, sigma=(0, sigma, sigma, 0),
                             mode='constant', cval=0.0)
    weight = blur(keep)
    estimate = blur(images * keep) / np.maximum(weight, 1e-12)
    ready = (weight[..., 0] >= min_weight) & ~done
    filled[ready] = estimate[ready]
    done |= ready
  return np.where(keep > 0, images, filled)


def _top_pixels(scores, count):
  """bool [N, H, W]: the `count` highest-scoring pixels of each image."""
  flat = scores.reshape(scores.shape[0], -1)
  order = np.argsort(-flat, axis=1, kind='stable')[:, :count]
  chosen = np.zeros(flat.shape, bool)
  np.put_along_axis(chosen, order, True, axis=1)
  return chosen.reshape(scores.shape)


def deletion_drop(model, variables, images, heatmaps, fraction=0.1, *, class_index=None,
                  seed=0):
  """Drop in class confidence when the most relevant pixels are removed, vs random ones.

  Args:
    model: a classifier applied as `model.apply(variables, images, train=False)`.
    variables: its variables.
    images: float32 [N, H, W, C] model inputs.
    heatmaps: float [N, H, W] relevance of each pixel (e.g. from `cam`).
    fraction: share of pixels removed, in (0, 1).
    class_index: None for each image's predicted class (on the intact image), or
      an int / int array [N].
    seed: seed of the random removal and of the tie-breaking among equal scores.

  Returns:
    A dict of float64 [N] arrays: 'confidence' (probability of the class on the
    intact image), 'top_drop' (its decrease when the top `fraction` of pixels by
    heatmap are removed and imputed with `impute_removed`) and 'random_drop'
    (the same with as many uniformly random pixels). A faithful heatmap has
    top_drop > random_drop.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'fraction must be in (0, 1), got {fraction}.')
  images = np.asarray(images, np.float32)
  heatmaps = np.asarray(heatmaps, np.float64)
  num_images, height, width = heatmaps.shape
  count = max(1, int(round(fraction * height * width)))
  rng = np.random.default_rng(seed)
  # A tiny random jitter breaks ties among equal scores (ReLU zeros) at random.
  jitter = rng.uniform(0.0, 1e-9, size=heatmaps.shape)
  top = _top_pixels(heatmaps + jitter, count)
  random = _top_pixels(rng.uniform(size=heatmaps.shape), count)

  intact = probabilities(model, variables, images)
  target = intact.argmax(-1) if class_index is None else np.broadcast_to(
      np.asarray(class_index), (num_images,))
  rows = np.arange(num_images)

  def confidence(removed):
    return probabilities(model, variables, impute_removed(images, removed))[rows, target]

  before = intact[rows, target].astype(np.float64)
  return {'confidence': before,
          'top_drop': before - confidence(top),
          'random_drop': before - confidence(random)}


def randomized_variables(model, variables, images, seed=0):
  """Freshly initialised variables of `model`: the untrained control of a CAM.

  The model randomisation test of Adebayo et al. (2018): a map that a network
  with random weights draws as well reflects the image (edges, contrast), not
  what the trained network learned.
  """
  init = jax.jit(functools.partial(model.init, train=False))
  key, x = jax.random.key(seed), jnp.asarray(images[:1], jnp.float32)
  # As in train.create_train_state: the random initialisers compile in seconds
  # without LLVM optimisation instead of a minute on a CPU.
  fresh = init.lower(key, x).compile({'xla_backend_optimization_level': 0})(key, x)
  return {k: v for k, v in fresh.items() if k in variables}


def evaluate_heatmaps(model, variables, images, heatmaps, masks=None, *, method='gradcam',
                      layer='stage4', fractions=(0.05, 0.1, 0.2), seed=0, batch_size=None):
  """Summary figures of how well heatmaps point at the evidence.

  Args:
    model: the classifier the heatmaps explain.
    variables: its variables.
    images: float32 [N, H, W, C] model inputs.
    heatmaps: float [N, H, W] in [0, 1] of each image's predicted class, made
      with `method` at `layer`.
    masks: optional [N, Hm, Wm(, 1)] class-signal masks; mask energy is left out
      without them.
    method: the CAM method of the heatmaps (for the untrained control).
    layer: their layer (for the random-map baseline and the untrained control).
    fractions: pixel shares removed by the deletion test.
    seed: seed of the random baselines and of the untrained control.
    batch_size: batch size of the untrained control's CAMs.

  Returns:
    A JSON-ready dict: 'num_images', 'mask_energy' (present only with masks:
    the mean share inside the mask of the CAMs ('cam'), of a uniform map = the
    area share ('uniform'), of smooth random maps ('random'), of the same CAM
    method on the same model with random weights ('untrained_model'), of the
    mask itself seen at the layer's resolution ('coarse_mask', see
    `coarse_masks`), the CAMs' ratio to uniform,
    and the share of images whose CAM beats uniform) and 'deletion' (one entry
    per fraction: mean confidence drop for the most relevant and for random
    pixels).
  """
  heatmaps = np.asarray(heatmaps)
  num_images, height, width = heatmaps.shape
  result = {'num_images': int(num_images)}
  if masks is not None:
    layer_size = layer_shape(model, variables, images.shape[1:], layer)[:2]
    energy = mask_energy(heatmaps, masks)
    uniform = mask_area_share(masks, (height, width))
    random = mask_energy(random_heatmaps(num_images, (height, width), layer_size, seed),
                         masks)
    untrained_heatmaps, _ = cam(model, randomized_variables(model, variables, images, seed),
                                images, method, layer, batch_size=batch_size)
    untrained = mask_energy(untrained_heatmaps, masks)
    coarse = mask_energy(coarse_masks(masks, (height, width), layer_size), masks)
    cam_mean, uniform_mean = float(np.nanmean(energy)), float(uniform.mean())
    result['mask_energy'] = {
        'cam': cam_mean, 'cam_std': float(np.nanstd(energy)),
        'uniform': uniform_mean, 'random': float(np.nanmean(random)),
        'untrained_model': float(np.nanmean(untrained)),
        'coarse_mask': float(np.nanmean(coarse)),
        'cam_to_uniform': cam_mean / uniform_mean if uniform_mean > 0 else None,
        'share_of_images_above_uniform': float(np.mean(energy > uniform)),
    }
  result['deletion'] = []
  for fraction in fractions:
    drops = deletion_drop(model, variables, images, heatmaps, fraction, seed=seed)
    result['deletion'].append({
        'fraction': float(fraction),
        'confidence': float(drops['confidence'].mean()),
        'top_drop': float(drops['top_drop'].mean()),
        'random_drop': float(drops['random_drop'].mean()),
        'share_of_images_top_above_random': float(
            np.mean(drops['top_drop'] > drops['random_drop'])),
    })
  return result
