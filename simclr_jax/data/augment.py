"""SimCLR views and model inputs made on the device, in JAX, from uint8 images.

The reference study used only `RandomResizedCrop(128, scale=(0.5, 1),
ratio=(1, 1))`; the other augmentations of SimCLR (flip, rotation, brightness
and contrast jitter, blur) are off by default and switched on in
`config.augment`. Everything is vmapped over the batch and jit-compatible, so
the views are made inside the training step from uint8 images; this replaced
a tf.data version (kept in tests/tf_augment.py as the reference whose
distributions the tests compare with). A view is a pure
function of (key, image); the caller makes one key per example as
`view_keys(base_key, stream_positions, view)` does, which keeps a resumed run's
views identical.

Crop and resize are one pair of matrix products per image, out = R_y^T @ x @ R_x,
with R built from the crop box as TensorFlow's antialiased bilinear resize
(the ScaleAndTranslate kernel) weighs pixels: static-shaped and equal to TF's
crop-then-resize up to float round-off. (jax.image.scale_and_translate of the
whole image is the same products, but lets pixels outside the crop into its
border pixels.)

  keys = view_keys(key, positions, view=1)            # [B] keys
  views = augment_batch(keys, images, config.augment, 64, channels=3)
  inputs = model_input(images, 64, channels=3)        # evaluation: no augmentation
"""

import math

import jax
import jax.numpy as jnp

# One sub-key per augmentation, drawn whether or not it is switched on, so that
# switching one augmentation on leaves the random draws of the others unchanged.
_NUM_SUB_KEYS = 6
_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before the fallback.
_BLUR_PROBABILITY = 0.5
_BLUR_SIGMA_RANGE = (0.1, 2.0)
# Default precision multiplies float32 as TF32 on recent GPUs, bfloat16 on TPUs.
_PRECISION = jax.lax.Precision.HIGHEST


def view_keys(key, stream_positions, view):
  """Returns the [B] keys fold_in(fold_in(key, position), view) of one view.

  Args:
    key: the run's augmentation key.
    stream_positions: int [B] stream positions of the batch's examples.
    view: 1 or 2 for the SimCLR views, 0 for the supervised crop.
  """
  return jax.vmap(lambda position: jax.random.fold_in(
      jax.random.fold_in(key, position), view))(stream_positions)


def resize_weights(start, length, input_size, output_size):
  """Returns the [input_size, output_size] antialiased bilinear resize matrix.

  Column o holds the weights tf.image.resize(method='bilinear', antialias=True)
  gives the input pixels when it resizes input[start:start + length] to
  `output_size`: a triangle kernel widened by the downsampling factor, zero
  outside the crop, normalised per output pixel (TF's ScaleAndTranslate).

  Args:
    start: int, first input pixel of the crop (may be traced).
    length: int, pixels in the crop (may be traced).
    input_size: static size of the input axis.
    output_size: static size of the output axis.
  """
  length = jnp.asarray(length, jnp.float32)
  inv_scale = 1.0 / (output_size / length)  # Rounded in float32 as TF does.
  kernel_scale = jnp.maximum(inv_scale, 1.0)
  sample = (jnp.arange(output_size, dtype=jnp.float32) + 0.5) * inv_scale
  source = jnp.arange(input_size, dtype=jnp.float32) - start
  position = (source + 0.5)[:, None] - sample[None, :]
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(position / kernel_scale))
  weights = jnp.where(((source >= 0) & (source < length))[:, None], weights,
                      0.0)
  # Input-major, as jax.image builds them: on CPU 2x faster than output-major.
  return weights * (1.0 / jnp.sum(weights, axis=0, keepdims=True))


def _resample(image, rows, cols):
  """Returns rows^T @ image @ cols for [..., H, W] images, [H, S] and [W, T]."""
  # Rows first, two products: einsum's path, cols first ran 1.2x, 1.5x slower.
  return jnp.matmul(jnp.matmul(rows.T, image, precision=_PRECISION), cols,
                    precision=_PRECISION)


