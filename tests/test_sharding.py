"""Data parallelism and multi-process start-up.

8 devices and 2 processes compute the same step as 1 device; a whole sweep across
2 processes writes the results of one process; the launch detection (SLURM, Open
MPI, Cloud TPU, flags) in fake environments.
"""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, 'tests', 'distributed_step.py')


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _run(args, devices):
  out = subprocess.run([sys.executable, SCRIPT, *map(str, args)], env=_env(devices),
                       cwd=REPO, capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_same(a, b, atol=1e-6):
  assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)
  assert a['grad_norm'] == pytest.approx(b['grad_norm'], rel=1e-5)
  assert a['checksum'] == pytest.approx(b['checksum'], rel=1e-5)
  np.testing.assert_allclose(a['first'], b['first'], rtol=1e-4, atol=atol)


@pytest.mark.parametrize('mode', ['pretrain', 'baseline'])
def test_eight_devices_match_one_device(mode):
  """Global BatchNorm and NT-Xent negatives: sharding does not change the step."""
  one = _run([mode, 1], devices=8)
  eight = _run([mode, 8], devices=8)
  assert (one['devices'], eight['devices']) == (1, 8)
  # Adam's first update is lr * g / (|g| + eps): where a gradient is zero up to
  # float noise its sign flips between reduction orders, so parameters agree to lr.
  _assert_same(one, eight, atol=1e-6 if mode == 'pretrain' else 2.5e-4)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _clean_env(devices=None):
  """The test's environment without any cluster's variables: one CPU device by default."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'OMPI_', 'PMIX_', 'TPU_', 'MEGASCALE_', 'JAX_COORD'))}
  env['JAX_PLATFORMS'] = 'cpu'
  env.pop('XLA_FLAGS', None)
  if devices:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


# The runlocal sweep cut to one protocol, one task, 2 folds and one fraction, with
# short runs: every code path of the sweep (floor, pretraining, both arms,
# out-of-fold pooling, reports, Grad-CAM grid) in a few minutes.
SWEEP_FLAGS = ('--config=configs/sweep.py:preset=runlocal',
               '--config.dataset=synthetic_mri/small', "--config.protocols=('honest',)",
               "--config.tasks=('four_class',)", '--config.fractions=(1.0,)',
               '--config.num_folds=2', '--config.pretrain_num_epochs=1',
               '--config.max_steps_per_run=10', '--config.evals_per_run=2')
SWEEP_TIMEOUT_S = 1500


def _start_sweep(workdir, data_dir, env, log_path, *process_flags):
  with open(log_path, 'w') as log:
    return subprocess.Popen(
        [sys.executable, 'main.py', *SWEEP_FLAGS, f'--workdir={workdir}',
         f'--config.data_dir={data_dir}', *process_flags],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


def _metric_rows(workdir):
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  return [{k: v for k, v in row.items() if 'wall' not in k and 'seconds' not in k}
          for row in rows]


def test_a_sweep_across_two_processes_writes_the_results_of_one(tmp_path):
  """The whole (cut-down) runlocal sweep as 2 processes of one CPU device each.

  Both exit 0 in time, only process 0 builds the data set, and results.csv holds
  the numbers of one process over 2 devices (the same mesh), wall times aside.
  """
  port = _free_port()
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  logs = [str(tmp_path / name) for name in ('two0.log', 'two1.log', 'one.log')]
  processes = [
      _start_sweep(two, str(tmp_path / 'tfds_two'), _clean_env(), logs[i],
                   f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                   f'--process_id={i}')
      for i in range(2)]
  processes.append(_start_sweep(one, str(tmp_path / 'tfds_one'), _clean_env(devices=2),
                                logs[2]))
  try:
    for process in processes:
      process.wait(timeout=SWEEP_TIMEOUT_S)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  texts = []
  for log in logs:
    with open(log) as f:
      texts.append(f.read())
  for process, text in zip(processes, texts):
    assert process.returncode == 0, text[-4000:]
  assert 'Downloading and preparing' in texts[0]
  assert 'Downloading and preparing' not in texts[1]  # Process 1 waited, then read it.
  rows = _metric_rows(two)
  assert rows and rows == _metric_rows(one)
  assert {r['arm'] for r in rows} == {'floor', 'baseline', 'finetune'}
  for name in ('results.md', 'sweep.json', 'gradcam_grid.png', 'confusion_matrices.png',
               'label_fraction_curve.png'):
    assert os.path.exists(os.path.join(two, name)), name


def test_two_processes_agree_with_one():
  """Two local CPU processes, each feeding half of the global batch."""
  port = _free_port()
  processes = [
      subprocess.Popen([sys.executable, SCRIPT, 'pretrain', '2', str(i), '2', str(port)],
                       env=_env(1), cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  results = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  single = _run(['pretrain', 1], devices=1)
  _assert_same(results[0], results[1])
  _assert_same(results[0], single)


# ----------------------------------------------------------------------------- start-up


from simclr_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

_SLURM_TASK = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'gpu[001-002]',
               'SLURM_STEP_NUM_NODES': '2'}


def _slurm(ntasks, procid, localid, tasks_per_node, nodeid=0, **extra):
  return dict(_SLURM_TASK, SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(procid),
              SLURM_LOCALID=str(localid), SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
              SLURM_NODEID=str(nodeid), **extra)


@pytest.fixture
def eight_gpus(monkeypatch):
  """A node whose /dev shows 8 GPUs (CUDA_VISIBLE_DEVICES decides where it is set)."""
  monkeypatch.setattr(sharding, '_gpu_device_files',
                      lambda: [f'/dev/nvidia{i}' for i in range(8)])
  monkeypatch.setattr(sharding, '_on_cloud_tpu_vm', lambda: False)


def test_plain_process_is_single(eight_gpus):
  launch = sharding.detect_launch(env={})
  assert (launch.kind, launch.initialize_kwargs) == ('single', None)


def test_flags_give_every_argument_and_turn_cluster_detection_off(eight_gpus):
  launch = sharding.detect_launch('10.0.0.1:1234', 2, 1, env={})
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
    sharding.detect_launch(*flags, env={})
  assert '\n' not in str(error.value)


def test_num_processes_one_is_single_whatever_the_environment(eight_gpus):
  env = {'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '8'}  # An salloc shell: would be an error.
  assert sharding.detect_launch(num_processes=1, env=env).kind == 'single'


def test_srun_with_one_task_is_one_process_with_every_gpu(eight_gpus):
  """JAX alone would pin the task to GPU 0 (SLURM_LOCALID)."""
  launch = sharding.detect_launch(env=_slurm(1, 0, 0, '1'))
  assert (launch.kind, launch.initialize_kwargs) == ('single', None)


def test_slurm_one_task_per_gpu_uses_the_gpu_of_its_local_rank(eight_gpus):
  launch = sharding.detect_launch(env=_slurm(16, 11, 3, '8(x2)', nodeid=1))
  assert launch.kind == 'slurm'
  kwargs = launch.initialize_kwargs
  # Coordinator left to JAX's SlurmCluster (first node, port from the job id).
  assert kwargs == {'coordinator_address': None, 'num_processes': 16, 'process_id': 11,
                    'local_device_ids': [3]}


def test_slurm_one_task_per_node_uses_all_its_gpus(eight_gpus):
  launch = sharding.detect_launch(env=_slurm(2, 1, 0, '1(x2)', nodeid=1))
  assert launch.initialize_kwargs['local_device_ids'] == list(range(8))
  assert launch.initialize_kwargs['num_processes'] == 2


def test_slurm_gpus_per_task_keeps_the_tasks_own_gpus(eight_gpus):
  """--gpus-per-task=1: each task sees one GPU, device 0 (JAX would ask for its local rank)."""
  env = _slurm(16, 5, 5, '8(x2)', CUDA_VISIBLE_DEVICES='5', SLURM_GPUS_PER_TASK='1')
  assert sharding.detect_launch(env=env).initialize_kwargs['local_device_ids'] == [0]
  env = _slurm(8, 1, 1, '4(x2)', CUDA_VISIBLE_DEVICES='2,3', SLURM_GPUS_PER_TASK='2')
  assert sharding.detect_launch(env=env).initialize_kwargs['local_device_ids'] == [0, 1]


def test_slurm_two_gpus_per_task_seen_by_all(eight_gpus):
  launch = sharding.detect_launch(env=_slurm(8, 3, 3, '4(x2)'))
  assert launch.initialize_kwargs['local_device_ids'] == [6, 7]


def test_slurm_uneven_gpus_are_a_user_error(eight_gpus):
  with pytest.raises(errors.UserError, match='cannot be shared evenly'):
    sharding.detect_launch(env=_slurm(6, 0, 0, '3(x2)'))


def test_salloc_without_srun_is_a_user_error(eight_gpus):
  """JAX would raise 'coordinator_address should be defined'."""
  env = {'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '8', 'SLURM_NODELIST': 'gpu001'}
  with pytest.raises(errors.UserError, match='srun') as error:
    sharding.detect_launch(env=env)
  assert 'SLURM_PROCID' in str(error.value) and '--num_processes=1' in str(error.value)
  with pytest.raises(errors.UserError, match='srun'):
    sharding.detect_launch(env={'SLURM_JOB_ID': '4242'})
  # One task in the allocation: nothing to coordinate.
  assert sharding.detect_launch(env={'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '1'}).kind == 'single'


def test_flags_override_slurm_but_gpus_follow_the_task(eight_gpus):
  launch = sharding.detect_launch('node7:9999', None, None, env=_slurm(16, 9, 1, '8(x2)'))
  assert launch.initialize_kwargs == {'coordinator_address': 'node7:9999',
                                      'num_processes': 16, 'process_id': 9,
                                      'local_device_ids': [1]}


def _openmpi(size, rank, local_rank, local_size, **extra):
  return {'OMPI_COMM_WORLD_SIZE': str(size), 'OMPI_COMM_WORLD_RANK': str(rank),
          'OMPI_COMM_WORLD_LOCAL_RANK': str(local_rank),
          'OMPI_COMM_WORLD_LOCAL_SIZE': str(local_size), **extra}


def test_open_mpi_4_leaves_the_coordinator_to_jax(eight_gpus):
  env = _openmpi(16, 9, 1, 8, OMPI_MCA_orte_hnp_uri='1531576320.0;tcp://10.96.0.1:34911')
  launch = sharding.detect_launch(env=env)
  assert launch.kind == 'openmpi'
  assert launch.initialize_kwargs == {'coordinator_address': None, 'num_processes': 16,
                                      'process_id': 9, 'local_device_ids': [1]}


def test_open_mpi_5_on_one_node_derives_the_coordinator(eight_gpus):
  """PRRTE sets no OMPI_MCA_orte_hnp_uri, so JAX's OmpiCluster is not detected at all."""
  env = _openmpi(8, 3, 3, 8, PMIX_RANK='3', PMIX_NAMESPACE='prterun-node1-77@1')
  kwargs = sharding.detect_launch(env=env).initialize_kwargs
  host, port = kwargs['coordinator_address'].split(':')
  assert host == '127.0.0.1' and 65535 - 4096 < int(port) <= 65535
  assert (kwargs['num_processes'], kwargs['process_id'], kwargs['local_device_ids']) == (
      8, 3, [3])
  other = sharding.detect_launch(env=dict(env, OMPI_COMM_WORLD_RANK='0')).initialize_kwargs
  assert other['coordinator_address'] == kwargs['coordinator_address']


