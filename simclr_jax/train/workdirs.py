"""Runs on disk: a run directory's config, results, checkpoints, and restoring from them.

Every mode reads and writes run directories only through this module:

  <workdir>/config.json          the config the run was started with
  <workdir>/checkpoints/latest/  orbax, for resuming (`config.train.keep_checkpoints` kept)
  <workdir>/checkpoints/best/    orbax, the best on the selection split
  <workdir>/metrics.json         final test metrics; its presence means "finished"
  <workdir>/test_predictions.npz the chosen checkpoint's test probabilities (classifiers)
  <workdir>/wall_time.json       seconds of the call that finished the run

A checkpoint is one `state.TrainState`, which holds the loop's bookkeeping too,
so nothing else is needed to resume. A workdir is a local path or a URL such as
`gs://bucket/sweep`: files go through `etils.epath` and orbax, both of which
take either (TensorBoard summaries through TensorFlow's gfile, which does too),
and JSON files are written whole (to a temporary name, then renamed) so that no
reader ever sees half a file.

With several processes, process 0 writes a run's files while the others wait
on both sides of the write (`distributed.on_first_process`): every process then
sees the same files whenever it looks (is a run finished? does it have a
config?), so all of them take the same turns and enter the same collectives.
The `latest` and `best` checkpoints are saved one after the other, never both
in flight, each manager with barrier names of its own.
"""

import json
import os
import sys
import zlib

from absl import logging
from etils import epath
import flax
import jax
import ml_collections
import orbax.checkpoint as ocp

from simclr_jax import config_fields
from simclr_jax import errors
from simclr_jax.parallel import distributed
from simclr_jax.parallel import sharding
from simclr_jax.train import kinds
from simclr_jax.train import state as state_lib

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.json'
WALL_TIME_FILE = 'wall_time.json'
PREDICTIONS_FILE = 'test_predictions.npz'


# URL schemes a workdir may have: every writer must know it (etils.epath, orbax's
# tensorstore, TensorFlow's gfile for the TensorBoard summaries). Tests add an
# in-memory one.
URL_SCHEMES = ['gs']


def is_url(path):
  return '://' in str(path)


def url_scheme(path):
  return str(path).split('://', 1)[0] if is_url(path) else None


def workdir_path(workdir):
  """A workdir as given on the command line, made absolute unless it is a URL."""
  workdir = str(workdir)
  return workdir if is_url(workdir) else os.path.abspath(os.path.expanduser(workdir))


def _path(workdir, *names):
  return epath.Path(workdir_path(workdir)).joinpath(*names)


def _temporary(path):
  """The temporary name beside `path` of this process's writes (processes never share one)."""
  index = jax.process_index() if jax.distributed.is_initialized() else 0
  return path.parent / f'.{path.name}{f".{index}" if index else ""}.tmp'


def write_json(path, value):
  """Writes `value` as JSON to `path` in one piece (temporary file, then rename)."""
  write_text(path, json.dumps(value, indent=2, sort_keys=True))


def read_json(path, fix='restore or delete it'):
  """The JSON value in `path`; a file that is not JSON is a UserError saying `fix`."""
  path = epath.Path(path)
  text = path.read_text()
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise errors.UserError(
        f'{path} is not valid JSON ({error.msg} at line {error.lineno}, column '
        f'{error.colno}); {fix}.') from None


def _read_config_json(workdir):
  """config.json of a run as a dict; a damaged one is a UserError naming the file."""
  path = _path(workdir, CONFIG_FILE)
  fix = (f'it was edited or damaged: restore it as the run wrote it, or start over with '
         f'a new --workdir (or delete {workdir})')
  value = read_json(path, fix)
  if not isinstance(value, dict):
    raise errors.UserError(f'{path} holds no config (a JSON object is expected); {fix}.')
  flat = sorted(k for k, v in value.items() if k not in ('mode', 'seed') and not isinstance(v, dict))
  if flat:
    raise errors.UserError(
        f'{path} was written by an older simclr_jax whose config had no sections (e.g. '
        f'{flat[0]!r} at the top, where fields now sit in sections such as train.batch_size); '
        f'start the run again in a new --workdir, or resume it with the version that wrote it.')
  return value


