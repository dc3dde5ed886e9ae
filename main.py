"""Entry point: `python main.py --config=configs/<mode>.py[:args] --workdir=DIR`.

The config's `mode` picks what runs: pretrain, finetune, baseline (training),
predict (classification + Grad-CAM of new images), sweep (the label-budget study)
or audit (near-duplicate leakage audit). Any config field can be overridden with
`--config.section.field=value` (e.g. `--config.train.batch_size=64`).

A mistake of the user's (a flag, a config value, a path, a data set, a run
directory, a full disk) is one line on stderr, `error: <what and how to fix
it>`, and exit status 2; `--verbose` adds its traceback. Any other exception is
a bug and shows its traceback.

SIGTERM (a preemption, a SLURM time limit) or Ctrl-C saves a checkpoint at a
step every process agrees on, then stops with one `stopped: ...` line and exit
status 75 (run the same command again to resume); a second signal stops at once.
A workdir that another invocation is using is refused (its lock, run.lock).
"""

import os
import sys
import traceback

# Before TensorFlow or XLA loads (jax, below): no INFO or WARNING notices of their C++
# logging at start-up. Set the variable yourself to see them.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging
from clu import platform
import jax
from ml_collections import config_flags

from configs import default as default_config
from simclr_jax import errors
from simclr_jax.train import preemption

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and outputs.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for a multi-process launch (not needed on '
                    'Cloud TPU pods, under srun or Open MPI 4; Open MPI 5 over several '
                    'nodes needs it).')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process launch '
                     '(found by itself on Cloud TPU pods, SLURM and Open MPI); 1: one '
                     'process, whatever the environment says.')
flags.DEFINE_integer('process_id', None, 'This process of a multi-process launch, 0..N-1.')
flags.DEFINE_bool('verbose', False, 'Show the Python traceback of a user error too (it is '
                  'otherwise one line, "error: ...", with exit status 2).')
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/pretrain.py:runlocal.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'Unexpected arguments {argv[1:]}; pass settings as '
                           '--config.section.field=value (quote values with spaces or brackets).')
  # Imported here so that `--help` is fast; TensorFlow loads only after the checks
  # (run.setup_runtime) and never grabs an accelerator.
  from simclr_jax import run  # pylint: disable=g-import-not-at-top
  from simclr_jax.train import workdirs  # pylint: disable=g-import-not-at-top
  from simclr_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  run.quiet_logs()
  # Before anything starts JAX's backend.
  distributed.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                           FLAGS.process_id)
  # After jax.distributed.initialize, whose SIGTERM handler ours replaces.
  preemption.install_signal_handlers()
  logging.info('JAX process %d / %d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  platform.work_unit().set_task_status(
      f'process_index: {jax.process_index()}, process_count: {jax.process_count()}')
  platform.work_unit().create_artifact(platform.ArtifactType.DIRECTORY, FLAGS.workdir, 'workdir')
  run.run(FLAGS.config, workdirs.workdir_path(FLAGS.workdir), setup=run.setup_runtime)


def _fail(message, error, verbose):
  """Prints a user's mistake as one line (after its traceback if verbose) and exits 2."""
  if verbose:
    traceback.print_exception(error)
  sys.stderr.flush()
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  if errors.is_disk_failure(error):
    # A failed write leaves orbax's background save threads broken: at a normal exit
    # they would only add their own errors after this line (the lock is released).
    sys.stdout.flush()
    os._exit(errors.EXIT_STATUS)  # pylint: disable=protected-access
  sys.exit(errors.EXIT_STATUS)


def _verbose_in(argv):
  return any(arg in ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1')
             for arg in argv)


def parse_flags(argv):
  """absl's flag parsing, with a mistake on the command line told in one line."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.get('mode')  # A config file that could not be loaded raises here.
  except Exception as error:  # pylint: disable=broad-except
    message = errors.flag_error_message(error, argv, moved=default_config.FLAT_NAMES)
    if message is None:
      raise
    _fail(message, error, _verbose_in(argv))
  return remaining


def _stopped(stop):
  """A run that saved and stopped on request (SIGTERM): one line, exit status 75."""
  sys.stderr.flush()
  sys.stderr.write(f'stopped: {stop} (exit status {preemption.EXIT_STATUS}).\n')
  sys.stderr.flush()
  sys.exit(preemption.EXIT_STATUS)


def main_reporting_errors(argv):
  """`main`, with a user's mistake told in one line and exit status 2.

  A run stopped by SIGTERM (or Ctrl-C, or another process's preemption notice)
  after saving its checkpoint says so in one line and exits with status 75
  (simclr_jax/train/preemption.py).
  """
  try:
    main(argv)
  except preemption.Stopped as stop:
    _stopped(stop)
  except Exception as error:  # pylint: disable=broad-except
    message = errors.user_message(error, FLAGS.workdir)
    if message is None:
      raise
    _fail(message, error, FLAGS.verbose)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main_reporting_errors, flags_parser=parse_flags)
