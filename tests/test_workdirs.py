"""Runs on disk: URL workdirs end to end, JSON written whole, the checkpoint fallback.

The URL test routes a test-only scheme, `ram://`, to memory for every writer of a
workdir, the way `gs://` reaches Cloud Storage in production:

- etils.epath (runs.py's JSON, plots, orbax's own files): a backend over
  tensorstore's in-memory key-value store;
- orbax's arrays (tensorstore): the same key-value store, its GCS code path
  (commit file, no directory rename) taken for `ram://` as for `gs://`;
- clu's TensorBoard writer (TensorFlow's gfile): TensorFlow's own `ram://`
  filesystem.

Then a tiny pretrain + finetune runs through `run.run`, and every file must be
there and none on local disk.
"""

import fnmatch
import io
import json
import os
import posixpath
import tempfile
import threading

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath
from etils.epath import register
import flax
import jax
import numpy as np
import pytest
import tensorstore as ts

from simclr_jax.data import arrays as arrays_lib
from simclr_jax import errors
from simclr_jax import run
from simclr_jax.train import workdirs
from simclr_jax.train import trainer
from tests.conftest import tiny_config

SCHEME = 'ram'


# ----------------------------------------------------------------------------- in-memory filesystem


class _Writer(io.BytesIO):
  """A file being written: its bytes go to the store when it is closed."""

  def __init__(self, store, key, initial=b''):
    super().__init__()
    self.write(initial)
    self._store, self._key = store, key

  def close(self):
    if not self.closed:
      self._store.put(self._key, self.getvalue())
    super().close()


