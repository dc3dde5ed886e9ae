"""Multi-host start-up: which launch this is, `jax.distributed.initialize`, one-process work.

Called by main.py before any JAX computation (`maybe_initialize_distributed`), and by
the modules that must prepare something once for all processes (`prepare_once`,
`on_first_process`: the TFDS data set, the subject cache, run files).
"""

import dataclasses
import glob
import hashlib
import os
import socket
import zlib

from absl import logging
import jax
import numpy as np

from simclr_jax import errors


# ----------------------------------------------------------------------------- start-up
#
# One process per host (or per GPU) and `jax.distributed.initialize` before any
# JAX computation. Which launch this is follows JAX's own cluster detection
# (jax/_src/clusters): Open MPI, then SLURM, then Cloud TPU; the flags
# --coordinator_address, --num_processes and --process_id override what a
# cluster says. What JAX's detection does not cover is done here: one task of
# a SLURM step is one process with all its GPUs (JAX would pin it to one), a
# task that sees only its own GPUs keeps them all (JAX would pick the GPU of
# its local rank, which it may not have), Open MPI 5 (no ORTE variables: the
# process layout is read from OMPI_COMM_WORLD_* / PMIX_RANK), and a launch
# that is half configured is a one-line error instead of JAX's
# "coordinator_address should be defined".

