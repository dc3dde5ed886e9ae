"""Tests of the on-device (JAX) SimCLR augmentation against the TensorFlow one.

Random draws differ between the two (other generators), so crops, angles and
jitter are compared as distributions over many keys and seeds; deterministic
pieces (resize, rotation by a given angle) are compared pixel by pixel.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import default
from simclr_jax.data import augment
from tests import tf_augment

INPUT_SIZE = 128
BATCH = 8
CROP_OUTPUT = 32
NUM_TF_CROPS = 1000
NUM_JAX_CROPS = 20000
# The KS distance of samples of 1,000 and 20,000 from one distribution exceeds
# 0.072 with p = 1e-4; a side-uniform sampler is 0.14 away.
KS_TOLERANCE = 0.075


def _aug_config(**overrides):
  """Returns a hashable config.augment with every switch off (the crop only)."""
  config = dict(crop_scale=(0.5, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                rotation_degrees=0.0, brightness=0.0, contrast=0.0, blur=False)
  config.update(overrides)
  return ml_collections.FrozenConfigDict(config)


ALL_ON = dict(flip=True, rotation_degrees=20.0, brightness=0.3, contrast=0.5,
              blur=True)
FULL_CROP = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _augment(keys, images, aug_config, image_size, channels=1,
             dtype=jnp.float32):
  return augment.augment_batch(keys, images, aug_config, image_size,
                                   channels, dtype)


def _keys(num, seed=0, view=1):
  return augment.view_keys(jax.random.key(seed), jnp.arange(num), view)


def _images(num, size=INPUT_SIZE, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (num, size, size, 1), dtype=np.uint8)


def _ks_distance(a, b):
  """Two-sample Kolmogorov-Smirnov statistic (largest gap of the CDFs)."""
  grid = np.sort(np.concatenate([a, b]))
  cdf_a = np.searchsorted(np.sort(a), grid, side='right') / len(a)
  cdf_b = np.searchsorted(np.sort(b), grid, side='right') / len(b)
  return np.abs(cdf_a - cdf_b).max()


# ---------------------------------------------------------------- Basics.


def test_same_keys_same_views_different_keys_differ():
  images = _images(BATCH)
  config = _aug_config(**ALL_ON)
  views = np.asarray(_augment(_keys(BATCH), images, config, CROP_OUTPUT))
  np.testing.assert_array_equal(
      np.asarray(_augment(_keys(BATCH), images, config, CROP_OUTPUT)), views)
  # Raw uint32 keys hold the same bits as typed keys, so give the same views.
  raw = jax.random.key_data(_keys(BATCH))
  np.testing.assert_array_equal(
      np.asarray(_augment(raw, images, config, CROP_OUTPUT)), views)
  other = np.asarray(_augment(_keys(BATCH, view=2), images, config,
                              CROP_OUTPUT))
  for i in range(BATCH):
    assert not np.array_equal(views[i], other[i])
  # A view depends on its own key and image only, not on the rest of the batch
  # (up to float round-off: another batch size compiles other sums).
  alone = np.asarray(_augment(_keys(BATCH)[2:3], images[2:3], config,
                              CROP_OUTPUT))
  np.testing.assert_allclose(alone[0], views[2], atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_output_shape_dtype_range_and_channels(dtype):
  images = _images(BATCH)
  config = _aug_config(**ALL_ON)
  gray = np.asarray(_augment(_keys(BATCH), images, config, CROP_OUTPUT, 1,
                             dtype)).astype(np.float32)
  rgb = np.asarray(_augment(_keys(BATCH), images, config, CROP_OUTPUT, 3,
                            dtype))
  assert gray.shape == (BATCH, CROP_OUTPUT, CROP_OUTPUT, 1)
  assert rgb.shape == (BATCH, CROP_OUTPUT, CROP_OUTPUT, 3)
  assert rgb.dtype == dtype
  rgb = rgb.astype(np.float32)
  assert gray.min() >= 0.0 and gray.max() <= 1.0
  np.testing.assert_array_equal(rgb, np.repeat(rgb[..., :1], 3, axis=-1))
  # Another compilation (3 channels) may fuse the last ops differently.
  np.testing.assert_allclose(rgb[..., :1], gray, atol=1e-5 if dtype == jnp.float32 else 1e-2)


def test_bad_channels_and_shapes_are_explained():
  with pytest.raises(ValueError, match='channels must be 1 or 3'):
    augment.model_input(_images(1), 32, channels=2)
  with pytest.raises(ValueError, match=r'gray images \[..., H, W, 1\]'):
    augment.model_input(np.zeros((1, 8, 8, 3), np.uint8), 4)


def test_jit_compiles_once_and_makes_keys_inside():
  traces = []
  config = _aug_config(**ALL_ON)

  @jax.jit
  def step(key, positions, images):
    traces.append(None)  # Runs at tracing only.
    keys = augment.view_keys(key, positions, 1)
    return augment.augment_batch(keys, images, config, CROP_OUTPUT, 3)

  for i in range(3):
    positions = jnp.arange(BATCH) + BATCH * i
    out = step(jax.random.key(i), positions, _images(BATCH, seed=i))
  assert len(traces) == 1
  expected = _augment(augment.view_keys(jax.random.key(2), positions, 1),
                      _images(BATCH, seed=2), config, CROP_OUTPUT, 3)
  np.testing.assert_allclose(out, expected, atol=1e-5)


# ---------------------------------------------------------------- Resize.


@pytest.mark.parametrize('image_size', [64, 32, 128])
def test_model_input_matches_tf_preprocess(image_size):
  images = _images(8)
  config = default.get_config()
  config.data.image_size = image_size
  config.data.channels = 3
  expected = tf_augment.preprocess(images, config)
  actual = np.asarray(augment.model_input(images, image_size, 3))
  assert actual.shape == expected.shape
  # Same kernel, same float32 weights; only the order of the sums differs.
  np.testing.assert_allclose(actual, expected, atol=1e-6)


@pytest.mark.parametrize('image_size', [64, 32, 128])
def test_full_image_crop_is_model_input(image_size):
  images = _images(4)
  views = _augment(_keys(4), images, _aug_config(**FULL_CROP), image_size)
  np.testing.assert_allclose(
      views, augment.model_input(images, image_size), atol=1e-6)


def test_crop_resize_matches_tf_for_given_boxes():
  image = _images(1)[0, :, :, 0] / np.float32(255.0)
  for top, left, height, width in [(3, 10, 91, 91), (30, 5, 36, 50),
                                   (1, 2, 127, 64)]:
    for size in (32, 128):
      expected = tf.image.resize(
          image[top:top + height, left:left + width, None], [size, size],
          method='bilinear', antialias=True).numpy()[..., 0]
      actual = augment._resample(
          jnp.asarray(image),
          augment.resize_weights(top, height, INPUT_SIZE, size),
          augment.resize_weights(left, width, INPUT_SIZE, size))
      np.testing.assert_allclose(actual, expected, atol=1e-6)


# ---------------------------------------------------------------- Crop distribution.


def _ramps():
  """uint8 images whose values are 2 x column and 2 x row."""
  ramp = np.broadcast_to(2 * np.arange(INPUT_SIZE, dtype=np.uint8),
                         (INPUT_SIZE, INPUT_SIZE))
  return ramp, ramp.T


def _boxes_from_views(view_x, view_y):
  """Reads the crop boxes off views of the two ramps.

  A resized ramp stays a ramp inside the crop, so two output pixels away from
  the border (where the kernel is cut) give the crop's side and centre; sides
  are whole pixels and centres half pixels, which rounding recovers exactly.

  Args:
    view_x: [N, S, S] views of the column ramp.
    view_y: [N, S, S] views of the row ramp, with the same crops.

  Returns:
    [N, 4]: width, height, centre x and centre y in input pixels.
  """
  size = view_x.shape[-1]
  near, far = size // 8, size - 1 - size // 8

  def extent(profile):
    profile = profile * 255.0 / 2.0
    side = (profile[:, far] - profile[:, near]) * size / (far - near)
    centre = (profile[:, near] + profile[:, far]) / 2.0 + 0.5
    return np.round(side), np.round(2.0 * centre) / 2.0

  width, centre_x = extent(view_x.mean(axis=1))
  height, centre_y = extent(view_y.mean(axis=2))
  return np.stack([width, height, centre_x, centre_y], axis=1)


def _crop_stats(boxes):
  """Returns [4, N]: area share, width / height, centre x and centre y."""
  width, height, centre_x, centre_y = boxes.T
  return np.stack([width * height / INPUT_SIZE**2, width / height, centre_x,
                   centre_y])


def _jax_boxes(config, num):
  """Boxes `crop_boxes` draws (centre = offset + half the side)."""
  top, left, height, width = np.asarray(jax.jit(
      augment.crop_boxes, static_argnums=(1, 2, 3))(
          _keys(num), INPUT_SIZE, INPUT_SIZE, config)).T
  return np.stack([width, height, left + width / 2, top + height / 2], axis=1)


def _jax_view_boxes(config, num):
  """Boxes read off `augment_batch`'s views of the ramps."""
  views = [np.asarray(_augment(_keys(num), np.broadcast_to(
      ramp[None, :, :, None], (num,) + ramp.shape + (1,)), config,
                               CROP_OUTPUT))[..., 0] for ramp in _ramps()]
  return _boxes_from_views(*views)


