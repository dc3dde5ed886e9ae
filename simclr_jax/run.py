"""Dispatch of a config to its mode, shared by main.py and the tests."""

import importlib
import logging
import os

MODES = {
    'pretrain': ('simclr_jax.train', 'train_and_evaluate'),
    'finetune': ('simclr_jax.train', 'train_and_evaluate'),
    'baseline': ('simclr_jax.train', 'train_and_evaluate'),
    'predict': ('simclr_jax.predict', 'predict'),
    'sweep': ('simclr_jax.sweep', 'run_sweep'),
    'audit': ('simclr_jax.audit', 'run_audit'),
}


def _quiet_orbax(record):
  """Drops orbax's per-save INFO lines; its warnings and errors still show."""
  return record.levelno >= logging.WARNING or 'orbax' not in record.pathname


def setup_runtime():
  """Keeps TensorFlow (tf.data only) off accelerators; caches compiled steps on disk."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_quiet_orbax)
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU') if tf.config.list_physical_devices('TPU') else None
  # A persistent compilation cache makes the second run of a config start in seconds.
  cache_dir = os.environ.get('SIMCLR_JAX_CACHE',
                             os.path.join(os.path.expanduser('~'), '.cache', 'simclr_jax'))
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def run(config, workdir):
  """Runs `config.mode` in `workdir` and returns what the mode returns."""
  if config.mode not in MODES:
    raise ValueError(f'Unknown mode {config.mode!r}; set --config.mode to one of '
                     f'{sorted(MODES)} (or pick a file in configs/).')
  module_name, function_name = MODES[config.mode]
  return getattr(importlib.import_module(module_name), function_name)(config, workdir)
