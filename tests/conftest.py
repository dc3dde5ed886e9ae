"""Shared fixtures: tiny configs on the small synthetic data set, built once."""

import os

import jax
import pytest

from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KAGGLE_ZIP = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'alzheimer-mri-dataset.zip')


def tiny_config(data_dir, mode='pretrain', **overrides):
  """A config whose runs take seconds on a CPU: ResNet-18 at 1/8 width, 32 px."""
  config = default.get_config()
  config.mode = mode
  config.dataset = 'synthetic_mri/small'
  config.data_dir = data_dir
  config.update(image_size=32, channels=1)  # Images.
  config.update(model='resnet18', width=0.125, encoder_output='avgpool',
                projection_dims=(32, 16))  # Model.
  config.update(batch_size=16, eval_batch_size=32, num_epochs=2)  # Run length.
  config.update(log_every_steps=4, checkpoint_every_steps=5, knn_k=(1, 5),
                num_summary_images=2)  # Reports.
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """Tests that compile the same tiny steps share one persistent compilation cache."""
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  os.environ['SIMCLR_JAX_CACHE'] = cache  # Subprocesses (main.py) use it too.
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  yield cache


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session's tests (the small synthetic set is built once)."""
  return str(tmp_path_factory.mktemp('tfds'))
