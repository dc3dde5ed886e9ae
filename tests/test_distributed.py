"""Multi-host start-up: launch detection in fake environments, one-process preparation."""

import os

import numpy as np
import pytest

from simclr_jax.parallel import distributed
from simclr_jax import errors

_SLURM_TASK = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'gpu[001-002]',
               'SLURM_STEP_NUM_NODES': '2'}


def _slurm(ntasks, procid, localid, tasks_per_node, nodeid=0, **extra):
  return dict(_SLURM_TASK, SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(procid),
              SLURM_LOCALID=str(localid), SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
              SLURM_NODEID=str(nodeid), **extra)


@pytest.fixture
def eight_gpus(monkeypatch):
  """A node whose /dev shows 8 GPUs (CUDA_VISIBLE_DEVICES decides where it is set)."""
  monkeypatch.setattr(distributed, '_gpu_device_files',
                      lambda: [f'/dev/nvidia{i}' for i in range(8)])
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: False)


def test_plain_process_is_single(eight_gpus):
  launch = distributed.detect_launch(env={})
  assert (launch.kind, launch.initialize_kwargs) == ('single', None)


def test_flags_give_every_argument_and_turn_cluster_detection_off(eight_gpus):
  launch = distributed.detect_launch('10.0.0.1:1234', 2, 1, env={})
  assert launch.kind == 'flags'
  assert launch.initialize_kwargs == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1,
      'cluster_detection_method': 'deactivate'}


@pytest.mark.parametrize('flags, message', [
    ((None, 2, 0), '--coordinator_address'),
    (('10.0.0.1:1234', None, 0), '--num_processes'),
    (('10.0.0.1:1234', 2, None), '--process_id'),
    (('10.0.0.1:1234', 2, 2), r'--process_id=2 must be in 0\.\.1'),
    (('10.0.0.1', 2, 0), 'HOST:PORT'),
    ((None, 0, None), 'at least 1'),
])
def test_half_configured_flags_are_one_line_user_errors(eight_gpus, flags, message):
  with pytest.raises(errors.UserError, match=message) as error:
    distributed.detect_launch(*flags, env={})
  assert '\n' not in str(error.value)


