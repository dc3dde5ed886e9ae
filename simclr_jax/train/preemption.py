"""Stopping well: SIGTERM, Ctrl-C or a JAX preemption notice save a checkpoint, then stop.

Cloud TPU spot VMs, maintenance events and SLURM time limits (`--signal=TERM@60`)
all send SIGTERM and kill the job a little later. The first SIGTERM (or SIGINT)
is a request: training goes on to a step that every process agrees on, saves its
`latest` checkpoint there, waits for the save, and raises `Stopped`, which
main.py reports in one line (how to resume) with exit status `EXIT_STATUS`. A
second SIGTERM or SIGINT stops the process at once (the default action of the
signal: no half-written checkpoint is ever read, since orbax renames a finished
save into place).

Which step:
- one process: the first dispatch boundary after the signal;
- several processes: JAX's preemption sync point
  (`multihost_utils.reached_preemption_sync_point`), asked at every training
  step: the first process told (by the signal, or by the coordination service
  when another process was) reports its step, and every process stops after the
  step max + 1. Orbax's CheckpointManager asks the same question with the same
  step numbers, so both agree.
- between the runs of a sweep (and before a run's first step) every process
  tells the others whether it was signalled (`stop_requested_anywhere`, one
  all-gather per run, none inside the step loop).

JAX installs its own SIGTERM handler (C++) in `jax.distributed.initialize`; it
swallows every SIGTERM after the first, so that a second one could not stop a
process stuck at a barrier. `install_signal_handlers` replaces it with ours and
posts the same preemption notice to the coordination service that JAX's handler
would (`_post_preemption_notice`).
"""

import dataclasses
import datetime
import os
import signal
import threading

from absl import logging
import jax
import numpy as np

# Exit status of a run that saved and stopped on request: EX_TEMPFAIL of
# sysexits.h ("a temporary failure; run the same command again"). A scheduler
# requeues on it (README: "Preemption, time limits and restarts"); a process
# stopped at once by a second signal ends as the signal's (143 for SIGTERM).
EXIT_STATUS = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The key JAX's SIGTERM notifier writes to the coordination service; every
# process's preemption sync manager waits on it (xla/tsl preemption_sync_manager.cc).
_PREEMPTION_NOTICE_KEY = 'RECEIVED_PREEMPTION_NOTICE'


class Stopped(Exception):  # pylint: disable=g-bad-exception-name
  """A run saved its checkpoint at `step` and stopped, as requested (not an error)."""

  def __init__(self, step, workdir, reason):
    self.step = step
    self.workdir = workdir
    self.reason = reason
    where = (f'saved the checkpoint of step {step} in {workdir}' if step is not None
             else f'stopped before training in {workdir}')
    super().__init__(f'{reason}: {where}; run the same command again to resume from '
                     'there')


@dataclasses.dataclass
class _Request:
  """What the signal handlers saw in this process (signals are process-wide)."""
  signal_name: str | None = None
  previous_handlers: dict = dataclasses.field(default_factory=dict)
  sync_point_unavailable: bool = False


_REQUEST = _Request()


def signal_name():
  """The name of the signal that asked this process to stop, or None."""
  return _REQUEST.signal_name


def install_signal_handlers():
  """SIGTERM and SIGINT request a stop (once); call it from the main thread, once.

  With several processes, call it after `jax.distributed.initialize` (whose
  SIGTERM handler it replaces).
  """
  for signum in SIGNALS:
    _REQUEST.previous_handlers[signum] = signal.getsignal(signum)
    signal.signal(signum, _handle_signal)


def uninstall_signal_handlers():
  """Puts back the handlers `install_signal_handlers` replaced (tests)."""
  for signum, handler in _REQUEST.previous_handlers.items():
    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
  _REQUEST.previous_handlers.clear()


def _handle_signal(signum, frame):
  del frame
  name = signal.Signals(signum).name
  if _REQUEST.signal_name is not None:  # Only before the default action was restored.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return
  # From now on the signals' default actions: a second one stops the process at once,
  # even while the main thread waits in C++ (where a Python handler would not run).
  for other in SIGNALS:
    signal.signal(other, signal.SIG_DFL)
  logging.warning('%s received: training stops after the next step every process '
                  'agrees on, once its checkpoint is saved; send it again to stop at once.',
                  name)
  request_stop(name)


def request_stop(reason):
  """Asks this process's training to save and stop (what the first signal does)."""
  if _REQUEST.signal_name is None:
    _REQUEST.signal_name = reason
  if jax.process_count() > 1:
    _post_preemption_notice()


def clear_request():
  """Forgets a stop request (tests that request one in-process)."""
  _REQUEST.signal_name = None


def _post_preemption_notice():
  """Tells every process, through JAX's coordination service, that this one must stop.

  What JAX's own SIGTERM notifier does: the key's value is the time of death
  (now), after which each process's preemption sync manager agrees on a step.
  """
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:
    return
  now = datetime.datetime.now(datetime.timezone.utc).isoformat()

  def post():
    try:
      client.key_value_set(_PREEMPTION_NOTICE_KEY, now, allow_overwrite=True)
    except Exception as error:  # pylint: disable=broad-except
      logging.warning('Could not tell the other processes to stop (%s); a second signal '
                      'stops this one at once.', error)
  # A signal handler runs on the main thread between bytecodes; the RPC goes aside.
  threading.Thread(target=post, name='preemption_notice', daemon=True).start()


def reached_stop_step(first_step, last_step):
  """Whether to save and stop after `last_step` (steps first_step..last_step just ran).

  Every process calls it after every dispatch with the same steps; it never
  synchronises the hosts (JAX's sync manager agrees in the background).
  """
  if jax.process_count() == 1:
    return _REQUEST.signal_name is not None
  if _REQUEST.sync_point_unavailable:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  reached = False
  try:
    # Asked for every step, in order, as the sync manager's protocol needs
    # (the sync point is the fastest process's last step + 1).
    for step in range(first_step, last_step + 1):
      reached = multihost_utils.reached_preemption_sync_point(step) or reached
  except RuntimeError as error:  # --jax_enable_preemption_service=false.
    _REQUEST.sync_point_unavailable = True
    logging.warning('No preemption sync point (%s): a SIGTERM stops this run only at its '
                    'next periodic checkpoint boundary if at all.', error)
  return reached


def stop_requested_anywhere():
  """Whether any process was asked to stop (every process calls it at the same point).

  One all-gather: called before a run's first step (and so between the runs of
  a sweep), never inside the step loop.
  """
  asked = _REQUEST.signal_name is not None
  if jax.process_count() == 1:
    return asked
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(asked))))


def reason():
  """What asked this run to stop, for the message (another process's signal if not ours)."""
  return _REQUEST.signal_name or 'a preemption notice from another process'