def test_open_mpi_5_over_nodes_needs_the_coordinator_flag(eight_gpus):
  env = _openmpi(2, 1, 0, 1, PMIX_RANK='1', PMIX_NAMESPACE='prterun-node1-77@1')
  with pytest.raises(errors.UserError, match='--coordinator_address'):
    sharding.detect_launch(env=env)
  kwargs = sharding.detect_launch('node1:12345', env=env).initialize_kwargs
  assert kwargs == {'coordinator_address': 'node1:12345', 'num_processes': 2,
                    'process_id': 1, 'local_device_ids': list(range(8))}
  # The rank from PMIx where OMPI_COMM_WORLD_RANK is missing.
  del env['OMPI_COMM_WORLD_RANK']
  assert sharding.detect_launch('node1:12345', env=env).initialize_kwargs['process_id'] == 1


def test_cpu_cluster_leaves_devices_to_jax(monkeypatch):
  monkeypatch.setattr(sharding, '_gpu_device_files', lambda: [])
  launch = sharding.detect_launch(env=_slurm(4, 2, 0, '1(x4)'))
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
  monkeypatch.setattr(sharding, '_on_cloud_tpu_vm', lambda: True)
  monkeypatch.setattr(sharding, '_tpu_metadata', metadata)
  monkeypatch.setattr(sharding, '_gpu_device_files', lambda: [])
  return endpoints


