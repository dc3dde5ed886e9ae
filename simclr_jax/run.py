"""The registry of modes, and a run of one: its config checked once, then its work.

Each mode is a module with `check_config(config)` (raises errors.UserError naming
the fix) and `main(config, workdir)`, as scenic's registry maps a trainer's name to
its function; `run` checks a config once, then calls its mode.
"""

import importlib
import logging
import os
import sys
import tempfile

from simclr_jax import checks
from simclr_jax import errors

MODES = {
    'pretrain': 'simclr_jax.train.mode',
    'finetune': 'simclr_jax.train.mode',
    'baseline': 'simclr_jax.train.mode',
    'predict': 'simclr_jax.predict',
    'sweep': 'simclr_jax.study.sweep',
    'audit': 'simclr_jax.audit',
}
# What TensorFlow's C++ libraries print on stderr while they load, whatever
# TF_CPP_MIN_LOG_LEVEL says: notices, not problems.
TENSORFLOW_STARTUP_NOISE = (
    'All log messages before absl::InitializeLog() is called',
    'oneDNN custom operations are on',
    'This TensorFlow binary is optimized to use available CPU instructions',
    'To enable the following instructions:',
)
# JAX tries every backend it knows and says so, at INFO level, for each one missing.
JAX_STARTUP_NOISE = ('Unable to initialize backend',)


def _quiet(record):
  """Drops orbax's per-save INFO lines and JAX's start-up notices; warnings still show.

  Orbax's own tracebacks of a full or read-only disk are dropped too: main.py
  reports that in one line.
  """
  if ('orbax' in record.pathname and record.exc_info
      and errors.is_disk_failure(record.exc_info[1])):
    return False
  if record.levelno >= logging.WARNING:
    return True
  if 'orbax' in record.pathname:
    return False
  return not any(noise in record.getMessage() for noise in JAX_STARTUP_NOISE)


def quiet_logs():
  """Installs the filter of known noise on absl's log handler (once)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  if _quiet not in handler.filters:
    handler.addFilter(_quiet)


def import_tensorflow_quietly():
  """Imports TensorFlow with its start-up notices dropped from stderr; other lines kept.

  The notices come from C++ (before absl::InitializeLog) and ignore
  TF_CPP_MIN_LOG_LEVEL, so stderr's file descriptor is caught while TensorFlow
  loads and replayed without them.
  """
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as caught:
    os.dup2(caught.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      caught.seek(0)
      for line in caught.read().decode('utf-8', 'replace').splitlines(keepends=True):
        if not any(noise in line for noise in TENSORFLOW_STARTUP_NOISE):
          sys.stderr.write(line)
      sys.stderr.flush()
  return tf


def setup_runtime():
  """Keeps TensorFlow (tf.data only) off accelerators and quiet; caches compiled steps.

  TFDS's progress bars are drawn only on a terminal: in a log file their
  carriage returns leave fragments on every line.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # main.py sets it before jax loads.
  quiet_logs()
  import jax  # pylint: disable=g-import-not-at-top
  tf = import_tensorflow_quietly()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU') if tf.config.list_physical_devices('TPU') else None
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()
  # A persistent compilation cache makes the second run of a config start in seconds.
  cache_dir = os.environ.get('SIMCLR_JAX_CACHE',
                             os.path.join(os.path.expanduser('~'), '.cache', 'simclr_jax'))
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  # Programs that compile in under a second are not worth a file, unless JAX's own
  # variable says otherwise (the tests' subprocesses share even small ones).
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def run(config, workdir, setup=None):
  """Checks `config` and `workdir`, then runs `config.mode` there; returns what it returns.

  Args:
    config: a config of any mode (configs/*.py).
    workdir: the run's directory.
    setup: called after the checks, before any work (main.py: `setup_runtime`),
      so that a mistake is reported before any data set or device is touched.

  Raises:
    errors.UserError: for any config value, path or run a mode cannot use, and
      for a workdir that another invocation is using (workdir_lock).
  """
  mode = mode_module(config)
  mode.check_config(config)
  checks.check_workdir(workdir)
  if setup is not None:
    setup()
  from simclr_jax.train import workdir_lock  # pylint: disable=g-import-not-at-top
  with workdir_lock.hold(workdir):  # One invocation per workdir.
    return mode.main(config, workdir)


def mode_module(config):
  """The module of `config.mode`, imported on demand (`--help` stays fast).

  The modes write summaries through clu, which imports TensorFlow: it is imported
  first, quietly, so that its start-up notices never reach the user.
  """
  mode = config.get('mode')
  if mode not in MODES:
    raise errors.UserError(f'Unknown mode {mode!r}; set --config.mode to one of '
                           f'{sorted(MODES)} (or pick a file in configs/).')
  import_tensorflow_quietly()
  return importlib.import_module(MODES[mode])


def check_config(config):
  """Checks `config` for its mode, as `run` does before any work."""
  mode_module(config).check_config(config)
