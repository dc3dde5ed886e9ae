"""Tests of the stateless SimCLR view augmentation."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from simclr_jax import augment

INPUT_SIZE = 48
OUTPUT_SIZE = 32


def _aug_config(**overrides):
  """Returns config.augment with every switch off (the reference's crop only)."""
  config = ml_collections.ConfigDict(dict(
      crop_scale=(0.5, 1.0), crop_ratio=(1.0, 1.0), flip=False,
      rotation_degrees=0.0, brightness=0.0, contrast=0.0, blur=False))
  config.update(overrides)
  return config


def _image(seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (INPUT_SIZE, INPUT_SIZE, 1), dtype=np.uint8)


def _view(image, seed, config):
  return augment.simclr_view(
      image, tf.constant([7, seed], tf.int64), config, OUTPUT_SIZE).numpy()


def test_same_seed_gives_same_view():
  config = _aug_config(flip=True, rotation_degrees=10.0, brightness=0.2,
                       contrast=0.2, blur=True)
  np.testing.assert_array_equal(_view(_image(), 3, config),
                                _view(_image(), 3, config))


def test_different_seeds_give_different_views():
  views = [_view(_image(), seed, _aug_config()) for seed in range(4)]
  for i in range(len(views)):
    for j in range(i):
      assert not np.array_equal(views[i], views[j])


def test_output_shape_dtype_and_range():
  config = _aug_config(flip=True, rotation_degrees=30.0, brightness=0.5,
                       contrast=0.5, blur=True)
  for seed in range(4):
    view = _view(_image(seed), seed, config)
    assert view.shape == (OUTPUT_SIZE, OUTPUT_SIZE, 1)
    assert view.dtype == np.float32
    assert view.min() >= 0.0 and view.max() <= 1.0


def _crop_extent(config, seed):
  """Returns the crop's (width, height) shares, read off ramp images."""
  ramp = np.linspace(0.0, 1.0, INPUT_SIZE, dtype=np.float32)
  ramp_x = np.tile(ramp[None, :, None], (INPUT_SIZE, 1, 1))
  ramp_y = np.transpose(ramp_x, (1, 0, 2))
  # The crop depends on the image shape and the seed only, not on the pixels.
  view_x = _view(ramp_x, seed, config)
  view_y = _view(ramp_y, seed, config)
  width = view_x[:, -1].mean() - view_x[:, 0].mean()
  height = view_y[-1].mean() - view_y[0].mean()
  return width, height


@pytest.mark.parametrize('scale,ratio', [((0.25, 0.25), (1.0, 1.0)),
                                         ((0.5, 1.0), (1.0, 1.0)),
                                         ((0.3, 0.6), (0.5, 2.0))])
def test_crop_respects_scale_and_ratio(scale, ratio):
  config = _aug_config(crop_scale=scale, crop_ratio=ratio)
  areas = []
  for seed in range(8):
    width, height = _crop_extent(config, seed)
    # Resizing blurs the outermost pixels, which shrinks the measured span.
    assert scale[0] * 0.85 <= width * height <= scale[1] * 1.05
    assert ratio[0] * 0.85 <= width / height <= ratio[1] * 1.15
    areas.append(width * height)
  if scale[0] < scale[1]:
    assert np.ptp(areas) > 0.05  # The area is drawn, not fixed.


def test_full_scale_crop_is_the_resized_image():
  image = _image()
  view = _view(image, 0, _aug_config(crop_scale=(1.0, 1.0)))
  resized = tf.image.resize(image / 255.0, [OUTPUT_SIZE, OUTPUT_SIZE],
                            method='bilinear', antialias=True).numpy()
  np.testing.assert_allclose(view, resized, atol=1e-5)


@pytest.mark.parametrize('switch', [
    dict(flip=True), dict(rotation_degrees=20.0), dict(brightness=0.3),
    dict(contrast=0.5), dict(blur=True)])
def test_each_switch_changes_views_only_when_on(switch):
  image = _image()
  off = _aug_config()
  on = _aug_config(**switch)
  explicit_off = _aug_config(
      **{key: type(value)(0) for key, value in switch.items()})
  changed = 0
  for seed in range(6):
    base = _view(image, seed, off)
    np.testing.assert_array_equal(_view(image, seed, explicit_off), base)
    changed += not np.array_equal(_view(image, seed, on), base)
  # Flip and blur apply to about half of the views, the others to all.
  assert changed >= 2


def test_switching_flip_on_keeps_the_crop():
  image = _image()
  for seed in range(6):
    base = _view(image, seed, _aug_config())
    flipped = _view(image, seed, _aug_config(flip=True))
    assert (np.array_equal(flipped, base) or
            np.array_equal(flipped, base[:, ::-1]))


def test_rotation_turns_a_bar_about_the_centre():
  bar = np.zeros((OUTPUT_SIZE + 1, OUTPUT_SIZE + 1, 1), np.float32)
  bar[OUTPUT_SIZE // 2, :] = 1.0  # A horizontal line through the centre.
  rotated = augment.random_rotation(
      tf.constant(bar), tf.constant([0, 1], tf.int64), 45.0).numpy()
  centre = OUTPUT_SIZE // 2
  assert rotated[centre, centre, 0] == pytest.approx(1.0)  # The pivot stays.
  assert not np.allclose(rotated, bar)
  assert rotated.sum() == pytest.approx(bar.sum(), rel=0.5)


def test_blur_smooths_and_keeps_flat_regions():
  noise = np.random.default_rng(0).uniform(
      size=(OUTPUT_SIZE, OUTPUT_SIZE, 1)).astype(np.float32)
  flat = np.full_like(noise, 0.5)
  radius = OUTPUT_SIZE // 20
  inner = slice(radius, -radius)
  num_blurred = 0
  for seed in range(6):
    seed = tf.constant([3, seed], tf.int64)
    blurred = augment.random_gaussian_blur(noise, seed, OUTPUT_SIZE).numpy()
    if np.array_equal(blurred, noise):
      continue  # This view is one of the half left sharp.
    num_blurred += 1
    assert blurred.std() < noise.std()
    blurred_flat = augment.random_gaussian_blur(flat, seed, OUTPUT_SIZE).numpy()
    np.testing.assert_allclose(blurred_flat[inner, inner], 0.5, atol=1e-5)
  assert 1 <= num_blurred <= 5
