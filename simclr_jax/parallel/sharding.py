"""Data parallelism with jax.jit over a device mesh (big_vision style).

The global batch is sharded over the `data` axis of a one-dimensional mesh of all
devices (of all processes); parameters and optimizer state are replicated. Under
`jax.jit` XLA inserts the cross-device reductions itself, so BatchNorm statistics
and NT-Xent negatives are taken over the global batch with no explicit collective.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax import errors


def create_mesh(runs=1, devices=None):
  """A one-dimensional `data` mesh over every device of every process.

  With `runs` > 1 (a group of runs trained together, train/groups.py): a
  (`run`, `data`) mesh of `runs` x (devices / runs), each run's batch split over
  its row's `data` devices. `devices`: others than `jax.devices()` (a TPU
  topology's, to compile for).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  if runs == 1:
    return Mesh(devices, ('data',))
  return Mesh(devices.reshape(runs, -1), ('run', 'data'))


def run_devices(num_runs, at_most=0, num_devices=None):
  """Devices along a group's `run` axis: the most that divide both the device count
  (`num_devices`, else this job's) and `num_runs`, up to `at_most` (0: no bound). 1 on
  several processes: each process feeds its devices their rows of every run's batch,
  as for a lone run."""
  if num_devices is None and jax.process_count() > 1:
    return 1
  devices = jax.device_count() if num_devices is None else num_devices
  return max(r for r in range(1, devices + 1)
             if devices % r == 0 and num_runs % r == 0 and (not at_most or r <= at_most))


def data_sharding(mesh, batch_axis=0, runs=False):
  """The batch axis (the leading one by default) split over the `data` axis; with
  `runs` (a group's inputs, runs leading) the leading axis over the `run` axis too."""
  spec = [None] * batch_axis + ['data']
  if runs and 'run' in mesh.axis_names:
    spec[0] = 'run'
  return NamedSharding(mesh, P(*spec))


def run_sharding(mesh):
  """A group's stacked trees: the leading run axis over the mesh's `run` axis, if any."""
  return NamedSharding(mesh, P('run') if 'run' in mesh.axis_names else P())


def replicated_sharding(mesh):
  return NamedSharding(mesh, P())


def replicate(value, mesh):
  """A host value (the same on every process) as an array replicated over `mesh`."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, replicated_sharding(mesh),
                                      lambda index: value[index])


def replicate_tree(tree, mesh):
  """`replicate` of every leaf of a pytree (PRNG keys included)."""
  def one(value):
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype,
                                                              jax.dtypes.prng_key):
      data = replicate(jax.random.key_data(value), mesh)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    return replicate(value, mesh)
  return jax.tree.map(one, tree)


def check_batch_size(batch_size, what='batch_size'):
  """Raises a one-sentence error when a global batch cannot be split evenly."""
  devices = jax.device_count()
  if batch_size % devices:
    raise errors.UserError(
        f'The global {what} {batch_size} is not divisible by the {devices} devices; '
        f'set --config.{what} to a multiple of {devices}.')


def local_rows(global_batch, batch_axis=0):
  """This process's rows [p B / P, (p + 1) B / P) of a global host batch (numpy dict)."""
  count = jax.process_count()
  if count == 1:
    return global_batch

  def local(x):
    x = np.asarray(x)
    rows = x.shape[batch_axis] // count
    start = jax.process_index() * rows
    return np.take(x, np.arange(start, start + rows), axis=batch_axis)
  return jax.tree.map(local, global_batch)


def to_global(local_batch, sharding):
  """Per-process numpy batch -> global jax.Array sharded over all devices."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def pad_rows(x, rows):
  """`x` with its leading axis padded to `rows` by copies of its first row.

  Padded rows are valid inputs (no zero images or NaN); callers drop their outputs.
  An array on the devices stays there; anything else becomes a numpy array.
  """
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x)
  if len(x) == rows:
    return x
  return xp.concatenate([x, xp.repeat(x[:1], rows - len(x), axis=0)])


def map_batches(fn, arrays, batch_size):
  """`fn(*batch)` over fixed-size batches of the arrays' rows, outputs unpadded.

  The last batch is padded (`pad_rows`) so that one compiled shape serves every
  batch, in the spirit of big_vision's `pad_shard_unpad`.

  Args:
    fn: function of one batch of each array, returning a pytree of arrays whose
      leading axis is the batch.
    arrays: sequence of arrays with the same number of rows.
    batch_size: rows per call.

  Returns:
    The outputs of every row, concatenated, as numpy.
  """
  num_rows = len(arrays[0])
  outputs = []
  for start in range(0, num_rows, batch_size):
    count = min(batch_size, num_rows - start)
    out = fn(*(pad_rows(a[start:start + batch_size], batch_size) for a in arrays))
    outputs.append(jax.tree.map(lambda o, count=count: np.asarray(o)[:count], out))
  return jax.tree.map(lambda *o: np.concatenate(o), *outputs)


def to_host(tree):
  """Global arrays -> numpy, gathering shards of other processes if needed."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)