def _tf_view_boxes(config, num):
  """Boxes read off `tf_augment.simclr_view`'s views of the ramps."""
  ramps = tf.constant(np.stack(_ramps(), axis=-1))  # Two channels, one crop.
  seeds = tf.stack([tf.fill([num], 7), tf.range(num)], axis=1)
  views = tf.function(lambda seeds: tf.map_fn(
      lambda seed: tf_augment.simclr_view(ramps, seed, config, CROP_OUTPUT),
      seeds, fn_output_signature=tf.float32, parallel_iterations=16))(seeds)
  views = views.numpy()
  return _boxes_from_views(views[..., 0], views[..., 1])


def _side_uniform_boxes(config, num):
  """Boxes whose side, not area, is uniform: a wrong sampler, on purpose."""
  rng = np.random.default_rng(0)
  side = rng.uniform(*np.sqrt(config.crop_scale), (num, 10))
  aspect = np.exp(rng.uniform(*np.log(config.crop_ratio), (num, 10)))
  widths = np.round(side * INPUT_SIZE * np.sqrt(aspect))
  heights = np.round(side * INPUT_SIZE / np.sqrt(aspect))
  first = np.argmax((widths <= INPUT_SIZE) & (heights <= INPUT_SIZE), axis=1)
  rows = np.arange(num)
  width, height = widths[rows, first], heights[rows, first]
  return np.stack([width, height, width, height], axis=1)  # Centres unused.