class MemoryBackend(backend_lib.Backend):
  """An etils.epath backend of `ram://` paths over tensorstore's memory key-value store.

  Files are keys `ram/<path>`; directories are the prefixes of keys, and those
  made by mkdir. orbax's tensorstore writes into the same store (see `memory_fs`).
  """

  def __init__(self, context):
    self.kvstore = ts.KvStore.open({'driver': 'memory'}, context=context).result()
    self._dirs = set()
    self._lock = threading.Lock()

  # Keys and URLs.
  @staticmethod
  def key(path):
    path = os.fspath(path)
    assert path.startswith(f'{SCHEME}://'), path
    rest = posixpath.normpath('/' + path[len(SCHEME) + 3:]).lstrip('/')
    return f'{SCHEME}/{rest}' if rest else SCHEME

  @staticmethod
  def url(key):
    return f'{SCHEME}://{key[len(SCHEME) + 1:]}'

  def keys(self):
    return [k.decode() for k in self.kvstore.list().result()]

  def put(self, key, data):
    self.kvstore.write(key, bytes(data)).result()

  def _get(self, key):
    result = self.kvstore.read(key).result()
    return bytes(result.value) if result.state == 'value' else None

  def _entries(self):
    """(files, directories) as keys."""
    files = self.keys()
    with self._lock:
      dirs = set(self._dirs)
    for key in files:
      parts = key.split('/')
      dirs.update('/'.join(parts[:i]) for i in range(1, len(parts)))
    return files, dirs

  # The Backend interface.
  def open(self, path, mode):
    key = self.key(path)
    if 'r' in mode:
      data = self._get(key)
      if data is None:
        raise FileNotFoundError(f'No such file: {path}')
      return io.BytesIO(data) if 'b' in mode else io.StringIO(data.decode('utf-8'))
    if not self.isdir(self.url(posixpath.dirname(key))):
      raise FileNotFoundError(f'No such directory: {posixpath.dirname(os.fspath(path))}')
    initial = (self._get(key) or b'') if 'a' in mode else b''
    writer = _Writer(self, key, initial)
    return writer if 'b' in mode else io.TextIOWrapper(writer, encoding='utf-8')

  def exists(self, path):
    return self._get(self.key(path)) is not None or self.isdir(path)

  def isdir(self, path):
    key = self.key(path)
    if key == SCHEME:
      return True
    _, dirs = self._entries()
    return key in dirs

  def listdir(self, path):
    key = self.key(path)
    if not self.isdir(path):
      raise FileNotFoundError(f'No such directory: {path}')
    files, dirs = self._entries()
    return sorted({k[len(key) + 1:].split('/')[0] for k in list(files) + list(dirs)
                   if k.startswith(key + '/')})

  def glob(self, path):
    pattern = self.key(path).split('/')
    files, dirs = self._entries()
    return sorted(self.url(k) for k in set(files) | dirs
                  if len(k.split('/')) == len(pattern)
                  and all(fnmatch.fnmatchcase(a, b) for a, b in zip(k.split('/'), pattern)))

  def walk(self, top, *, top_down=True, on_error=None):
    del on_error
    entries = [(name, self.isdir(posixpath.join(os.fspath(top), name)))
               for name in self.listdir(top)]
    dirs = [n for n, is_dir in entries if is_dir]
    files = [n for n, is_dir in entries if not is_dir]
    if top_down:
      yield os.fspath(top), dirs, files
    for name in dirs:
      yield from self.walk(posixpath.join(os.fspath(top), name), top_down=top_down)
    if not top_down:
      yield os.fspath(top), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    del mode
    if self.isdir(path) and not exist_ok:
      raise FileExistsError(f'{path} exists')
    parts = self.key(path).split('/')
    with self._lock:
      self._dirs.update('/'.join(parts[:i]) for i in range(1, len(parts) + 1))

  def mkdir(self, path, *, exist_ok=False, mode=None):
    del mode
    key = self.key(path)
    if self.exists(path):
      if exist_ok and self.isdir(path):
        return
      raise FileExistsError(f'{path} exists')
    if not self.isdir(self.url(posixpath.dirname(key))):
      raise FileNotFoundError(f'No parent directory of {path}')
    with self._lock:
      self._dirs.add(key)

  def rmtree(self, path):
    key = self.key(path)
    if not self.exists(path):
      raise FileNotFoundError(f'No such directory: {path}')
    self.kvstore.delete_range(ts.KvStore.KeyRange(inclusive_min=key + '/',
                                                  exclusive_max=key + '0')).result()
    self.kvstore.delete_range(ts.KvStore.KeyRange(inclusive_min=key,
                                                  exclusive_max=key + '\0')).result()
    with self._lock:
      self._dirs = {d for d in self._dirs if d != key and not d.startswith(key + '/')}

  def remove(self, path):
    key = self.key(path)
    if self._get(key) is None:
      raise FileNotFoundError(f'No such file: {path}')
    self.kvstore.delete_range(ts.KvStore.KeyRange(inclusive_min=key,
                                                  exclusive_max=key + '\0')).result()

  def _move(self, path, dst, overwrite):
    src_key, dst_key = self.key(path), self.key(dst)
    if self.exists(dst) and not overwrite:
      raise FileExistsError(f'{dst} exists')
    data = self._get(src_key)
    if data is not None:
      self.put(dst_key, data)
      self.remove(path)
      return
    if not self.isdir(path):
      raise FileNotFoundError(f'No such file or directory: {path}')
    files, dirs = self._entries()
    for key in files:
      if key.startswith(src_key + '/'):
        self.put(dst_key + key[len(src_key):], self._get(key))
    with self._lock:
      self._dirs.update(dst_key + d[len(src_key):] for d in dirs
                        if d == src_key or d.startswith(src_key + '/'))
    self.rmtree(path)

  def rename(self, path, dst):
    self._move(path, dst, overwrite=False)

  def replace(self, path, dst):
    self._move(path, dst, overwrite=True)

  def copy(self, path, dst, overwrite):
    if self.exists(dst) and not overwrite:
      raise FileExistsError(f'{dst} exists')
    self.put(self.key(dst), self._get(self.key(path)))

  def stat(self, path):
    data = self._get(self.key(path))
    if data is None and not self.isdir(path):
      raise FileNotFoundError(f'No such file: {path}')
    return epath.StatResult(is_directory=data is None, length=len(data or b''), mtime=0)


