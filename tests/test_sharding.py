"""Data parallelism and multi-process start-up.

8 devices and 2 processes compute the same step as 1 device; a whole sweep across
2 processes writes the results of one process; the launch detection (SLURM, Open
MPI, Cloud TPU, flags) in fake environments.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import conftest
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


# The runlocal sweep cut to the reference protocol's single split, one task and 100 % of
# the labels, with short runs: the sweep's code paths across processes (floor,
# pretraining, every arm, reports, Grad-CAM grid) in about a minute.
SWEEP_FLAGS = ('--config=configs/sweep.py:preset=runlocal',
               '--config.data.name=synthetic_mri/small', "--config.sweep.protocols=('reference',)",
               "--config.sweep.tasks=('four_class',)", '--config.sweep.fractions=(1.0,)',
               '--config.sweep.pretrain_num_epochs=1',
               '--config.sweep.max_steps_per_run=10', '--config.sweep.evals_per_run=2')
SWEEP_TIMEOUT_S = 1500


def _start_sweep(workdir, data_dir, env, log_path, *process_flags):
  with open(log_path, 'w') as log:
    return subprocess.Popen(
        [sys.executable, 'main.py', *SWEEP_FLAGS, f'--workdir={workdir}',
         f'--config.data.dir={data_dir}', *process_flags],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


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
  conftest.wait_all(processes, SWEEP_TIMEOUT_S)
  texts = []
  for log in logs:
    with open(log) as f:
      texts.append(f.read())
  for process, text in zip(processes, texts):
    assert process.returncode == 0, text[-4000:]
  assert 'Downloading and preparing' in texts[0]
  assert 'Downloading and preparing' not in texts[1]  # Process 1 waited, then read it.
  rows = conftest.metric_rows(two)
  assert rows and rows == conftest.metric_rows(one)
  assert {r['arm'] for r in rows} == {'floor', 'baseline', 'finetune', 'probe'}
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
