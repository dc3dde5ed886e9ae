"""What a user can get wrong, and how the entry point tells it: one line, no traceback.

A `UserError` is a mistake the user can fix (a config value, a path, a data set,
a run directory); its message is one sentence naming the problem and the fix.
`main.py` catches it once and prints `error: <message>` on stderr with exit
status 2; `--verbose` adds the traceback. Every other exception is a
programming error and keeps its traceback.

Subclassing ValueError keeps `except ValueError` (and the tests'
`pytest.raises(ValueError)`) working; the subclasses below also keep the
builtin type a caller may catch (FileNotFoundError, FloatingPointError).
"""

import errno
import os
import re

# Exit status of a user's mistake (absl and argparse use 2 for usage errors too).
EXIT_STATUS = 2
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class UserError(ValueError):
  """A mistake the user can fix; the message names the problem and the fix."""


class MissingPathError(UserError, FileNotFoundError):
  """A file or folder that the user named, or that a mode needs, does not exist."""


class TrainingDivergedError(UserError, FloatingPointError):
  """The training loss became NaN or infinite: a setting is too aggressive."""


def one_line(text):
  """`text` with its line breaks and runs of spaces made single spaces."""
  return ' '.join(str(text).split())


def _causes(error):
  """`error` and the exceptions it was raised from (`raise ... from`), in order."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__


def _is_disk_full(error):
  return (isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS
          or 'No space left on device' in str(error)
          or 'Disk quota exceeded' in str(error))


def _is_read_only(error):
  """A disk that became read-only (EROFS; TensorStore says it in its message only)."""
  return (isinstance(error, OSError) and error.errno == errno.EROFS
          or 'Read-only file system' in str(error))


def is_disk_failure(error):
  """Whether `error` (or a cause of it) is a full or read-only disk."""
  return any(_is_disk_full(cause) or _is_read_only(cause) for cause in _causes(error))


def user_message(error, workdir=None):
  """The one-line message of a user's mistake, or None for a programming error.

  Args:
    error: an exception that reached the entry point.
    workdir: the run's --workdir, named when the disk is full.

  Returns:
    The message of the first `UserError` among `error` and its causes; for a
    full or read-only disk (ENOSPC, EDQUOT, EROFS, also inside orbax's or
    TensorFlow's own errors) or a file of the workdir that may not be written
    (EACCES, EPERM) a sentence naming the workdir; else None.
  """
  causes = list(_causes(error))
  for cause in causes:
    if isinstance(cause, UserError):
      return one_line(cause)
  roots = ({str(workdir), os.path.abspath(os.path.expanduser(str(workdir)))}
           if workdir else set())
  for cause in causes:
    where = f' of --workdir={workdir}' if workdir else ''
    name = getattr(cause, 'filename', None)
    writing = f' while writing {name}' if name else ''
    if _is_disk_full(cause):
      return (f'No space left on the disk{where}{writing}; free some space there or use '
              'a --workdir on another disk, then run the same command again (a training '
              'run resumes from its last checkpoint).')
    if _is_read_only(cause) and (not name or any(str(name).startswith(r) for r in roots)):
      # A disk remounted read-only mid-run (an I/O error): the files written before stay.
      return (f'The disk{where} is read-only{writing}; remount it read-write or use a '
              '--workdir on another disk, then run the same command again (a training '
              'run resumes from its last checkpoint).')
  for cause in causes:
    name = getattr(cause, 'filename', None)
    if (isinstance(cause, OSError) and cause.errno in NOT_WRITABLE_ERRNOS and name
        and any(str(name).startswith(root) for root in roots)):
      return (f'Cannot write {name} in --workdir={workdir} ({cause.strerror}); point '
              '--workdir at a directory you can write to.')
  return None


# ----------------------------------------------------------------------------- flags


def _innermost_text(error):
  """The message of the innermost exception given as an argument (ml_collections nests them)."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def _argument(argv, name):
  """The value of `--name=value` or `--name value` in argv, or None."""
  for i, token in enumerate(argv):
    if token.startswith(f'--{name}='):
      return token.split('=', 1)[1]
    if token == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_with(argv, field):
  """(flag, i): the `--config.a.b` override (value left out) whose i-th name is `field`."""
  for token in argv:
    flag = token.split('=', 1)[0]
    names = flag.split('.')
    if flag.startswith('--config.') and field in names[1:]:
      return flag, names.index(field, 1)
  return None, None


def flag_error_message(error, argv, moved=None):
  """One line for a mistake on the command line, or None for a programming error.

  Handles absl's flag errors (a value of the wrong type, a missing or unknown
  flag), a misspelled `--config.field` (ml_collections' "did you mean"
  suggestion becomes the message; a field of the flat config that moved into a
  section names its new place), a config file that cannot be found, and a config
  file whose `get_config(arg)` rejects its argument.

  Args:
    error: what `flags.FLAGS(argv)` (or the first access of the config) raised.
    argv: the command line.
    moved: {old flat field name: its dotted place now} (configs/default.FLAT_NAMES).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  config_arg = _argument(argv, 'config')
  text = _innermost_text(error)
  if isinstance(error, (KeyError, AttributeError)):
    # ml_collections: an override of a field the config does not have.
    match = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"\?', text)
    field = match.group(2) if match else text.strip().strip('\'"')
    flag, position = _override_with(argv, field)
    if flag is None:
      return None  # Not an override's: a config file's own bug.
    if position == 1 and field in (moved or {}):
      return (f'{flag} is now --config.{moved[field]} (the config is in sections); '
              f'set --config.{moved[field]}=... instead.')
    if match:
      names = flag.split('.')
      suggestion = '.'.join(names[:position] + [match.group(1)] + names[position + 1:])
      return (f'{flag} is not a field of the config; did you mean {suggestion}? '
              '(configs/default.py lists every section and field of the training modes).')
    return (f'{flag} is not a field of the config {config_arg or ""}; check its '
            'spelling against the config file (configs/default.py lists every section '
            'and field of the training modes).')
  if isinstance(error, OSError) and ('Failed loading config file' in text
                                     or 'Configuration is not available' in text):
    # ml_collections: the config file could not be loaded (raised on first access).
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = (lines[-1] if lines else one_line(text)).rstrip('.')
    return (f'Cannot load the config file --config={config_arg}: {reason}; point '
            '--config at a file such as configs/pretrain.py (optionally with '
            ':runlocal).')
  if isinstance(error, flags.Error):
    message = one_line(text)
    if 'Error whilst parsing config file' in text:
      # get_config() raised: its own message is the traceback's last line.
      last = [line.strip() for line in text.splitlines() if line.strip()][-1]
      reason = re.sub(r'^[\w.]*(Error|Exception): ', '', last)
      return f'--config={config_arg}: {reason}'
    required = re.search(r'Flag --(\w+) must have a value other than None', text)
    if required:
      name = required.group(1)
      fix = {'workdir': '--workdir=DIR, the directory of the run\'s outputs',
             'config': '--config=configs/<mode>.py, e.g. configs/pretrain.py:runlocal'}
      return f'--{name} is required; set {fix.get(name, f"--{name}")}.'
    if isinstance(error, flags.UnrecognizedFlagError):
      return (f'{message.rstrip(".")}; python main.py --helpshort lists the flags (config '
              'fields are set with --config.section.field=value).')
    message = re.sub(r'^flag ', '', message).rstrip('.')
    return (f'{message}; give the flag a value of its type (a config field: of its '
            'default in the config file).')
  return None