@pytest.fixture
def memory_fs(monkeypatch):
  """Routes `ram://` workdirs of every writer to memory (module docstring); yields the backend."""
  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  shared = ts.Context()
  backend = MemoryBackend(shared)

  class MemoryPath(gpath.PosixGPath):

    @property
    def _backend(self):
      return backend

  prefix = f'{SCHEME}://'
  monkeypatch.setattr(gpath, '_URI_PREFIXES', gpath._URI_PREFIXES + (prefix,))
  monkeypatch.setattr(gpath, '_URI_SCHEMES', gpath._URI_SCHEMES | {SCHEME})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, prefix, f'/{SCHEME}/')
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, prefix, MemoryPath)
  # orbax: a ram:// directory is remote storage as gs:// is, its tensorstore
  # kvstore the memory one above (one context shared by every open).
  monkeypatch.setattr(gcs_utils, '_GCS_PATH_PREFIX', ('gs://', prefix))
  use_gcs_driver = ts_utils._use_gcs_driver
  monkeypatch.setattr(ts_utils, '_use_gcs_driver',
                      lambda d: d.startswith(f'{SCHEME}:/') or use_gcs_driver(d))
  kvstore_for_gcs = gcs_utils.get_kvstore_for_gcs

  def kvstore_spec(path):
    if path.startswith(f'{SCHEME}:/'):
      return {'driver': 'memory',
              'path': backend.key(f'{prefix}{path[len(SCHEME) + 2:]}') + '/'}
    return kvstore_for_gcs(path)
  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', kvstore_spec)
  get_ts_context = ts_utils.get_ts_context
  monkeypatch.setattr(ts_utils, 'get_ts_context',
                      lambda **kw: ts.Context(get_ts_context(**kw).spec, parent=shared))
  monkeypatch.setattr(workdirs, 'URL_SCHEMES', workdirs.URL_SCHEMES + [SCHEME])
  yield backend


def _tensorflow_files(url):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(url):
    return []
  return [posixpath.join(root, name) for root, _, names in tf.io.gfile.walk(url)
          for name in names]


def _local_files(root):
  return sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)


def test_memory_backend_behaves_as_a_filesystem(memory_fs):
  """The test's own filesystem: what runs.py and orbax rely on."""
  root = epath.Path('ram://fs_test')
  (root / 'a' / 'b').mkdir(parents=True)
  workdirs.write_json(root / 'a' / 'x.json', {'k': 1})
  assert workdirs.read_json(root / 'a' / 'x.json') == {'k': 1}
  assert sorted(p.name for p in (root / 'a').iterdir()) == ['b', 'x.json']
  assert [p.name for p in root.glob('a/*.json')] == ['x.json']
  (root / 'a').rename(root / 'c')
  assert not (root / 'a').exists() and (root / 'c' / 'x.json').exists()
  assert (root / 'c' / 'b').is_dir()
  (root / 'c').rmtree()
  assert not root.joinpath('c').exists()


def test_pretrain_and_finetune_write_only_to_a_url_workdir(memory_fs, data_dir, tmp_path,
                                                           monkeypatch):
  """Every file of a run lands under its URL workdir, none on local disk."""
  cwd, local_tmp = tmp_path / 'cwd', tmp_path / 'tmp'
  cwd.mkdir()
  local_tmp.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(tempfile, 'tempdir', str(local_tmp))
  arrays_lib.load_arrays(tiny_config(data_dir))  # The data set is local input, built first.
  data_before = _local_files(data_dir)
  bucket = f'{SCHEME}://bucket{os.getpid()}'
  pretrain_dir, finetune_dir = f'{bucket}/study/pretrain', f'{bucket}/study/finetune'

  pretrained = run.run(tiny_config(data_dir, 'pretrain'), pretrain_dir)
  result = run.run(tiny_config(data_dir, 'finetune', pretrained_workdir=pretrain_dir,
                               label_fraction=0.5), finetune_dir)

  stored = {memory_fs.url(k) for k in memory_fs.keys()}
  for workdir, mode_files in ((pretrain_dir, ()),
                              (finetune_dir, ('confusion_matrix.png', 'test_predictions.npz'))):
    for name in ('config.json', 'metrics.json') + mode_files:
      assert f'{workdir}/{name}' in stored, name
    for which in ('latest', 'best'):
      checkpoint = [u for u in stored if u.startswith(f'{workdir}/checkpoints/{which}/')]
      assert any(u.endswith('/_CHECKPOINT_METADATA') for u in checkpoint), which
      assert any('/ocdbt.process_0/' in u or u.endswith('manifest.ocdbt')
                 for u in checkpoint), which
    assert any('events.out.tfevents' in f for f in _tensorflow_files(workdir)), workdir
  assert not [u for u in stored if u.endswith('.tmp') or '.orbax-checkpoint-tmp' in u]
  assert workdirs.read_metrics(pretrain_dir)['knn1_accuracy'] == pretrained['knn1_accuracy']
  assert workdirs.read_metrics(finetune_dir)['accuracy'] == result['accuracy']
  assert workdirs.latest_step(finetune_dir) == result['total_steps']
  _, _, variables = workdirs.restore_for_inference(finetune_dir)
  assert 'encoder' in variables['params']
  # Nothing on local disk: not in the working directory, not in the temporary
  # directory, no 'ram:' folder anywhere, the data set's files unchanged.
  assert _local_files(cwd) == [] and not os.listdir(cwd)
  assert _local_files(local_tmp) == []
  assert not os.path.exists(f'/{SCHEME}') and not os.path.exists(f'{SCHEME}:')
  assert _local_files(data_dir) == data_before


