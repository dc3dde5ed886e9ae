"""One invocation per workdir: a lock that a run (or a sweep) holds while it works there.

`<workdir>/run.lock` names its holder (host, pid, start time, command). A second
invocation on the same workdir (the command repeated in a second terminal, a
scheduler restarting a job whose first copy still runs) is refused in one line
naming the holder, before it writes anything.

- Local and network (NFS) directories: the file is also `flock`ed while the run
  lives. The kernel (or the NFS server, when a host dies) drops that lock with
  its process, so a lock left by a killed run is seen as stale and taken over.
- URL workdirs (gs://...) and filesystems without `flock`: the file alone. It
  is stale when its holder ran on this host and its process is gone, or when it
  was not renewed (every RENEW_EVERY_S by the holder) for STALE_AFTER_S. Two
  invocations started within the same second may both pass (a bucket has no
  atomic create through etils.epath); the README says so.

With several processes, process 0 takes the lock while the others wait
(`distributed.on_first_process`); a refusal reaches every process.
"""

import contextlib
import datetime
import errno
import json
import os
import shlex
import socket
import sys
import threading
import time

from absl import logging
from etils import epath
import jax

from simclr_jax import errors
from simclr_jax.parallel import distributed

LOCK_FILE = 'run.lock'
RENEW_EVERY_S = 60  # A file-only lock's holder rewrites it this often...
STALE_AFTER_S = 600  # ...and one older than this is a dead host's.
# flock on a filesystem that does not offer it (some network filesystems).
_NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_path(workdir):
  workdir = str(workdir)
  if '://' not in workdir:
    workdir = os.path.abspath(os.path.expanduser(workdir))
  return epath.Path(workdir) / LOCK_FILE


def _holder():
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'renewed': time.time(), 'command': shlex.join([sys.executable] + sys.argv)}


def _describe(holder):
  return (f'host {holder.get("host")}, pid {holder.get("pid")}, started '
          f'{holder.get("started")}')


def _parse(text):
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return None
  return holder if isinstance(holder, dict) else None


def _busy_error(workdir, holder, stale_hint=''):
  return errors.UserError(
      f'--workdir={workdir} is in use by another run ({_describe(holder)}); wait for it '
      f'to finish, stop it (kill -TERM {holder.get("pid")} saves and stops it), or use '
      f'another --workdir{stale_hint}.')


def _pid_alive(pid):
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True  # Someone else's process, or a holder we cannot read: assume alive.
  return True


def _is_stale(holder):
  """Whether a file-only lock's holder is gone (this host's dead pid, or not renewed)."""
  if holder is None:
    return True  # Half-written by a holder killed while writing it.
  if holder.get('host') == socket.gethostname() and not _pid_alive(holder.get('pid')):
    return True
  return time.time() - float(holder.get('renewed', 0)) > STALE_AFTER_S


class WorkdirLock:
  """The lock of one workdir, held by this process (see the module docstring)."""

  def __init__(self, workdir):
    self.workdir = str(workdir)
    self.path = lock_path(workdir)
    self._fd = None
    self._stop_renewing = None

  # ------------------------------------------------------------------- flock

  def _acquire_flock(self):
    """Takes the lock with flock; returns False where the filesystem has none."""
    import fcntl  # pylint: disable=g-import-not-at-top
    path = os.fspath(self.path)
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        text = os.read(fd, 1 << 16).decode('utf-8', 'replace')
        os.close(fd)
        raise _busy_error(self.workdir, _parse(text) or {}) from None
      except OSError as error:
        os.close(fd)
        if error.errno in _NO_FLOCK_ERRNOS:
          return False
        raise
      # The holder before us may have deleted the file while we opened it.
      try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = _parse(os.read(fd, 1 << 16).decode('utf-8', 'replace'))
    if previous:
      logging.warning('Took over the lock of a run that is no longer running (%s) in %s.',
                      _describe(previous), self.workdir)
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder(), indent=2).encode())
    os.fsync(fd)
    self._fd = fd
    return True

  # ------------------------------------------------------------------- file only

  def _acquire_file(self):
    if self.path.exists():
      holder = _parse(self.path.read_text())
      if not _is_stale(holder):
        raise _busy_error(self.workdir, holder,
                          f' (if that run is gone, delete {self.path}; it is taken over '
                          f'{STALE_AFTER_S // 60} minutes after its last renewal)')
      logging.warning('Took over the stale lock of a run that is no longer running (%s) '
                      'in %s.', _describe(holder or {}), self.workdir)
    holder = _holder()
    self.path.write_text(json.dumps(holder, indent=2))
    self._stop_renewing = threading.Event()
    threading.Thread(target=self._renew, args=(holder, self._stop_renewing),
                     name='workdir_lock', daemon=True).start()

  def _renew(self, holder, stop):
    while not stop.wait(RENEW_EVERY_S):
      try:
        self.path.write_text(json.dumps(dict(holder, renewed=time.time()), indent=2))
      except Exception as error:  # pylint: disable=broad-except
        logging.warning('Could not renew the lock %s: %s', self.path, errors.one_line(error))

  # ------------------------------------------------------------------- both

  def acquire(self):
    """Takes the lock, or raises errors.UserError naming the run that holds it."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if '://' in self.workdir or not self._acquire_flock():
      self._acquire_file()

  def release(self):
    """Deletes the lock file (while still holding it) and lets go."""
    if self._stop_renewing is not None:
      self._stop_renewing.set()
    try:
      if self._fd is not None or self._stop_renewing is not None:
        self.path.unlink(missing_ok=True)
    finally:
      if self._fd is not None:
        os.close(self._fd)
      self._fd = self._stop_renewing = None


@contextlib.contextmanager
def hold(workdir):
  """Holds the lock of `workdir` (on process 0; every process calls it) for a block."""
  lock = WorkdirLock(workdir)
  distributed.on_first_process(lock.acquire, f'lock --workdir={workdir}')
  try:
    yield lock
  finally:
    if jax.process_index() == 0:
      lock.release()
