r"""Throughput of the SimCLR input pipeline: augmented two-view batches per second.

Times `input_pipeline.pretrain_batches` (two views of each image, 3 channels)
on random 128 px images, or on the Kaggle data when --dataset_path points at
its zip. Prints the rate of each timed window, then the median; the last line
is JSON.

  python benchmarks/input_pipeline.py
  python benchmarks/input_pipeline.py --all_augmentations
  python benchmarks/input_pipeline.py \
      --dataset_path=../shared/data/alzheimer-mri-dataset.zip --data_dir=/tmp/tfds
"""

import json
import pathlib
import statistics
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import default  # pylint: disable=g-import-not-at-top
from simclr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
from simclr_jax import input_pipeline  # pylint: disable=g-import-not-at-top

_DATASET_PATH = flags.DEFINE_string(
    'dataset_path', None,
    'Kaggle zip of the Alzheimer MRI data; random images when unset.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir.')
_NUM_IMAGES = flags.DEFINE_integer(
    'num_images', 1024, 'Random images to draw from when no dataset_path.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 128, 'Output image side.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
_ALL_AUGMENTATIONS = flags.DEFINE_bool(
    'all_augmentations', False,
    'Switch on flip, rotation, brightness, contrast and blur besides the crop.')
_WARMUP_BATCHES = flags.DEFINE_integer('warmup_batches', 10, 'Untimed batches.')
_WINDOW_BATCHES = flags.DEFINE_integer('window_batches', 20,
                                       'Batches per timed window.')
_NUM_WINDOWS = flags.DEFINE_integer('num_windows', 5, 'Timed windows.')


def random_arrays(num_images, image_size):
  """Returns random uint8 images; augmentation cost does not depend on pixels."""
  rng = np.random.default_rng(0)
  return data_lib.DatasetArrays(
      images=rng.integers(0, 256, (num_images, image_size, image_size, 1),
                          dtype=np.uint8),
      labels=np.zeros(num_images, np.int32),
      subject_ids=np.arange(num_images, dtype=np.int64),
      slice_index=np.zeros(num_images, np.int32),
      file_names=np.array([f'{i}.jpg' for i in range(num_images)]),
      class_names=['all'])


def main(argv):
  del argv
  config = default.get_config()
  config.image_size = _IMAGE_SIZE.value
  config.channels = 3
  config.batch_size = _BATCH_SIZE.value
  if _ALL_AUGMENTATIONS.value:
    config.augment.update(dict(flip=True, rotation_degrees=10.0,
                               brightness=0.2, contrast=0.2, blur=True))
  if _DATASET_PATH.value:
    config.dataset = 'alzheimer_mri'
    config.dataset_path = _DATASET_PATH.value
    config.data_dir = _DATA_DIR.value
    arrays = data_lib.load_arrays(config)
    source = 'alzheimer_mri'
  else:
    arrays = random_arrays(_NUM_IMAGES.value, _IMAGE_SIZE.value)
    source = 'random'

  batches = input_pipeline.pretrain_batches(
      arrays, np.arange(len(arrays)), config, seed=0, start_step=0)
  for _ in range(_WARMUP_BATCHES.value):
    next(batches)
  rates = []
  for window in range(_NUM_WINDOWS.value):
    start = time.perf_counter()
    for _ in range(_WINDOW_BATCHES.value):
      next(batches)
    rate = _WINDOW_BATCHES.value / (time.perf_counter() - start)
    rates.append(rate)
    print(f'window {window}: {rate:.1f} two-view batches/s')

  batches_per_s = statistics.median(rates)
  result = {
      'benchmark': 'input_pipeline.pretrain_batches',
      'source': source,
      'image_size': config.image_size,
      'channels': config.channels,
      'batch_size': config.batch_size,
      'all_augmentations': _ALL_AUGMENTATIONS.value,
      'batches_per_s': round(batches_per_s, 2),
      'images_per_s': round(batches_per_s * config.batch_size, 1),
      'views_per_s': round(2 * batches_per_s * config.batch_size, 1),
  }
  print(f'median: {result["batches_per_s"]} two-view batches/s = '
        f'{result["images_per_s"]} images/s ({result["views_per_s"]} views/s)')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