def test_unknown_url_scheme_and_missing_bucket_are_user_errors():
  from simclr_jax import checks  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UserError, match='not a filesystem'):
    checks.check_workdir('s4://bucket/run')
  with pytest.raises(errors.UserError, match='names no bucket'):
    checks.check_workdir('gs:///run')


def test_gs_workdir_needs_google_cloud_storage(monkeypatch):
  """orbax deletes old checkpoints in a bucket through google-cloud-storage."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from simclr_jax import checks  # pylint: disable=g-import-not-at-top
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: (
      None if name == 'google.cloud.storage' else find_spec(name, *a)))
  with pytest.raises(errors.UserError, match='pip install google-cloud-storage'):
    checks.check_workdir('gs://bucket/run')
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: object())
  checks.check_workdir('gs://bucket/run')  # Creates nothing, asks no server.


# ----------------------------------------------------------------------------- JSON, checkpoints


def test_json_is_written_whole_and_never_left_half_written(tmp_path, monkeypatch):
  path = tmp_path / 'sub' / 'metrics.json'
  workdirs.write_json(path, {'a': [1, 2]})
  assert json.loads(path.read_text()) == {'a': [1, 2]}
  # A writer that dies mid-way leaves the previous file whole and no stray name.
  real_write_text = epath.Path.write_text

  def broken(self, text, *args, **kwargs):
    real_write_text(self, text[:5], *args, **kwargs)
    raise OSError('disk gone')
  monkeypatch.setattr(type(epath.Path(path)), 'write_text', broken)
  with pytest.raises(OSError):
    workdirs.write_json(path, {'a': [3]})
  monkeypatch.undo()
  assert json.loads(path.read_text()) == {'a': [1, 2]}
  workdirs.write_json(path, {'a': [3]})  # The half-written temporary file is overwritten.
  assert json.loads(path.read_text()) == {'a': [3]}
  assert sorted(os.listdir(path.parent)) == ['metrics.json']


def test_damaged_json_is_a_user_error(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text('{"mode": ')
  with pytest.raises(errors.UserError, match='not valid JSON'):
    workdirs.read_json(path)


def test_a_workdir_of_the_flat_config_is_refused_in_one_line(tmp_path):
  """A run started before the config had sections is not misread: one line, what to do."""
  (tmp_path / 'config.json').write_text(json.dumps(
      {'mode': 'pretrain', 'seed': 0, 'batch_size': 32, 'augment': {'flip': False}}))
  config = tiny_config('/unused', 'pretrain')
  for read in (lambda: workdirs.load_config(str(tmp_path)),
               lambda: workdirs.check_workdir_config(config, str(tmp_path))):
    with pytest.raises(errors.UserError, match='older simclr_jax.*batch_size.*new --workdir'):
      read()


def test_a_workdir_of_another_config_names_the_differing_dotted_fields(tmp_path):
  config = tiny_config('/unused', 'pretrain')
  workdirs.check_workdir_config(config, str(tmp_path))
  workdirs.check_workdir_config(config, str(tmp_path))  # The same config resumes.
  other = tiny_config('/unused', 'pretrain', batch_size=8)
  with pytest.raises(errors.UserError, match=r'fields train\.batch_size differ'):
    workdirs.check_workdir_config(other, str(tmp_path))


@flax.struct.dataclass
class _State:
  """What workdirs.Checkpoints needs of a TrainState: a pytree with a step."""
  step: jax.Array
  w: jax.Array


def _state(step, value):
  return _State(jax.numpy.int32(step), jax.numpy.full((3,), value, jax.numpy.float32))


def test_checkpoint_fallback_skips_a_damaged_newest_checkpoint(tmp_path):
  """The newest checkpoint unreadable: the one before is restored and the bad one deleted."""
  workdir = str(tmp_path)
  checkpoints = workdirs.Checkpoints(workdir, keep=3)
  for step in (1, 2):
    checkpoints.save_latest(_state(step, float(step)))
  checkpoints.save_best(_state(2, 2.0))
  checkpoints.close()
  newest = tmp_path / 'checkpoints' / 'latest' / '2'
  for root, _, names in os.walk(newest):
    for name in names:
      if 'manifest' in name or name.endswith('.ocdbt') or len(name) == 32:
        os.remove(os.path.join(root, name))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0, 0.0))
  checkpoints = workdirs.Checkpoints(workdir, keep=3)
  restored = checkpoints.restore_latest(target)
  assert int(restored.step) == 1 and float(restored.w[0]) == 1.0
  assert checkpoints.latest.all_steps() == [1]
  assert int(checkpoints.restore_best(target).step) == 2
  checkpoints.close()


def test_no_readable_checkpoint_is_a_user_error(tmp_path):
  workdir = str(tmp_path)
  checkpoints = workdirs.Checkpoints(workdir)
  checkpoints.save_latest(_state(1, 1.0))
  checkpoints.close()
  for root, _, names in os.walk(tmp_path / 'checkpoints' / 'latest' / '1'):
    for name in names:
      if not name.startswith('_'):
        os.remove(os.path.join(root, name))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0, 0.0))
  checkpoints = workdirs.Checkpoints(workdir)
  with pytest.raises(errors.UserError, match='is readable'):
    checkpoints.restore_latest(target)
  checkpoints.close()


def test_best_and_latest_saves_of_one_step_use_their_own_barriers(tmp_path):
  """orbax names an async save's barrier after its step: each manager adds its own prefix."""
  checkpoints = workdirs.Checkpoints(str(tmp_path))
  prefixes = {m._multiprocessing_options.barrier_sync_key_prefix  # pylint: disable=protected-access
              for m in (checkpoints.latest, checkpoints.best)}
  checkpoints.close()
  assert len(prefixes) == 2 and None not in prefixes