def write_text(path, text):
  """Writes a text file (a report) in one piece (temporary file, then rename).

  Writes on the calling process only; a file that other processes read later
  goes through `_write_on_first_process`.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = _temporary(path)
  temporary.write_text(text)
  temporary.replace(path)


def write_bytes(path, data):
  """Writes a binary file (a report's data) in one piece, as `write_text`."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = _temporary(path)
  temporary.write_bytes(data)
  temporary.replace(path)


def _write_on_first_process(write, name):
  """`write()` on process 0, every process waiting before and after it (module docstring)."""
  distributed.on_first_process(write, f'write {name}')


# ----------------------------------------------------------------------------- config


def check_workdir_config(config, workdir):
  """Writes config.json, or checks that the workdir's run used the same config."""
  path = _path(workdir, CONFIG_FILE)
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    previous = _read_config_json(workdir)
    previous, current = (flax.traverse_util.flatten_dict(c, sep='.') for c in (previous, current))
    differing = sorted(k for k in set(previous) | set(current)
                       if previous.get(k) != current.get(k))
    if differing:
      raise errors.UserError(
          f'The workdir {workdir} holds a run with a different config (fields '
          f'{", ".join(differing)} differ); use a new --workdir, or the same config to resume.')
    return
  _write_on_first_process(lambda: write_json(path, current), CONFIG_FILE)


def has_config(workdir):
  return _path(workdir, CONFIG_FILE).exists()


def load_config(workdir):
  """The config a run in `workdir` was started with."""
  return ml_collections.ConfigDict(_read_config_json(workdir))


# ----------------------------------------------------------------------------- results


def is_finished(workdir):
  return _path(workdir, METRICS_FILE).exists()


def write_metrics(workdir, result):
  """metrics.json (process 0; every process calls it): the run is finished."""
  _write_on_first_process(lambda: write_json(_path(workdir, METRICS_FILE), result),
                          METRICS_FILE)


def read_metrics(workdir):
  return read_json(_path(workdir, METRICS_FILE),
                   'delete it and run the same command again to write it anew')


def write_predictions(workdir, predictions):
  """test_predictions.npz: the chosen checkpoint's class probabilities of every test slice."""

  def write():
    path = _path(workdir, PREDICTIONS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    predictions.save(temporary)
    temporary.replace(path)
  _write_on_first_process(write, PREDICTIONS_FILE)


def predictions_path(workdir):
  return _path(workdir, PREDICTIONS_FILE)


def write_wall_time(workdir, seconds):
  _write_on_first_process(
      lambda: write_json(_path(workdir, WALL_TIME_FILE),
                         {'wall_seconds': round(seconds, 2),
                          'note': 'seconds of the call that finished the run'}),
      WALL_TIME_FILE)


def read_wall_time(workdir):
  """Seconds of the call that finished the run, or None."""
  path = _path(workdir, WALL_TIME_FILE)
  return read_json(path)['wall_seconds'] if path.exists() else None


def output_path(workdir, name):
  """Path of an output file of the run (a figure, a table), its folder created."""
  path = _path(workdir, name)
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


# ----------------------------------------------------------------------------- checkpoints


def _manager(workdir, which, max_to_keep=None, read_only=False):
  """An orbax CheckpointManager of `<workdir>/checkpoints/<which>`.

  Its barriers are named after the directory: orbax names the barrier of an
  async save after the step alone, so two managers saving the same step at once
  (best and latest, at an evaluation) would meet at one barrier and fail
  ("Barrier ... is already ongoing").
  """
  directory = _path(workdir, 'checkpoints', which)
  prefix = f'{which}{zlib.crc32(str(directory).encode()):08x}'
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=prefix))
  return ocp.CheckpointManager(directory, options=options)