def test_num_processes_one_is_single_whatever_the_environment(eight_gpus):
  env = {'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '8'}  # An salloc shell: would be an error.
  assert distributed.detect_launch(num_processes=1, env=env).kind == 'single'


def test_srun_with_one_task_is_one_process_with_every_gpu(eight_gpus):
  """JAX alone would pin the task to GPU 0 (SLURM_LOCALID)."""
  launch = distributed.detect_launch(env=_slurm(1, 0, 0, '1'))
  assert (launch.kind, launch.initialize_kwargs) == ('single', None)


def test_slurm_one_task_per_gpu_uses_the_gpu_of_its_local_rank(eight_gpus):
  launch = distributed.detect_launch(env=_slurm(16, 11, 3, '8(x2)', nodeid=1))
  assert launch.kind == 'slurm'
  kwargs = launch.initialize_kwargs
  # Coordinator left to JAX's SlurmCluster (first node, port from the job id).
  assert kwargs == {'coordinator_address': None, 'num_processes': 16, 'process_id': 11,
                    'local_device_ids': [3]}


def test_slurm_one_task_per_node_uses_all_its_gpus(eight_gpus):
  launch = distributed.detect_launch(env=_slurm(2, 1, 0, '1(x2)', nodeid=1))
  assert launch.initialize_kwargs['local_device_ids'] == list(range(8))
  assert launch.initialize_kwargs['num_processes'] == 2


def test_slurm_gpus_per_task_keeps_the_tasks_own_gpus(eight_gpus):
  """--gpus-per-task=1: each task sees one GPU, device 0 (JAX would ask for its local rank)."""
  env = _slurm(16, 5, 5, '8(x2)', CUDA_VISIBLE_DEVICES='5', SLURM_GPUS_PER_TASK='1')
  assert distributed.detect_launch(env=env).initialize_kwargs['local_device_ids'] == [0]
  env = _slurm(8, 1, 1, '4(x2)', CUDA_VISIBLE_DEVICES='2,3', SLURM_GPUS_PER_TASK='2')
  assert distributed.detect_launch(env=env).initialize_kwargs['local_device_ids'] == [0, 1]


def test_slurm_two_gpus_per_task_seen_by_all(eight_gpus):
  launch = distributed.detect_launch(env=_slurm(8, 3, 3, '4(x2)'))
  assert launch.initialize_kwargs['local_device_ids'] == [6, 7]


def test_slurm_uneven_gpus_are_a_user_error(eight_gpus):
  with pytest.raises(errors.UserError, match='cannot be shared evenly'):
    distributed.detect_launch(env=_slurm(6, 0, 0, '3(x2)'))


def test_salloc_without_srun_is_a_user_error(eight_gpus):
  """JAX would raise 'coordinator_address should be defined'."""
  env = {'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '8', 'SLURM_NODELIST': 'gpu001'}
  with pytest.raises(errors.UserError, match='srun') as error:
    distributed.detect_launch(env=env)
  assert 'SLURM_PROCID' in str(error.value) and '--num_processes=1' in str(error.value)
  with pytest.raises(errors.UserError, match='srun'):
    distributed.detect_launch(env={'SLURM_JOB_ID': '4242'})
  # One task in the allocation: nothing to coordinate.
  assert distributed.detect_launch(env={'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '1'}).kind == 'single'


def test_flags_override_slurm_but_gpus_follow_the_task(eight_gpus):
  launch = distributed.detect_launch('node7:9999', None, None, env=_slurm(16, 9, 1, '8(x2)'))
  assert launch.initialize_kwargs == {'coordinator_address': 'node7:9999',
                                      'num_processes': 16, 'process_id': 9,
                                      'local_device_ids': [1]}


def _openmpi(size, rank, local_rank, local_size, **extra):
  return {'OMPI_COMM_WORLD_SIZE': str(size), 'OMPI_COMM_WORLD_RANK': str(rank),
          'OMPI_COMM_WORLD_LOCAL_RANK': str(local_rank),
          'OMPI_COMM_WORLD_LOCAL_SIZE': str(local_size), **extra}


def test_open_mpi_4_leaves_the_coordinator_to_jax(eight_gpus):
  env = _openmpi(16, 9, 1, 8, OMPI_MCA_orte_hnp_uri='1531576320.0;tcp://10.96.0.1:34911')
  launch = distributed.detect_launch(env=env)
  assert launch.kind == 'openmpi'
  assert launch.initialize_kwargs == {'coordinator_address': None, 'num_processes': 16,
                                      'process_id': 9, 'local_device_ids': [1]}


def test_open_mpi_5_on_one_node_derives_the_coordinator(eight_gpus):
  """PRRTE sets no OMPI_MCA_orte_hnp_uri, so JAX's OmpiCluster is not detected at all."""
  env = _openmpi(8, 3, 3, 8, PMIX_RANK='3', PMIX_NAMESPACE='prterun-node1-77@1')
  kwargs = distributed.detect_launch(env=env).initialize_kwargs
  host, port = kwargs['coordinator_address'].split(':')
  assert host == '127.0.0.1' and 65535 - 4096 < int(port) <= 65535
  assert (kwargs['num_processes'], kwargs['process_id'], kwargs['local_device_ids']) == (
      8, 3, [3])
  other = distributed.detect_launch(env=dict(env, OMPI_COMM_WORLD_RANK='0')).initialize_kwargs
  assert other['coordinator_address'] == kwargs['coordinator_address']


def test_open_mpi_5_over_nodes_needs_the_coordinator_flag(eight_gpus):
  env = _openmpi(2, 1, 0, 1, PMIX_RANK='1', PMIX_NAMESPACE='prterun-node1-77@1')
  with pytest.raises(errors.UserError, match='--coordinator_address'):
    distributed.detect_launch(env=env)
  kwargs = distributed.detect_launch('node1:12345', env=env).initialize_kwargs
  assert kwargs == {'coordinator_address': 'node1:12345', 'num_processes': 2,
                    'process_id': 1, 'local_device_ids': list(range(8))}
  # The rank from PMIx where OMPI_COMM_WORLD_RANK is missing.
  del env['OMPI_COMM_WORLD_RANK']
  assert distributed.detect_launch('node1:12345', env=env).initialize_kwargs['process_id'] == 1


def test_cpu_cluster_leaves_devices_to_jax(monkeypatch):
  monkeypatch.setattr(distributed, '_gpu_device_files', lambda: [])
  launch = distributed.detect_launch(env=_slurm(4, 2, 0, '1(x4)'))
  assert launch.initialize_kwargs['local_device_ids'] is None


@pytest.fixture
def tpu_vm(monkeypatch):
  """A Cloud TPU VM; the metadata server lists `endpoints` (None: does not answer)."""
  endpoints = {'value': 'w-0:0:10.0.0.2,w-1:1:10.0.0.3,w-2:2:10.0.0.4,w-3:3:10.0.0.5'}

  def metadata(key):
    assert key == 'worker-network-endpoints'
    if endpoints['value'] is None:
      raise RuntimeError('no answer')
    return endpoints['value']
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: True)
  monkeypatch.setattr(distributed, '_tpu_metadata', metadata)
  monkeypatch.setattr(distributed, '_gpu_device_files', lambda: [])
  return endpoints


def test_tpu_pod_slice_lets_jax_find_the_hosts(tpu_vm):
  """A plain TPU VM pod (no TPU_WORKER_HOSTNAMES, which only GKE sets): initialize()."""
  launch = distributed.detect_launch(env={'MEGASCALE_NUM_SLICES': '1'})
  assert (launch.kind, launch.initialize_kwargs) == ('tpu', {})
  assert '4 hosts' in launch.description


def test_single_host_tpu_and_gke(tpu_vm):
  tpu_vm['value'] = 'w-0:0:10.0.0.2'
  assert distributed.detect_launch(env={'MEGASCALE_NUM_SLICES': '1'}).kind == 'single'
  assert distributed.detect_launch(env={'TPU_WORKER_HOSTNAMES': 'a,b'}).kind == 'tpu'
  assert distributed.detect_launch(env={'TPU_SKIP_MDS_QUERY': '1'}).kind == 'single'
  tpu_vm['value'] = None  # A metadata server that does not answer: one process, a warning.
  assert distributed.detect_launch(env={'MEGASCALE_NUM_SLICES': '1'}).kind == 'single'


def test_not_a_tpu_vm_never_asks_the_metadata_server(monkeypatch):
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: False)
  monkeypatch.setattr(distributed, '_tpu_metadata', lambda key: pytest.fail('asked'))
  assert distributed.detect_launch(env={}).kind == 'single'


def test_maybe_initialize_distributed_passes_the_launch_to_jax(eight_gpus, monkeypatch):
  """The real os.environ, a fake jax.distributed.initialize that records its arguments."""
  for name in list(os.environ):
    if name.startswith(('SLURM_', 'OMPI_', 'PMIX_', 'TPU_', 'MEGASCALE_', 'JAX_COORD',
                        'CUDA_VISIBLE')):
      monkeypatch.delenv(name)
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(distributed.jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(distributed.jax, 'process_index', lambda: 0)
  assert distributed.maybe_initialize_distributed().kind == 'single' and not calls
  for name, value in _slurm(2, 0, 0, '1(x2)').items():
    monkeypatch.setenv(name, value)
  assert distributed.maybe_initialize_distributed().kind == 'slurm'
  assert calls == [{'coordinator_address': None, 'num_processes': 2, 'process_id': 0,
                    'local_device_ids': list(range(8))}]
  monkeypatch.delenv('SLURM_PROCID')
  with pytest.raises(errors.UserError, match='srun'):
    distributed.maybe_initialize_distributed()


def test_prepare_once_in_one_process_prepares_only_what_is_missing():
  done = []
  distributed.prepare_once(lambda: done.append(1), lambda: bool(done), 'prepare it')
  distributed.prepare_once(lambda: done.append(2), lambda: bool(done), 'prepare it')
  assert done == [1]


@pytest.mark.parametrize('me, hosts, ready, prepares', [
    (1, (7, 7), (True, True), False),  # One disk: process 1 reads what process 0 made.
    (1, (7, 8), (True, False), True),  # Its own disk: the first process of host 8.
    (2, (7, 8, 8), (True, False, False), False),  # Not the first of its host: waits.
])
def test_prepare_once_across_hosts(monkeypatch, me, hosts, ready, prepares):
  """Process 0 prepares; a host that does not see it prepares with its first process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(distributed.jax, 'process_count', lambda: len(hosts))
  monkeypatch.setattr(distributed.jax, 'process_index', lambda: me)
  monkeypatch.setattr(distributed, 'sync_processes', lambda name: calls.append(('sync', name)))
  monkeypatch.setattr(distributed, '_all_true', lambda flag: True)
  monkeypatch.setattr(distributed, '_host_key', lambda: np.int32(hosts[me]))

  def allgather(tree):
    return np.asarray(hosts, np.int32), np.asarray(ready, np.int32)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  distributed.prepare_once(lambda: calls.append('prepare'), lambda: ready[me], 'prepare it')
  assert calls[0] == ('sync', 'before: prepare it')
  assert ('prepare' in calls) == prepares


def test_a_failure_on_process_0_stops_the_others(monkeypatch):
  monkeypatch.setattr(distributed.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(distributed.jax, 'process_index', lambda: 1)
  monkeypatch.setattr(distributed, 'sync_processes', lambda name: None)
  monkeypatch.setattr(distributed, '_all_true', lambda flag: False)  # Process 0 failed.
  with pytest.raises(errors.UserError, match='Process 0 could not write metrics.json'):
    distributed.on_first_process(lambda: pytest.fail('only process 0 writes'),
                              'write metrics.json')