REFERENCE_CROP = dict(crop_scale=(0.5, 1.0), crop_ratio=(1.0, 1.0))
SIMCLR_CROP = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3))


@pytest.mark.parametrize('crop', [REFERENCE_CROP, SIMCLR_CROP])
def test_views_are_crops_of_the_drawn_box(crop):
  config = _aug_config(**crop)
  np.testing.assert_array_equal(_jax_view_boxes(config, 200),
                                _jax_boxes(config, 200))


@pytest.mark.parametrize('crop', [REFERENCE_CROP, SIMCLR_CROP])
def test_crop_distribution_matches_tf(crop):
  config = _aug_config(**crop)
  actual = _crop_stats(_jax_boxes(config, NUM_JAX_CROPS))
  expected = _crop_stats(_tf_view_boxes(config, NUM_TF_CROPS))
  scale, ratio = crop['crop_scale'], crop['crop_ratio']
  # Sides rounded to whole pixels move area and aspect by 1 / (shortest side).
  slack = 1.05 / (INPUT_SIZE * math.sqrt(scale[0] * min(ratio[0], 1 / ratio[1])))
  assert scale[0] * (1 - slack) <= actual[0].min() <= actual[0].max() <= scale[1]
  assert ratio[0] * (1 - slack) <= actual[1].min()
  assert actual[1].max() <= ratio[1] * (1 + slack)
  for name, a, b in zip(('area', 'aspect', 'centre x', 'centre y'), actual,
                        expected):
    assert _ks_distance(a, b) < KS_TOLERANCE, name
  # The test can fail: wrong samplers are farther from TF than the tolerance.
  if crop is REFERENCE_CROP:
    wrong = _jax_boxes(_aug_config(crop_scale=(0.08, 1.0)), NUM_JAX_CROPS)
  else:
    wrong = _side_uniform_boxes(config, NUM_JAX_CROPS)
  assert _ks_distance(_crop_stats(wrong)[0], expected[0]) > KS_TOLERANCE