def test_a_run_resumes_from_its_url_workdir(memory_fs, data_dir):
  """kill -9 between checkpoints, then the same command: resumed from the stored step."""
  workdir = f'{SCHEME}://resume{os.getpid()}/pretrain'
  config = tiny_config(data_dir, 'pretrain', num_epochs=1, checkpoint_every_steps=2)
  first = trainer.train_and_evaluate(config, workdir)
  assert workdirs.latest_step(workdir) == first['total_steps']
  again = trainer.train_and_evaluate(config, workdir)  # Finished: resumes at the end.
  assert again['chosen_step'] == first['chosen_step']
  np.testing.assert_allclose(again['knn1_accuracy'], first['knn1_accuracy'])


def test_no_two_checkpoint_saves_are_in_flight(tmp_path, monkeypatch):
  """Each save first waits for the other manager's: one background save at a time."""
  events = []
  checkpoints = workdirs.Checkpoints(str(tmp_path))
  for name in ('latest', 'best'):
    manager = getattr(checkpoints, name)
    wait = manager.wait_until_finished
    monkeypatch.setattr(manager, 'wait_until_finished',
                        lambda name=name, wait=wait: (events.append(f'wait {name}'), wait()))
  monkeypatch.setattr(workdirs, '_save', lambda manager, state: events.append(
      f'save {"latest" if manager is checkpoints.latest else "best"}'))
  checkpoints.save_best(_state(5, 1.0))
  checkpoints.save_latest(_state(5, 1.0))
  assert events == ['wait latest', 'save best', 'wait best', 'save latest']
  monkeypatch.undo()
  checkpoints.close()