class Checkpoints:
  """The `latest` (periodic, for resuming) and `best` checkpoints of a training run.

  Saves are asynchronous (training goes on while they are written) but never two
  at once: each save first waits for the other manager's (one copy of the state
  in flight, and no two background saves meeting at orbax's barriers).
  """

  def __init__(self, workdir, keep=2):
    self.workdir = workdir
    self.latest = _manager(workdir, 'latest', max_to_keep=keep)
    self.best = _manager(workdir, 'best', max_to_keep=1)

  def save_latest(self, state):
    self.best.wait_until_finished()
    _save(self.latest, state)

  def save_best(self, state):
    self.latest.wait_until_finished()
    _save(self.best, state)

  def restore_latest(self, target):
    """The newest readable latest checkpoint, or None; a damaged one is skipped, saying so."""
    return _restore_newest(self.latest, target, self.workdir, delete_unreadable=True)

  def restore_best(self, target):
    self.best.wait_until_finished()
    return _restore_newest(self.best, target, self.workdir, delete_unreadable=True)

  def close(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()


def _save(manager, state):
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    # A run resumed from an older checkpoint (the newer one unreadable, or killed
    # between saving best and latest) saves this step again.
    manager.wait_until_finished()
    manager.delete(step)
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def _drop_closed_event_loop_noise():
  """Silences the 'Event loop is closed' tracebacks of a failed restore (once per process).

  When orbax fails to read a damaged checkpoint it closes its asyncio loop while
  tensorstore still completes the other reads; each completion then reports the
  closed loop through sys.unraisablehook, hundreds of harmless tracebacks.
  """
  hook = sys.unraisablehook
  if getattr(hook, 'drops_closed_event_loop', False):
    return

  def quiet(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      hook(unraisable)
  quiet.drops_closed_event_loop = True
  sys.unraisablehook = quiet


def _restore_newest(manager, target, workdir, delete_unreadable=False):
  """The newest readable checkpoint of `manager`, or None if it has none.

  An unreadable one (truncated, files deleted) is skipped with a warning; with
  `delete_unreadable` (a run that goes on saving) it is deleted once an older
  one was read, since the resumed run saves its step again.

  Raises:
    errors.UserError: if there are checkpoints but none is readable.
  """
  _drop_closed_event_loop_noise()
  unreadable = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as error:  # pylint: disable=broad-except
      # Orbax raises many kinds of errors for a truncated or deleted checkpoint.
      logging.warning('The checkpoint of step %d in %s is unreadable (%s: %s); trying the '
                      'one before it.', step, workdir, type(error).__name__,
                      errors.one_line(error))
      unreadable.append(step)
      continue
    if delete_unreadable and unreadable:
      for bad in unreadable:  # On every process: orbax's delete waits for all of them.
        manager.delete(bad)
      logging.warning('Deleted the unreadable checkpoint(s) of step(s) %s in %s; going on '
                      'from step %d.', ', '.join(map(str, unreadable)), workdir, step)
    return restored
  if unreadable:
    raise errors.UserError(f'No checkpoint in {workdir} is readable (steps '
                           f'{", ".join(map(str, unreadable))}); delete {workdir} and train '
                           'again, or use a new --workdir.')
  return None


def latest_step(workdir, which='latest'):
  """Step of the newest checkpoint of `which` (latest | best), or None."""
  path = _path(workdir, 'checkpoints', which)
  if not path.is_dir():
    return None
  with _manager(workdir, which, read_only=True) as manager:
    return manager.latest_step()


# ----------------------------------------------------------------------------- other runs


def pretrained_config(config):
  """Checks and returns the config of `config.finetune.pretrained_workdir`'s pretrain run."""
  workdir = config.finetune.pretrained_workdir
  if not workdir:
    raise errors.UserError('finetune needs a pretrain run; set '
                           '--config.finetune.pretrained_workdir to the --workdir of a '
                           '`pretrain` run (or use configs/baseline.py).')
  if not has_config(workdir) or not latest_step(workdir):
    raise errors.UserError(f'No pretrain checkpoint found in {workdir}; run '
                           f'`python main.py --config=configs/pretrain.py --workdir={workdir}` '
                           'first or point --config.finetune.pretrained_workdir at a finished '
                           'pretrain run.')
  previous = load_config(workdir)
  if previous.mode != 'pretrain':
    raise errors.UserError(f'{workdir} holds a {previous.mode} run, not a pretrain run; point '
                           '--config.finetune.pretrained_workdir at the workdir of a pretrain run.')
  get = config_fields.get
  mismatched = [f for f in kinds.ARCHITECTURE_FIELDS if get(previous, f) != get(config, f)]
  if mismatched:
    details = ', '.join(f'{f}={get(previous, f)!r}' for f in mismatched)
    raise errors.UserError(
        f'The pretrain run in {workdir} used another architecture ({details}); set the '
        f'same values, e.g. ' + ' '.join(f'--config.{f}={get(previous, f)}' for f in mismatched)
        + '.')
  _check_same_test_split(config, previous, workdir)
  if previous.split.include_test_in_pretrain and not config.split.include_test_in_pretrain:
    raise errors.UserError(
        f'The pretrain run in {workdir} saw the test images (include_test_in_pretrain=True), '
        'so its encoder has seen this run\'s test subjects; pretrain without '
        '--config.split.include_test_in_pretrain, or set it here too to reproduce the reference.')
  if not is_finished(workdir):
    raise errors.UserError(
        f'The pretrain run in {workdir} stopped before its last step (it has no '
        f'{METRICS_FILE}); run its command again to finish it, then fine-tune.')
  return previous


# What decides a run's test subjects: a pretraining must agree with its fine-tuning
# on these, or its images may include the fine-tuning's test subjects. The label
# task is not among them: pretraining reads no labels, and the splits follow the
# data set's own classes for either task (splits.py).
_TEST_SPLIT_FIELDS = ('data.name', 'split.scheme', 'split.seed', 'split.num_folds',
                      'data.subject_ids')


def _check_same_test_split(config, previous, workdir):
  fields = list(_TEST_SPLIT_FIELDS)
  fields += ['split.fold'] if config.split.num_folds else ['split.test_fraction']
  get = config_fields.get
  mismatched = [f for f in fields if get(previous, f) != get(config, f)]
  if mismatched:
    details = ', '.join(f'{f}={get(previous, f)!r} there, {get(config, f)!r} here'
                        for f in mismatched)
    raise errors.UserError(
        f'The pretrain run in {workdir} split the data otherwise ({details}), so its '
        'images may include this run\'s test subjects; pretrain with the same '
        + ', '.join(f'--config.{f}' for f in mismatched) + ' or fine-tune from a matching run.')


def load_pretrained_encoder(config, state, mesh):
  """`state` with the encoder params and batch_stats of the pretrain run's last checkpoint."""
  pre_config = load_config(config.finetune.pretrained_workdir)  # Checked by the mode's checks.
  with _manager(config.finetune.pretrained_workdir, 'latest', read_only=True) as manager:
    pretrained = _restore_newest(manager, state_lib.abstract_state(pre_config, mesh),
                                 config.finetune.pretrained_workdir)
  logging.info('Encoder loaded from %s (step %d).', config.finetune.pretrained_workdir,
               int(pretrained.step))
  return state_lib.replace_encoder(state, pretrained.params, pretrained.batch_stats)


def restore_for_inference(workdir, which='best'):
  """(config, model, variables) of the best (or latest) checkpoint of a run."""
  config = load_config(workdir)
  target = state_lib.abstract_state(config, sharding.create_mesh())
  restored = None
  for name in (('best', 'latest') if which == 'best' else ('latest',)):
    with _manager(workdir, name, read_only=True) as manager:
      restored = _restore_newest(manager, target, workdir)
    if restored is not None:
      break
  if restored is None:
    raise errors.UserError(f'No checkpoint in {workdir}; train there first or point at the '
                           'workdir of a finished run.')
  return config, state_lib.create_model(config), state_lib.variables(restored)