# ---------------------------------------------------------------- Other augmentations.


def test_flip_mirrors_about_half_and_keeps_the_crop():
  images = _images(64)
  base = np.asarray(_augment(_keys(64), images, _aug_config(), CROP_OUTPUT))
  flipped = np.asarray(_augment(_keys(64), images, _aug_config(flip=True),
                                CROP_OUTPUT))
  mirrored = 0
  for view, original in zip(flipped, base):
    if not np.array_equal(view, original):
      np.testing.assert_array_equal(view, original[:, ::-1])
      mirrored += 1
  assert 20 <= mirrored <= 44


def test_rotate_turns_like_tf_and_np_rot90():
  image = np.random.default_rng(0).uniform(size=(33, 33)).astype(np.float32)
  np.testing.assert_allclose(augment.rotate(jnp.asarray(image), 90.0),
                             np.rot90(image), atol=1e-5)
  angle = math.radians(30.0)
  cos, sin, last = math.cos(angle), math.sin(angle), 32.0
  x_offset = (last - (cos * last - sin * last)) / 2.0
  y_offset = (last - (sin * last + cos * last)) / 2.0
  expected = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None, :, :, None],
      transforms=tf.constant([[cos, -sin, x_offset, sin, cos, y_offset, 0, 0]],
                             tf.float32),
      output_shape=[33, 33], fill_value=0.0, interpolation='BILINEAR',
      fill_mode='CONSTANT').numpy()[0, :, :, 0]
  np.testing.assert_allclose(augment.rotate(jnp.asarray(image), 30.0),
                             expected, atol=1e-5)


def test_rotation_angles_are_uniform_with_black_corners():
  num, size, max_degrees = 400, 64, 30.0
  ramp = np.broadcast_to(4 * np.arange(size, dtype=np.uint8), (size, size))
  images = np.broadcast_to(ramp[None, :, :, None], (num, size, size, 1))
  config = _aug_config(rotation_degrees=max_degrees, **FULL_CROP)
  views = np.asarray(_augment(_keys(num), images, config, size))[..., 0]
  # A rotated ramp is a ramp whose gradient turned by the angle.
  centre, step = size // 2, 8
  grad_x = views[:, centre, centre + step] - views[:, centre, centre - step]
  grad_y = views[:, centre + step, centre] - views[:, centre - step, centre]
  angles = np.degrees(np.arctan2(-grad_y, grad_x))
  assert np.abs(angles).max() <= max_degrees + 0.5
  uniform = np.random.default_rng(0).uniform(-max_degrees, max_degrees, num)
  assert _ks_distance(angles, uniform) < 0.12
  white = np.full((num, size, size, 1), 255, np.uint8)
  views = np.asarray(_augment(_keys(num), white, config, size))[..., 0]
  corners = views[:, [0, 0, -1, -1], [0, -1, 0, -1]]
  assert corners.max() < 1.0 and corners.mean() < 0.5
  np.testing.assert_allclose(views[:, centre, centre], 1.0)


def test_brightness_adds_a_uniform_delta():
  num, max_delta = 500, 0.2
  images = np.full((num, 32, 32, 1), 128, np.uint8)
  views = np.asarray(_augment(
      _keys(num), images, _aug_config(brightness=max_delta, **FULL_CROP),
      32))[..., 0]
  assert np.ptp(views, axis=(1, 2)).max() < 1e-6  # One delta per image.
  deltas = views[:, 0, 0] - 128 / 255
  assert np.abs(deltas).max() <= max_delta + 1e-6
  assert abs(deltas.mean()) < 0.02
  assert deltas.std() == pytest.approx(max_delta / math.sqrt(3), rel=0.1)


def test_contrast_scales_about_the_mean():
  num, max_change = 500, 0.5
  image = np.full((32, 32), 64, np.uint8)
  image[:, 16:] = 192
  images = np.broadcast_to(image[None, :, :, None], (num, 32, 32, 1))
  views = np.asarray(_augment(
      _keys(num), images, _aug_config(contrast=max_change, **FULL_CROP),
      32))[..., 0]
  np.testing.assert_allclose(views.mean(axis=(1, 2)), 128 / 255, atol=1e-5)
  factors = views.std(axis=(1, 2)) / (image / 255).std()
  assert 1 - max_change - 1e-4 <= factors.min()
  assert factors.max() <= 1 + max_change + 1e-4
  assert abs(factors.mean() - 1.0) < 0.03
  assert factors.std() == pytest.approx(max_change / math.sqrt(3), rel=0.1)


