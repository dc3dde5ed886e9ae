"""Shared fixtures: tiny configs on the small synthetic data set, built once."""

import csv
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from configs import default
from configs import sweep as sweep_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KAGGLE_ZIP = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'alzheimer-mri-dataset.zip')


def tiny_config(data_dir, mode='pretrain', **overrides):
  """A config whose runs take seconds on a CPU: ResNet-18 at 1/8 width, 32 px.

  `overrides` name fields by their dotted path (`**{'train.batch_size': 8}`) or, for
  brevity, by their name before the config had sections (`batch_size=8`, mapped
  through configs/default.FLAT_NAMES); a section the config lacks is created.
  """
  config = default.get_config()
  config.mode = mode
  if mode == 'sweep':
    config.sweep = sweep_config.sweep_section()
    config.cam = default.cam_section()
  config.data.update(name='synthetic_mri/small', dir=data_dir, image_size=32, channels=1)
  config.model.update(name='resnet18', width=0.125, encoder_output='avgpool')
  config.pretrain.projection_dims = (32, 16)
  config.train.update(batch_size=16, num_epochs=2)  # Run length.
  config.eval.update(batch_size=32, knn_k=(1, 5))
  config.train.update(log_every_steps=4, checkpoint_every_steps=5,
                      num_summary_images=2)  # Reports.
  return with_fields(config, **overrides)


def with_fields(config, **overrides):
  """`config` with `overrides` set: dotted paths, or names of the flat config (FLAT_NAMES)."""
  for key, value in overrides.items():
    set_field(config, default.FLAT_NAMES.get(key, key), value)
  return config


def run_on_host_devices(code, num_devices=8, timeout=900):
  """Runs Python `code` in a new process with `num_devices` CPU devices; its stdout.

  Fails the test, with the end of its stderr, when the process fails.
  """
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def set_field(config, path, value):
  """config.a.b = value for path 'a.b', creating missing sections."""
  *sections, name = path.split('.')
  for section in sections:
    if section not in config:
      config[section] = ml_collections.ConfigDict()
    config = config[section]
  config[name] = value


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """Tests that compile the same tiny steps share one persistent compilation cache.

  One for the whole session: with pytest-xdist (-n) its workers share it too (their
  temporary folders sit side by side in one base folder).
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  cache = str(base / 'jax_cache')
  os.makedirs(cache, exist_ok=True)
  os.environ['SIMCLR_JAX_CACHE'] = cache  # Subprocesses (main.py) use it too,
  # with every program, however quick to compile: they start afresh, 6-9 per test.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  yield cache


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session's tests (the small synthetic set is built once)."""
  return str(tmp_path_factory.mktemp('tfds'))


def metric_rows(workdir):
  """A sweep's results.csv rows without their timings (what must not change)."""
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  return [{k: v for k, v in row.items() if 'wall' not in k and 'seconds' not in k}
          for row in rows]


def wait_all(processes, timeout):
  """Waits for every subprocess (`timeout` seconds each); kills those still running."""
  try:
    for process in processes:
      process.wait(timeout=timeout)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()


@pytest.fixture(scope='session')
def fake_sweep(data_dir, tmp_path_factory):
  """(config, workdir, fake, summary, gradcam calls) of one sweep with training faked
  (tests/fake_sweep.py), shared by the tests that read its reports."""
  from tests import fake_sweep as fake  # pylint: disable=g-import-not-at-top
  with pytest.MonkeyPatch.context() as monkeypatch:  # Undone before the other tests.
    return fake.run_fake_sweep(data_dir, str(tmp_path_factory.mktemp('sweep')), monkeypatch)