# Port range JAX's cluster detection picks coordinator ports from.
_PORT_BASE, _PORT_RANGE = 65535 - 2**12 + 1, 2**12
# The SLURM variables of a task started by srun (JAX's SlurmCluster needs them all).
_SLURM_TASK_VARIABLES = ('SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was started.

  Attributes:
    kind: 'single' (one process), 'flags', 'slurm', 'openmpi' or 'tpu'.
    initialize_kwargs: the arguments of `jax.distributed.initialize`, or None
      for a single process. Arguments left out (or None) are found by JAX's
      own cluster detection.
    description: one line for the log.
  """
  kind: str
  initialize_kwargs: dict | None
  description: str


@dataclasses.dataclass(frozen=True)
class _Cluster:
  """The process layout a cluster's environment gives (None: not known)."""
  kind: str
  num_processes: int
  process_id: int | None
  local_rank: int | None
  local_size: int | None
  coordinator_address: str | None = None
  jax_detects: bool = False  # jax.distributed.initialize() finds the rest itself.
  gpus_per_task_bound: bool = False  # Each task sees only its own GPUs.


def _int(env, name, default=None):
  value = env.get(name)
  if value is None or not str(value).strip():
    return default
  try:
    return int(str(value).strip())
  except ValueError:
    raise errors.UserError(f'The environment variable {name}={value!r} is not a whole number; '
                           'unset it or launch the job again.') from None


def _slurm_tasks_on_node(env):
  """Tasks of this SLURM step on this node, from SLURM_STEP_TASKS_PER_NODE ('4(x2),3')."""
  layout = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE')
  per_node = _int(env, 'SLURM_NTASKS_PER_NODE')
  if not layout:
    return per_node
  counts = []
  for part in layout.split(','):
    count, _, repeat = part.partition('(x')
    try:
      counts += [int(count)] * (int(repeat.rstrip(')')) if repeat else 1)
    except ValueError:
      return per_node
  node = _int(env, 'SLURM_NODEID', 0)
  return counts[node] if node < len(counts) else per_node


def _slurm_cluster(env):
  """The SLURM task layout, or None outside SLURM; a half-configured one is a UserError."""
  if 'SLURM_JOB_ID' not in env:
    return None
  missing = [name for name in _SLURM_TASK_VARIABLES if name not in env]
  num_tasks = _int(env, 'SLURM_NTASKS')
  if missing:
    if num_tasks == 1:
      return _Cluster('slurm', 1, 0, 0, 1)  # One task: nothing to coordinate.
    raise errors.UserError(
        f'SLURM job {env["SLURM_JOB_ID"]} without the variables of an srun task '
        f'({", ".join(missing)} unset): start the processes with srun, one per GPU or one '
        'per node, e.g. `srun --ntasks-per-node=<GPUs per node> python main.py ...`, or '
        'pass --num_processes=1 to run a single process here.')
  return _Cluster('slurm', num_tasks, _int(env, 'SLURM_PROCID'), _int(env, 'SLURM_LOCALID'),
                  _slurm_tasks_on_node(env), jax_detects=True,
                  gpus_per_task_bound=bool(env.get('SLURM_GPUS_PER_TASK')))


def _openmpi_cluster(env):
  """The Open MPI (4 or 5) process layout, or None outside mpirun."""
  if 'OMPI_COMM_WORLD_SIZE' not in env:
    return None
  size = _int(env, 'OMPI_COMM_WORLD_SIZE')
  rank = _int(env, 'OMPI_COMM_WORLD_RANK', _int(env, 'PMIX_RANK'))
  local_rank = _int(env, 'OMPI_COMM_WORLD_LOCAL_RANK')
  local_size = _int(env, 'OMPI_COMM_WORLD_LOCAL_SIZE')
  # Open MPI <= 4 (ORTE) tells where mpirun runs, from which JAX derives the
  # coordinator; Open MPI 5 (PRRTE / PMIx) does not. On one node the
  # coordinator is this node, on a port derived from the job's PMIx namespace.
  jax_detects = 'OMPI_MCA_orte_hnp_uri' in env
  coordinator = None
  namespace = env.get('PMIX_NAMESPACE') or env.get('OMPI_MCA_ess_base_jobid')
  if not jax_detects and local_size == size and namespace:
    port = _PORT_BASE + zlib.crc32(namespace.encode()) % _PORT_RANGE
    coordinator = f'127.0.0.1:{port}'
  return _Cluster('openmpi', size, rank, local_rank, local_size, coordinator,
                  jax_detects=jax_detects)


def _on_cloud_tpu_vm():
  """Whether JAX found Cloud TPU chips and libtpu on this VM (at `import jax`)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def _tpu_metadata(key):
  """A value of the TPU VM's metadata server, through JAX's own client."""
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  text, code = cloud_tpu_cluster.get_metadata(key)
  if code != 200:
    raise RuntimeError(f'metadata {key!r}: HTTP {code}')
  return text


def _tpu_host_count(env):
  """Hosts of this Cloud TPU slice (times its slices), as JAX's TPU clusters count them.

  GKE lists the hosts in TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES; a plain
  Cloud TPU VM (`gcloud compute tpus tpu-vm create`) in its metadata server's
  worker-network-endpoints. None when not on a Cloud TPU VM.
  """
  if not _on_cloud_tpu_vm():
    return None
  names = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')
  if names:
    hosts = len([n for n in names.split(',') if n.strip()])
  elif env.get('TPU_SKIP_MDS_QUERY') is not None:
    hosts = 1
  else:
    try:
      hosts = len([w for w in _tpu_metadata('worker-network-endpoints').split(',') if w])
    except Exception as error:  # pylint: disable=broad-except
      logging.warning('Cloud TPU VM, but its metadata server did not list the hosts '
                      '(%s); running as one process.', errors.one_line(error))
      return 1
  slices = _int(env, 'MEGASCALE_NUM_SLICES')
  if slices is None and not names and env.get('TPU_SKIP_MDS_QUERY') is None:
    try:
      from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
      slices = int(cloud_tpu_cluster.get_tpu_env_value('MEGASCALE_NUM_SLICES') or 1)
    except Exception:  # pylint: disable=broad-except
      slices = 1
  return max(1, hosts) * (slices or 1)


def _gpu_device_files():
  return glob.glob('/dev/nvidia[0-9]*')


def visible_gpu_count(env=None):
  """GPUs this process can see, without starting JAX's backend (CUDA_VISIBLE_DEVICES, /dev)."""
  env = os.environ if env is None else env
  value = env.get('CUDA_VISIBLE_DEVICES')
  if value is not None:
    value = value.strip()
    if value in ('', '-1', 'NoDevFiles'):
      return 0
    return len([v for v in value.split(',') if v.strip()])
  return len(_gpu_device_files())


def local_device_ids(cluster, num_gpus):
  """The GPUs (of those this process sees) a task uses, as the launch intends.

  One task per node: all of the node's GPUs. One task per GPU (every task sees
  all the node's GPUs): the GPU of its local rank, as JAX's default. Tasks that
  each see only their own GPUs (`--gpus-per-task`, or one GPU visible): all of
  them. k GPUs per task: the k of its local rank.

  Returns:
    A list of device ids for `jax.distributed.initialize(local_device_ids=...)`,
    or None on a machine without GPUs (JAX's default).
  """
  if num_gpus == 0:
    return None
  if num_gpus == 1 or cluster.gpus_per_task_bound or cluster.local_size == 1:
    return list(range(num_gpus))
  if cluster.local_size is None or cluster.local_rank is None:
    rank = cluster.local_rank or 0
    return [rank] if rank < num_gpus else list(range(num_gpus))
  if num_gpus % cluster.local_size:
    raise errors.UserError(
        f'{num_gpus} GPUs cannot be shared evenly by the {cluster.local_size} tasks on this '
        'node; start one task per node or one per GPU (e.g. srun --ntasks-per-node='
        f'{num_gpus}), or give each task its own GPUs (--gpus-per-task).')
  per_task = num_gpus // cluster.local_size
  return list(range(cluster.local_rank * per_task, (cluster.local_rank + 1) * per_task))


def _check_coordinator(address):
  host, sep, port = str(address).rpartition(':')
  if not sep or not host or not port.isdigit():
    raise errors.UserError(f'--coordinator_address={address} is not HOST:PORT; pass the '
                           'address of process 0 and a free port, e.g. '
                           '--coordinator_address=10.0.0.1:12345.')


def detect_launch(coordinator_address=None, num_processes=None, process_id=None, env=None):
  """Which multi-process launch this is, and how to call `jax.distributed.initialize`.

  Args:
    coordinator_address, num_processes, process_id: main.py's flags (None
      where not given); they override what a cluster's environment says, and
      --num_processes=1 means one process whatever the environment.
    env: the environment (os.environ by default).

  Returns:
    A `Launch`.

  Raises:
    errors.UserError: for a half-configured launch (--num_processes without
      --coordinator_address, an salloc shell without srun, an Open MPI 5 job
      over several nodes without --coordinator_address, ...).
  """
  env = os.environ if env is None else env
  coordinator_address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS') or None
  if num_processes is not None and num_processes < 1:
    raise errors.UserError(f'--num_processes={num_processes} must be at least 1.')
  if num_processes == 1:
    return Launch('single', None, 'one process (--num_processes=1)')
  cluster = _openmpi_cluster(env) or _slurm_cluster(env)
  flags = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if cluster is None:
    if all(value is None for value in flags.values()):
      hosts = _tpu_host_count(env)
      if hosts and hosts > 1:
        # JAX's GceTpuCluster / GkeTpuCluster find the hosts, this host's id and
        # the coordinator themselves; TPUs are never restricted to local ids.
        return Launch('tpu', {}, f'Cloud TPU slice of {hosts} hosts')
      return Launch('single', None, 'one process')
    missing = [f'--{name}' for name, value in flags.items() if value is None]
    if missing:
      given = ', '.join(f'--{n}={v}' for n, v in flags.items() if v is not None)
      raise errors.UserError(
          f'A multi-process launch needs --coordinator_address=HOST:PORT (of process 0), '
          f'--num_processes=N and --process_id=0..N-1 on every process; {given} was given '
          f'without {" and ".join(missing)}.')
    _check_coordinator(coordinator_address)
    if not 0 <= process_id < num_processes:
      raise errors.UserError(f'--process_id={process_id} must be in 0..{num_processes - 1} '
                             f'for --num_processes={num_processes}.')
    # Every argument given: no cluster detection (it would pin GPUs to local ranks).
    return Launch('flags', dict(flags, cluster_detection_method='deactivate'),
                  f'process {process_id} of {num_processes} (flags), coordinator '
                  f'{coordinator_address}')

  count = num_processes if num_processes is not None else cluster.num_processes
  if count == 1 and process_id in (None, 0):
    return Launch('single', None, f'one {cluster.kind} task')
  kwargs = {
      'coordinator_address': coordinator_address or cluster.coordinator_address,
      'num_processes': count,
      'process_id': process_id if process_id is not None else cluster.process_id,
  }
  if kwargs['coordinator_address'] is None and not cluster.jax_detects:
    raise errors.UserError(
        f'Open MPI 5 does not tell where rank 0 runs ({count} processes over several '
        'nodes): pass --coordinator_address=HOST:PORT with HOST the node of rank 0 (the '
        'first host of the hostfile) and a free port, the same on every rank.')
  if kwargs['coordinator_address'] is not None:
    _check_coordinator(kwargs['coordinator_address'])
  if kwargs['process_id'] is None or not 0 <= kwargs['process_id'] < count:
    raise errors.UserError(f'The {cluster.kind} environment gives no valid process id for '
                           f'{count} processes; pass --process_id=0..{count - 1}.')
  kwargs['local_device_ids'] = local_device_ids(cluster, visible_gpu_count(env))
  ids = kwargs['local_device_ids']
  return Launch(cluster.kind, kwargs,
                f'{cluster.kind} task {kwargs["process_id"]} of {count}'
                + (f', GPUs {ids}' if ids is not None else ''))


def maybe_initialize_distributed(coordinator_address=None, num_processes=None,
                                 process_id=None):
  """Calls `jax.distributed.initialize` when launched as several processes (see `detect_launch`).

  Call it before anything starts JAX's backend.

  Returns:
    The `Launch`.
  """
  if jax.distributed.is_initialized():
    return Launch('initialized', None, 'jax.distributed already initialized')
  launch = detect_launch(coordinator_address, num_processes, process_id)
  if launch.initialize_kwargs is None:
    return launch
  logging.info('Multi-process launch: %s.', launch.description)
  jax.distributed.initialize(**launch.initialize_kwargs)
  logging.info('Distributed JAX: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return launch


# ----------------------------------------------------------------------------- processes


def sync_processes(name):
  """Waits until every process has reached the barrier `name` (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _all_true(flag):
  """Whether `flag` is true on every process (a collective: every process calls it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def on_first_process(fn, what):
  """`fn()` on process 0 while the others wait; every process calls it at the same point.

  Before it, every process has done what came before (looked at the files `fn`
  changes, say); after it, every process sees what `fn` did. An exception in `fn`
  is raised on process 0 and a UserError on the others, so that no process
  waits forever for one that failed.
  """
  if jax.process_count() == 1:
    fn()
    return
  sync_processes(f'before: {what}')
  _run_and_agree(fn, jax.process_index() == 0,
                 f'Process 0 could not {what}; its error is in its log.')


def _run_and_agree(fn, run_here, failure):
  """Runs `fn` where `run_here`; then every process learns whether all succeeded.

  The process whose `fn` raised re-raises its exception, the others raise a
  UserError saying `failure`: no process waits for one that failed.
  """
  error = None
  if run_here:
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  ok = _all_true(error is None)
  if error is not None:
    raise error
  if not ok:
    raise errors.UserError(failure)


def _host_key():
  """This host's name as an int32 (gathered across processes to group them by host)."""
  digest = hashlib.sha256(socket.gethostname().encode()).digest()
  return np.frombuffer(digest[:4], np.int32)[0]


def prepare_once(prepare, is_ready, what):
  """Prepares shared files (a TFDS data set, a cache) once per filesystem, the others waiting.

  Process 0 prepares (unless `is_ready()`) while the others wait. Then a host
  that still does not see the result (a data dir on each host's own disk)
  prepares it again with its first process. Every process calls this at the same
  point, and reads the result after it.
  """
  if jax.process_count() == 1:
    if not is_ready():
      prepare()
    return
  on_first_process(lambda: is_ready() or prepare(), what)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  ready = bool(is_ready())
  hosts, readiness = multihost_utils.process_allgather((_host_key(), np.int32(ready)))
  hosts, readiness = np.asarray(hosts).reshape(-1), np.asarray(readiness).reshape(-1)
  if readiness.all():
    return
  me = jax.process_index()
  first_on_host = int(np.flatnonzero(hosts == hosts[me])[0]) == me
  if not ready and first_on_host:
    logging.info('Process %d: this host does not see what process 0 prepared (a disk of '
                 'its own?); preparing it here: %s.', me, what)
  _run_and_agree(prepare, not ready and first_on_host,
                 f'A process could not {what}; its error is in its log.')
