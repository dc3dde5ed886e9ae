"""Runs on disk: a run directory's config, results, checkpoints, and restoring from them.

Every mode reads and writes run directories only through this module:

  <workdir>/config.json          the config the run was started with
  <workdir>/checkpoints/latest/  orbax, for resuming (`config.keep_checkpoints` kept)
  <workdir>/checkpoints/best/    orbax, the best on the selection split
  <workdir>/metrics.json         final test metrics; its presence means "finished"
  <workdir>/wall_time.json       seconds of the call that finished the run

A checkpoint is one `state.TrainState`, which holds the loop's bookkeeping too,
so nothing else is needed to resume. A workdir is a local path or a URL such as
`gs://bucket/sweep`: files go through `etils.epath` and orbax, both of which
take either, and JSON files are written whole (to a temporary name, then
renamed) so that no reader ever sees half a file.
"""

import json
import os

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from simclr_jax import sharding
from simclr_jax import state as state_lib

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.json'
WALL_TIME_FILE = 'wall_time.json'


def workdir_path(workdir):
  """A workdir as given on the command line, made absolute unless it is a URL."""
  workdir = str(workdir)
  return workdir if '://' in workdir else os.path.abspath(os.path.expanduser(workdir))


def _path(workdir, *names):
  return epath.Path(workdir_path(workdir)).joinpath(*names)


def write_json(path, value):
  """Writes `value` as JSON to `path` in one piece (temporary file, then rename)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / f'.{path.name}.tmp'
  temporary.write_text(json.dumps(value, indent=2, sort_keys=True))
  temporary.replace(path)


def read_json(path):
  return json.loads(epath.Path(path).read_text())


def write_text(path, text):
  """Writes a text file (a report) in one piece."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / f'.{path.name}.tmp'
  temporary.write_text(text)
  temporary.replace(path)


# ----------------------------------------------------------------------------- config


def check_workdir_config(config, workdir):
  """Writes config.json, or checks that the workdir's run used the same config."""
  path = _path(workdir, CONFIG_FILE)
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    previous = read_json(path)
    differing = sorted(k for k in set(previous) | set(current)
                       if previous.get(k) != current.get(k))
    if differing:
      raise ValueError(
          f'The workdir {workdir} holds a run with a different config (fields '
          f'{", ".join(differing)} differ); use a new --workdir, or the same config to resume.')
    return
  if jax.process_index() == 0:
    write_json(path, current)


def has_config(workdir):
  return _path(workdir, CONFIG_FILE).exists()


def load_config(workdir):
  """The config a run in `workdir` was started with."""
  return ml_collections.ConfigDict(read_json(_path(workdir, CONFIG_FILE)))


# ----------------------------------------------------------------------------- results


def is_finished(workdir):
  return _path(workdir, METRICS_FILE).exists()


def write_metrics(workdir, result):
  if jax.process_index() == 0:
    write_json(_path(workdir, METRICS_FILE), result)


def read_metrics(workdir):
  return read_json(_path(workdir, METRICS_FILE))


def write_wall_time(workdir, seconds):
  if jax.process_index() == 0:
    write_json(_path(workdir, WALL_TIME_FILE),
               {'wall_seconds': round(seconds, 2),
                'note': 'seconds of the call that finished the run'})


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
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(_path(workdir, 'checkpoints', which), options=options)


class Checkpoints:
  """The `latest` (periodic, for resuming) and `best` checkpoints of a training run."""

  def __init__(self, workdir, keep=2):
    self.workdir = workdir
    self.latest = _manager(workdir, 'latest', max_to_keep=keep)
    self.best = _manager(workdir, 'best', max_to_keep=1)

  def save_latest(self, state):
    _save(self.latest, state)

  def save_best(self, state):
    _save(self.best, state)

  def restore_latest(self, target):
    """The newest readable latest checkpoint, or None; a damaged one is skipped, saying so."""
    return _restore_newest(self.latest, target, self.workdir)

  def restore_best(self, target):
    self.best.wait_until_finished()
    return _restore_newest(self.best, target, self.workdir)

  def close(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()


def _save(manager, state):
  manager.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(state), force=True)


def _restore_newest(manager, target, workdir):
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as error:  # pylint: disable=broad-except
      # Orbax raises many kinds of errors for a truncated or deleted checkpoint.
      logging.warning('The checkpoint of step %d in %s is unreadable (%s: %s); trying the '
                      'one before it.', step, workdir, type(error).__name__, error)
  if manager.all_steps():
    raise ValueError(f'No checkpoint in {workdir} is readable; delete {workdir} and '
                     'train again.')
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
  """Checks and returns the config of `config.pretrained_workdir`'s pretrain run."""
  workdir = config.pretrained_workdir
  if not workdir:
    raise ValueError('finetune needs a pretrain run; set --config.pretrained_workdir to '
                     'the --workdir of a `pretrain` run (or use configs/baseline.py).')
  if not has_config(workdir) or not latest_step(workdir):
    raise ValueError(f'No pretrain checkpoint found in {workdir}; run '
                     f'`python main.py --config=configs/pretrain.py --workdir={workdir}` '
                     'first or point --config.pretrained_workdir at a finished pretrain run.')
  previous = load_config(workdir)
  if previous.mode != 'pretrain':
    raise ValueError(f'{workdir} holds a {previous.mode} run, not a pretrain run; point '
                     '--config.pretrained_workdir at the workdir of a pretrain run.')
  mismatched = [f for f in state_lib.ARCHITECTURE_FIELDS if previous.get(f) != config.get(f)]
  if mismatched:
    details = ', '.join(f'{f}={previous.get(f)!r}' for f in mismatched)
    raise ValueError(
        f'The pretrain run in {workdir} used another architecture ({details}); set the '
        f'same values, e.g. ' + ' '.join(f'--config.{f}={previous.get(f)}' for f in mismatched)
        + '.')
  return previous


def load_pretrained_encoder(config, state, mesh):
  """`state` with the encoder params and batch_stats of the pretrain run's last checkpoint."""
  pre_config = pretrained_config(config)
  with _manager(config.pretrained_workdir, 'latest', read_only=True) as manager:
    pretrained = _restore_newest(manager, state_lib.abstract_state(pre_config, mesh),
                                 config.pretrained_workdir)
  logging.info('Encoder loaded from %s (step %d).', config.pretrained_workdir,
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
    raise ValueError(f'No checkpoint in {workdir}; train there first or point at the '
                     'workdir of a finished run.')
  return config, state_lib.create_model(config), state_lib.variables(restored)
