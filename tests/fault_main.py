"""`python tests/fault_main.py <main.py's flags>`: main.py on a disk that fails on cue.

Every write to a path containing $SIMCLR_JAX_FAIL_WRITES fails as a full disk
(ENOSPC) or, with SIMCLR_JAX_FAIL_ERRNO=EROFS, as a read-only one: what the
kernel answers when a disk fills up or is remounted read-only mid-run. Files are
opened for writing through Python (orbax's checkpoint metadata, the run's JSON
files, the predictions) or through os.open; the array data TensorStore writes
from C++ is not intercepted, but every checkpoint also writes its metadata.
"""

import builtins
import errno
import io
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILING = os.environ['SIMCLR_JAX_FAIL_WRITES']
ERRNO = getattr(errno, os.environ.get('SIMCLR_JAX_FAIL_ERRNO', 'ENOSPC'))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _check(path, writing):
  if writing and FAILING in os.fspath(path):
    raise OSError(ERRNO, os.strerror(ERRNO), os.fspath(path))


_open, _io_open, _os_open = builtins.open, io.open, os.open


def _failing_open(file, mode='r', *args, **kwargs):
  if isinstance(file, (str, bytes, os.PathLike)):
    _check(file, any(c in mode for c in 'wax+'))
  return _open(file, mode, *args, **kwargs)


def _failing_os_open(path, flags, *args, **kwargs):
  _check(path, flags & _WRITE_FLAGS)
  return _os_open(path, flags, *args, **kwargs)


builtins.open = io.open = _failing_open
os.open = _failing_os_open

if __name__ == '__main__':
  sys.path.insert(0, REPO)
  sys.argv = [os.path.join(REPO, 'main.py')] + sys.argv[1:]
  runpy.run_path(sys.argv[0], run_name='__main__')
