"""The TensorFlow view augmentation the project used before `simclr_jax/augment.py`.

Kept as the reference the JAX augmentation's tests compare distributions with
(tests/test_augment.py); the tool itself no longer runs it. Stateless TensorFlow
ops seeded per example:

Every random choice is drawn with a `tf.random.stateless_*` op from the seed
passed in, so a view is a pure function of (image, seed): the input pipeline
seeds each example by (seed, stream position, view), which makes augmented
batches reproducible and lets a resumed run see exactly the same views.

The reference study used only `RandomResizedCrop(128, scale=(0.5, 1),
ratio=(1, 1))`; the other augmentations of SimCLR (flip, rotation, colour
jitter, blur) are off by default and switched on in `config.augment`.
"""

import math

import tensorflow as tf

# One sub-seed per augmentation, drawn whether or not it is switched on, so that
# switching one augmentation on leaves the random draws of the others unchanged.
_NUM_SUB_SEEDS = 6
# SimCLR (Chen et al., 2020, appendix A) blurs half of the views, with a sigma
# drawn from [0.1, 2.0] pixels at 224 px; the kernel spans about 10 % of the image.
_BLUR_PROBABILITY = 0.5
_BLUR_SIGMA_RANGE = (0.1, 2.0)


def random_resized_crop(image, seed, scale, ratio, image_size):
  """Crops a random box of the given area share and aspect ratio, then resizes.

  The box is drawn as torchvision's RandomResizedCrop (which the reference
  used) draws it: area share uniform in `scale`, log aspect ratio uniform in
  log(`ratio`), the first of 10 tries that fits, else a central crop.
  `tf.image.stateless_sample_distorted_bounding_box` would draw the side length
  uniformly instead of the area, a different distribution of crops.

  Args:
    image: float32 [H, W, C].
    seed: int [2] stateless seed.
    scale: (min, max) share of the image area covered by the crop.
    ratio: (min, max) width / height of the crop.
    image_size: side of the square output.

  Returns:
    float32 [image_size, image_size, C].
  """
  num_tries = 10
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=4))
  height = tf.shape(image)[0]
  width = tf.shape(image)[1]
  height_f = tf.cast(height, tf.float32)
  width_f = tf.cast(width, tf.float32)
  area = height_f * width_f * tf.random.stateless_uniform(
      [num_tries], area_seed, scale[0], scale[1])
  aspect_ratio = tf.exp(tf.random.stateless_uniform(
      [num_tries], ratio_seed, math.log(ratio[0]), math.log(ratio[1])))
  crop_widths = tf.cast(tf.round(tf.sqrt(area * aspect_ratio)), tf.int32)
  crop_heights = tf.cast(tf.round(tf.sqrt(area / aspect_ratio)), tf.int32)
  fits = ((crop_widths > 0) & (crop_widths <= width) &
          (crop_heights > 0) & (crop_heights <= height))
  first_fit = tf.argmax(tf.cast(fits, tf.int32))
  # Fallback: the largest central crop whose aspect ratio lies in `ratio`.
  image_ratio = width_f / height_f
  fallback_width = tf.where(
      image_ratio > ratio[1],
      tf.cast(tf.round(height_f * ratio[1]), tf.int32), width)
  fallback_height = tf.where(
      image_ratio < ratio[0],
      tf.cast(tf.round(width_f / ratio[0]), tf.int32), height)
  any_fit = tf.reduce_any(fits)
  crop_width = tf.where(any_fit, crop_widths[first_fit], fallback_width)
  crop_height = tf.where(any_fit, crop_heights[first_fit], fallback_height)
  top = tf.where(
      any_fit,
      tf.random.stateless_uniform(
          [], top_seed, 0, height - crop_height + 1, dtype=tf.int32),
      (height - crop_height) // 2)
  left = tf.where(
      any_fit,
      tf.random.stateless_uniform(
          [], left_seed, 0, width - crop_width + 1, dtype=tf.int32),
      (width - crop_width) // 2)
  crop = image[top:top + crop_height, left:left + crop_width]
  return tf.image.resize(
      crop, [image_size, image_size], method='bilinear', antialias=True)


def random_rotation(image, seed, max_degrees):
  """Rotates about the centre by an angle uniform in [-max_degrees, max_degrees].

  Pixels rotated in from outside the image are black, like the MRI background.

  Args:
    image: float32 [H, W, C].
    seed: int [2] stateless seed.
    max_degrees: maximum absolute angle in degrees.

  Returns:
    float32 [H, W, C].
  """
  angle = tf.random.stateless_uniform(
      [], seed, -max_degrees, max_degrees) * (math.pi / 180.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(angle), tf.sin(angle)
  # The transform maps each output pixel to the input pixel it samples; this is
  # a rotation about the image centre (as in keras.layers.RandomRotation).
  x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
  y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
  transform = tf.stack(
      [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])[tf.newaxis]
  rotated = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[tf.newaxis],
      transforms=transform,
      output_shape=tf.shape(image)[:2],
      fill_value=0.0,
      interpolation='BILINEAR',
      fill_mode='CONSTANT')
  return rotated[0]


def random_gaussian_blur(image, seed, image_size):
  """Blurs half of the images with a Gaussian of random sigma, as SimCLR does.

  Args:
    image: float32 [H, W, C] with H = W = image_size.
    seed: int [2] stateless seed.
    image_size: side of the image, which sets the kernel size.

  Returns:
    float32 [H, W, C].
  """
  apply_seed, sigma_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  sigma = tf.random.stateless_uniform([], sigma_seed, *_BLUR_SIGMA_RANGE)
  radius = max(1, image_size // 20)
  # The separable blur as two matrix products with a banded Gaussian matrix
  # (zero padding, like a 'SAME' convolution): on CPU, TF's convolutions of a
  # single small image took about 5x longer.
  offsets = tf.range(image_size)[:, tf.newaxis] - tf.range(image_size)
  offsets = tf.cast(offsets, tf.float32)
  weights = tf.exp(-0.5 * tf.square(offsets / sigma))
  weights = tf.where(tf.abs(offsets) <= radius, weights, 0.0)
  kernel_offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  weights /= tf.reduce_sum(tf.exp(-0.5 * tf.square(kernel_offsets / sigma)))
  channels_first = tf.transpose(image, [2, 0, 1])
  blurred = tf.matmul(tf.matmul(weights, channels_first), weights,
                      transpose_b=True)
  blurred = tf.transpose(blurred, [1, 2, 0])
  apply = tf.random.stateless_uniform([], apply_seed) < _BLUR_PROBABILITY
  return tf.where(apply, blurred, image)


def simclr_view(image, seed, aug_config, image_size):
  """Returns one augmented view of `image`, a pure function of (image, seed).

  Applied in this order: random resized crop (always), horizontal flip,
  rotation, brightness, contrast, Gaussian blur; each but the crop is switched
  on by its field of `aug_config`.

  Args:
    image: [H, W, C] uint8 (scaled to [0, 1]) or float in [0, 1].
    seed: int32 or int64 [2] stateless seed.
    aug_config: `config.augment`: crop_scale, crop_ratio, flip,
      rotation_degrees, brightness, contrast, blur.
    image_size: side of the square output.

  Returns:
    float32 [image_size, image_size, C] in [0, 1].
  """
  image = tf.image.convert_image_dtype(image, tf.float32)
  (crop_seed, flip_seed, rotation_seed, brightness_seed, contrast_seed,
   blur_seed) = tf.unstack(
       tf.random.experimental.stateless_split(seed, num=_NUM_SUB_SEEDS))

  image = random_resized_crop(
      image, crop_seed, aug_config.crop_scale, aug_config.crop_ratio,
      image_size)
  if aug_config.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if aug_config.rotation_degrees:
    image = random_rotation(image, rotation_seed, aug_config.rotation_degrees)
  if aug_config.brightness:
    image = tf.image.stateless_random_brightness(
        image, aug_config.brightness, brightness_seed)
  if aug_config.contrast:
    image = tf.image.stateless_random_contrast(
        image, 1.0 - aug_config.contrast, 1.0 + aug_config.contrast,
        contrast_seed)
  if aug_config.blur:
    image = random_gaussian_blur(image, blur_seed, image_size)
  return tf.clip_by_value(image, 0.0, 1.0)


def preprocess(images_uint8, config):
  """The former input_pipeline.preprocess: TF's antialiased bilinear resize, gray repeated."""
  images = tf.image.convert_image_dtype(tf.convert_to_tensor(images_uint8), tf.float32)
  size = config.data.image_size
  if tuple(images.shape[-3:-1]) != (size, size):
    images = tf.image.resize(images, [size, size], method='bilinear', antialias=True)
  if config.data.channels != 1:
    images = tf.repeat(images, config.data.channels, axis=-1)
  return tf.clip_by_value(images, 0.0, 1.0).numpy()