def crop_box(key, height, width, scale, ratio):
  """Draws a RandomResizedCrop box as torchvision (and `augment`) draw it.

  Area share uniform in `scale`, log aspect ratio uniform in log(`ratio`),
  integer sides rounded, the first of 10 tries that fits, else the largest
  central box whose aspect ratio lies in `ratio`; offsets uniform integers.

  Args:
    key: PRNG key.
    height: static input height.
    width: static input width.
    scale: (min, max) share of the image area covered by the crop.
    ratio: (min, max) width / height of the crop.

  Returns:
    int32 scalars (top, left, crop_height, crop_width).
  """
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(
      area_key, (_CROP_TRIES,), minval=scale[0], maxval=scale[1])
  aspect_ratio = jnp.exp(jax.random.uniform(
      ratio_key, (_CROP_TRIES,), minval=math.log(ratio[0]),
      maxval=math.log(ratio[1])))
  crop_widths = jnp.round(jnp.sqrt(area * aspect_ratio)).astype(jnp.int32)
  crop_heights = jnp.round(jnp.sqrt(area / aspect_ratio)).astype(jnp.int32)
  fits = ((crop_widths > 0) & (crop_widths <= width) &
          (crop_heights > 0) & (crop_heights <= height))
  first_fit = jnp.argmax(fits)
  any_fit = jnp.any(fits)
  # The fallback depends on static shapes only, so it is plain Python.
  image_ratio = width / height
  fallback_width = round(height * ratio[1]) if image_ratio > ratio[1] else width
  fallback_height = round(width / ratio[0]) if image_ratio < ratio[0] else height
  crop_width = jnp.where(any_fit, crop_widths[first_fit], fallback_width)
  crop_height = jnp.where(any_fit, crop_heights[first_fit], fallback_height)
  top = jnp.where(
      any_fit, jax.random.randint(top_key, (), 0, height - crop_height + 1),
      (height - crop_height) // 2)
  left = jnp.where(
      any_fit, jax.random.randint(left_key, (), 0, width - crop_width + 1),
      (width - crop_width) // 2)
  return top, left, crop_height, crop_width


def crop_boxes(keys, height, width, aug_config):
  """Returns the int32 [B, 4] boxes (top, left, height, width) of `keys`' views.

  The boxes `augment_batch` crops for these keys, e.g. to log crop statistics.

  Args:
    keys: [B] PRNG keys, as passed to `augment_batch`.
    height: static input height.
    width: static input width.
    aug_config: `config.augment`: reads crop_scale and crop_ratio.
  """
  return jax.vmap(lambda key: jnp.stack(crop_box(
      jax.random.split(key, _NUM_SUB_KEYS)[0], height, width,
      aug_config.crop_scale, aug_config.crop_ratio)))(keys)


def rotate(image, degrees):
  """Rotates a [H, W] image about its centre, bilinear, black outside.

  The same transform as `augment.random_rotation` (an output pixel samples the
  input at its position rotated by `degrees`), so 90 degrees is np.rot90.

  Args:
    image: float [H, W].
    degrees: angle (may be traced).
  """
  angle = degrees * (math.pi / 180.0)
  height, width = image.shape
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
  y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
  y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                      jnp.arange(width, dtype=jnp.float32), indexing='ij')
  source_x = cos * x - sin * y + x_offset
  source_y = sin * x + cos * y + y_offset
  return jax.scipy.ndimage.map_coordinates(
      image, [source_y, source_x], order=1, mode='constant', cval=0.0)


def gaussian_blur(image, sigma, radius):
  """Blurs a [S, S] image separably, zero padded, as `augment` does.

  The kernel is normalised by the sum of its 2 * radius + 1 taps, so pixels
  near the border darken as in TF's blur.

  Args:
    image: float [S, S].
    sigma: standard deviation in pixels (may be traced).
    radius: static kernel radius.
  """
  size = image.shape[0]
  offsets = (jnp.arange(size)[:, None] - jnp.arange(size)).astype(jnp.float32)
  weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  weights = jnp.where(jnp.abs(offsets) <= radius, weights, 0.0)
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights /= jnp.sum(jnp.exp(-0.5 * jnp.square(taps / sigma)))
  # Banded matrices, not shifted sums: XLA CPU fused the rotation's gathers
  # into each tap of shifted sums (2.5-3x slower); depthwise convs ran 10x slower.
  return _resample(image, weights, weights)


def _view(key, image, aug_config, image_size):
  """Returns one augmented [S, S] view of a float [H, W] gray image."""
  (crop_key, flip_key, rotation_key, brightness_key, contrast_key,
   blur_key) = jax.random.split(key, _NUM_SUB_KEYS)
  height, width = image.shape
  top, left, crop_height, crop_width = crop_box(
      crop_key, height, width, aug_config.crop_scale, aug_config.crop_ratio)
  image = _resample(image,
                    resize_weights(top, crop_height, height, image_size),
                    resize_weights(left, crop_width, width, image_size))
  if aug_config.flip:
    image = jnp.where(jax.random.uniform(flip_key) < 0.5, image[:, ::-1], image)
  if aug_config.rotation_degrees:
    max_degrees = aug_config.rotation_degrees
    image = rotate(image, jax.random.uniform(
        rotation_key, minval=-max_degrees, maxval=max_degrees))
  if aug_config.brightness:
    image += jax.random.uniform(brightness_key, minval=-aug_config.brightness,
                                maxval=aug_config.brightness)
  if aug_config.contrast:
    factor = jax.random.uniform(contrast_key, minval=1.0 - aug_config.contrast,
                                maxval=1.0 + aug_config.contrast)
    mean = jnp.mean(image)
    image = (image - mean) * factor + mean
  if aug_config.blur:
    apply_key, sigma_key = jax.random.split(blur_key)
    sigma = jax.random.uniform(sigma_key, minval=_BLUR_SIGMA_RANGE[0],
                               maxval=_BLUR_SIGMA_RANGE[1])
    blurred = gaussian_blur(image, sigma, max(1, image_size // 20))
    image = jnp.where(jax.random.uniform(apply_key) < _BLUR_PROBABILITY,
                      blurred, image)
  return jnp.clip(image, 0.0, 1.0)


def _gray_float(images):
  """Checks [..., H, W, 1] and returns float32 [..., H, W] in [0, 1]."""
  if images.ndim < 3 or images.shape[-1] != 1:
    raise ValueError(f'Expected gray images [..., H, W, 1], got shape '
                     f'{images.shape}.')
  images = images[..., 0]
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) * (1.0 / 255.0)  # As convert_image_dtype.
  return images.astype(jnp.float32)


def _to_channels(images, channels, dtype):
  """Returns [..., S, S] gray as [..., S, S, channels] of `dtype`."""
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}.')
  images = jnp.broadcast_to(images[..., None], images.shape + (channels,))
  return images.astype(dtype)


def augment_batch(keys, images, aug_config, image_size, channels=1,
                  dtype=jnp.float32):
  """Returns one SimCLR view of each image: crop, flip, rotation, jitter, blur.

  Applied in the order of `augment.simclr_view`: random resized crop (always)
  to `image_size`, horizontal flip, rotation, brightness, contrast, Gaussian
  blur, clip to [0, 1]; each but the crop switched on by `aug_config`, read
  at trace time: under jax.jit close over it, or pass it as a static argument
  (an ml_collections.FrozenConfigDict is hashable), like `image_size`,
  `channels` and `dtype`.

  Args:
    keys: [B] PRNG keys (or uint32 [B, 2]), one per example (see `view_keys`).
    images: uint8 (or float in [0, 1]) [B, H, W, 1].
    aug_config: `config.augment`: crop_scale, crop_ratio, flip,
      rotation_degrees, brightness, contrast, blur.
    image_size: side of the square output.
    channels: 1, or 3 by repeating gray.
    dtype: output dtype.

  Returns:
    [B, image_size, image_size, channels] of `dtype` in [0, 1].
  """
  views = jax.vmap(lambda key, image: _view(key, image, aug_config, image_size))(
      keys, _gray_float(images))
  return _to_channels(views, channels, dtype)


def model_input(images, image_size, channels=1, dtype=jnp.float32):
  """Returns unaugmented model inputs, as `input_pipeline.preprocess` makes them.

  Args:
    images: uint8 (or float in [0, 1]) [..., H, W, 1].
    image_size: side of the square output (bilinear, antialiased resize).
    channels: 1, or 3 by repeating gray.
    dtype: output dtype.

  Returns:
    [..., image_size, image_size, channels] of `dtype` in [0, 1].
  """
  images = _gray_float(images)
  height, width = images.shape[-2:]
  if (height, width) != (image_size, image_size):
    rows = resize_weights(0, height, height, image_size)
    cols = resize_weights(0, width, width, image_size)
    images = _resample(images, rows, cols)
  return _to_channels(jnp.clip(images, 0.0, 1.0), channels, dtype)