def _high_frequency_energy(views):
  return np.mean(np.square(np.diff(views, axis=-1)), axis=(-2, -1))


def test_blur_smooths_about_half_of_the_views_like_tf():
  num, size = 300, 64
  images = _images(num, size=size)
  sharp = np.asarray(augment.model_input(images, size))[..., 0]
  views = np.asarray(_augment(
      _keys(num), images, _aug_config(blur=True, **FULL_CROP), size))[..., 0]
  ratio = _high_frequency_energy(views) / _high_frequency_energy(sharp)
  blurred = ratio < 0.99  # sigma near 0.1 leaves an image as it was.
  assert 0.3 <= blurred.mean() <= 0.6
  assert ratio.min() < 0.3  # sigma near 2 smooths noise strongly.
  np.testing.assert_allclose(views[~blurred], sharp[~blurred], atol=1e-2)
  # TF blurs with the same kernel: the energy ratios have one distribution.
  noise = tf.constant(sharp[..., None])
  tf_views = tf.function(lambda: tf.map_fn(
      lambda i: tf_augment.random_gaussian_blur(
          noise[i], tf.stack([tf.constant(3), i]), size),
      tf.range(num), fn_output_signature=tf.float32))().numpy()[..., 0]
  tf_ratio = _high_frequency_energy(tf_views) / _high_frequency_energy(sharp)
  assert _ks_distance(ratio, tf_ratio) < 0.15


# ---------------------------------------------------------------- Switches (from the TF tests).


@pytest.mark.parametrize('scale,ratio', [((0.25, 0.25), (1.0, 1.0)),
                                         ((0.5, 1.0), (1.0, 1.0)),
                                         ((0.3, 0.6), (0.5, 2.0))])
def test_crop_respects_scale_and_ratio(scale, ratio):
  boxes = np.asarray(jax.jit(augment.crop_boxes, static_argnums=(1, 2, 3))(
      _keys(64), INPUT_SIZE, INPUT_SIZE, _aug_config(crop_scale=scale, crop_ratio=ratio)))
  heights, widths = boxes[:, 2] / INPUT_SIZE, boxes[:, 3] / INPUT_SIZE
  # Integer sides: the area and ratio hold up to the rounding of one pixel.
  assert np.all(widths * heights >= scale[0] * 0.97)
  assert np.all(widths * heights <= scale[1] * 1.03)
  assert np.all(widths / heights >= ratio[0] * 0.97)
  assert np.all(widths / heights <= ratio[1] * 1.03)
  if scale[0] < scale[1]:
    assert np.ptp(widths * heights) > 0.05  # The area is drawn, not fixed.


@pytest.mark.parametrize('switch', [
    dict(flip=True), dict(rotation_degrees=20.0), dict(brightness=0.3),
    dict(contrast=0.5), dict(blur=True)])
def test_each_switch_changes_views_only_when_on(switch):
  images = _images(12)
  keys = _keys(12)
  base = np.asarray(_augment(keys, images, _aug_config(), CROP_OUTPUT))
  explicit_off = _aug_config(**{key: type(value)(0) for key, value in switch.items()})
  np.testing.assert_array_equal(_augment(keys, images, explicit_off, CROP_OUTPUT), base)
  on = np.asarray(_augment(keys, images, _aug_config(**switch), CROP_OUTPUT))
  changed = sum(not np.array_equal(a, b) for a, b in zip(on, base))
  # Flip and blur apply to about half of the views, the others to all.
  assert changed >= 2


def test_blur_keeps_flat_regions():
  flat = np.full((8, INPUT_SIZE, INPUT_SIZE, 1), 128, np.uint8)
  views = np.asarray(_augment(_keys(8), flat, _aug_config(blur=True, **FULL_CROP),
                              CROP_OUTPUT))
  radius = max(1, CROP_OUTPUT // 20)
  inner = slice(radius, -radius)
  np.testing.assert_allclose(views[:, inner, inner], 128 / 255, atol=1e-5)