def test_tpu_pod_slice_lets_jax_find_the_hosts(tpu_vm):
  """A plain TPU VM pod (no TPU_WORKER_HOSTNAMES, which only GKE sets): initialize()."""
  launch = sharding.detect_launch(env={'MEGASCALE_NUM_SLICES': '1'})
  assert (launch.kind, launch.initialize_kwargs) == ('tpu', {})
  assert '4 hosts' in launch.description


def test_single_host_tpu_and_gke(tpu_vm):
  tpu_vm['value'] = 'w-0:0:10.0.0.2'
  assert sharding.detect_launch(env={'MEGASCALE_NUM_SLICES': '1'}).kind == 'single'
  assert sharding.detect_launch(env={'TPU_WORKER_HOSTNAMES': 'a,b'}).kind == 'tpu'
  assert sharding.detect_launch(env={'TPU_SKIP_MDS_QUERY': '1'}).kind == 'single'
  tpu_vm['value'] = None  # A metadata server that does not answer: one process, a warning.
  assert sharding.detect_launch(env={'MEGASCALE_NUM_SLICES': '1'}).kind == 'single'


def test_not_a_tpu_vm_never_asks_the_metadata_server(monkeypatch):
  monkeypatch.setattr(sharding, '_on_cloud_tpu_vm', lambda: False)
  monkeypatch.setattr(sharding, '_tpu_metadata', lambda key: pytest.fail('asked'))
  assert sharding.detect_launch(env={}).kind == 'single'


