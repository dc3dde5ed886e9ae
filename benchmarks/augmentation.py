r"""Throughput of the SimCLR batch maker: augmented two-view batches per second.

Times `batches.simclr_batch` jitted on its own, as the train steps run it on the
devices: the rows of a batch gathered from the uint8 data set on the devices, then
two augmented views of each image (3 channels). On random 128 px images, or on
the Kaggle data when --dataset_path points at its zip. Prints the rate of each
timed window, then the median; the last line is JSON.

  python benchmarks/augmentation.py
  python benchmarks/augmentation.py --all_augmentations
  python benchmarks/augmentation.py \
      --dataset_path=../shared/data/alzheimer-mri-dataset.zip --data_dir=/tmp/tfds
"""

import json
import pathlib
import statistics
import sys
import time
import types

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import default  # pylint: disable=g-import-not-at-top
from simclr_jax.data import batches  # pylint: disable=g-import-not-at-top
from simclr_jax.parallel import sharding  # pylint: disable=g-import-not-at-top

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
  """Random uint8 images (augmentation cost does not depend on pixels), as DatasetArrays has."""
  rng = np.random.default_rng(0)
  return types.SimpleNamespace(
      images=rng.integers(0, 256, (num_images, image_size, image_size, 1), dtype=np.uint8),
      labels=np.zeros(num_images, np.int32))


def main(argv):
  del argv
  config = default.get_config()
  config.data.image_size = _IMAGE_SIZE.value
  config.data.channels = 3
  config.train.batch_size = _BATCH_SIZE.value
  if _ALL_AUGMENTATIONS.value:
    config.augment.update(dict(flip=True, rotation_degrees=10.0,
                               brightness=0.2, contrast=0.2, blur=True))
  if _DATASET_PATH.value:
    config.data.name = 'alzheimer_mri'
    config.data.path = _DATASET_PATH.value
    config.data.dir = _DATA_DIR.value
    # TensorFlow only where the data set is read: random images need none.
    from simclr_jax.data import arrays as arrays_lib  # pylint: disable=g-import-not-at-top
    arrays = arrays_lib.load_arrays(config)
    source = 'alzheimer_mri'
  else:
    arrays = random_arrays(_NUM_IMAGES.value, _IMAGE_SIZE.value)
    source = 'random'

  mesh = sharding.create_mesh()
  data = batches.DeviceDataset(arrays, mesh, on_device=True)
  rows = batches.TrainingRows(np.arange(len(arrays.labels)), config.train.batch_size, seed=0)
  key = sharding.replicate_tree(batches.augment_key(0), mesh)

  def make(data, inputs, key):
    images, labels = batches.DeviceDataset.images(data, inputs)
    return batches.simclr_batch(images, labels, inputs['position'], key, None, config=config)

  make = jax.jit(make)
  step = iter(range(10**9))
  next_batch = lambda: make(data.arrays, data.inputs(rows.step_inputs(next(step))), key)
  for _ in range(_WARMUP_BATCHES.value):
    jax.block_until_ready(next_batch())
  rates = []
  for window in range(_NUM_WINDOWS.value):
    start = time.perf_counter()
    views = [next_batch() for _ in range(_WINDOW_BATCHES.value)]
    jax.block_until_ready(views)
    rate = _WINDOW_BATCHES.value / (time.perf_counter() - start)
    rates.append(rate)
    print(f'window {window}: {rate:.1f} two-view batches/s')

  batches_per_s = statistics.median(rates)
  result = {
      'benchmark': 'batches.simclr_batch',
      'source': source,
      'image_size': config.data.image_size,
      'channels': config.data.channels,
      'batch_size': config.train.batch_size,
      'all_augmentations': _ALL_AUGMENTATIONS.value,
      'batches_per_s': round(batches_per_s, 2),
      'images_per_s': round(batches_per_s * config.train.batch_size, 1),
      'views_per_s': round(2 * batches_per_s * config.train.batch_size, 1),
  }
  print(f'median: {result["batches_per_s"]} two-view batches/s = '
        f'{result["images_per_s"]} images/s ({result["views_per_s"]} views/s)')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