def test_maybe_initialize_distributed_passes_the_launch_to_jax(eight_gpus, monkeypatch):
  """The real os.environ, a fake jax.distributed.initialize that records its arguments."""
  for name in list(os.environ):
    if name.startswith(('SLURM_', 'OMPI_', 'PMIX_', 'TPU_', 'MEGASCALE_', 'JAX_COORD',
                        'CUDA_VISIBLE')):
      monkeypatch.delenv(name)
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(sharding.jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(sharding.jax, 'process_index', lambda: 0)
  assert sharding.maybe_initialize_distributed().kind == 'single' and not calls
  for name, value in _slurm(2, 0, 0, '1(x2)').items():
    monkeypatch.setenv(name, value)
  assert sharding.maybe_initialize_distributed().kind == 'slurm'
  assert calls == [{'coordinator_address': None, 'num_processes': 2, 'process_id': 0,
                    'local_device_ids': list(range(8))}]
  monkeypatch.delenv('SLURM_PROCID')
  with pytest.raises(errors.UserError, match='srun'):
    sharding.maybe_initialize_distributed()


def test_prepare_once_in_one_process_prepares_only_what_is_missing():
  done = []
  sharding.prepare_once(lambda: done.append(1), lambda: bool(done), 'prepare it')
  sharding.prepare_once(lambda: done.append(2), lambda: bool(done), 'prepare it')
  assert done == [1]


def test_collectives_are_counted_from_compiled_hlo():
  """benchmarks/collectives.py's count, on a few lines of compiled HLO."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'collectives', os.path.join(REPO, 'benchmarks', 'collectives.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  hlo = '''
  %all-reduce.1 = (f32[64]{0}, f32[64]{0}) all-reduce(%a, %b), replica_groups={{0,1}}
  %ars = f32[3,3,64,64]{3,2,1,0} all-reduce-start(%g), replica_groups={{0,1}}
  %ard = f32[3,3,64,64]{3,2,1,0} all-reduce-done(%ars)
  ROOT %ag = f32[16,8]{1,0} all-gather(%z), dimensions={0}
  %add.3 = f32[64]{0} add(%x, %y)
  '''
  assert module.count_collectives(hlo) == {
      'all-reduce': {'ops': 2, 'elements': 128 + 3 * 3 * 64 * 64},
      'all-gather': {'ops': 1, 'elements': 128}}


@pytest.mark.parametrize('me, hosts, ready, prepares', [
    (1, (7, 7), (True, True), False),  # One disk: process 1 reads what process 0 made.
    (1, (7, 8), (True, False), True),  # Its own disk: the first process of host 8.
    (2, (7, 8, 8), (True, False, False), False),  # Not the first of its host: waits.
])
def test_prepare_once_across_hosts(monkeypatch, me, hosts, ready, prepares):
  """Process 0 prepares; a host that does not see it prepares with its first process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(sharding.jax, 'process_count', lambda: len(hosts))
  monkeypatch.setattr(sharding.jax, 'process_index', lambda: me)
  monkeypatch.setattr(sharding, 'sync_processes', lambda name: calls.append(('sync', name)))
  monkeypatch.setattr(sharding, '_all_true', lambda flag: True)
  monkeypatch.setattr(sharding, '_host_key', lambda: np.int32(hosts[me]))

  def allgather(tree):
    return np.asarray(hosts, np.int32), np.asarray(ready, np.int32)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  sharding.prepare_once(lambda: calls.append('prepare'), lambda: ready[me], 'prepare it')
  assert calls[0] == ('sync', 'before: prepare it')
  assert ('prepare' in calls) == prepares


def test_a_failure_on_process_0_stops_the_others(monkeypatch):
  monkeypatch.setattr(sharding.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(sharding.jax, 'process_index', lambda: 1)
  monkeypatch.setattr(sharding, 'sync_processes', lambda name: None)
  monkeypatch.setattr(sharding, '_all_true', lambda flag: False)  # Process 0 failed.
  with pytest.raises(errors.UserError, match='Process 0 could not write metrics.json'):
    sharding.on_first_process(lambda: pytest.fail('only process 0 writes'),
                              'write metrics.json')
