"""What clusters and clouds do to jobs: SIGTERM, a second copy, a killed copy, a full disk.

Each fault hits `python main.py ...` in a subprocess, and each test checks what
survives (the checkpoint of the agreed step, no half-written file, the lock) and
that running the same command again ends with the metrics of an uninterrupted
run. Runs are tiny (ResNet-18 at 1/8 width, 32 px, the small synthetic set).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from simclr_jax import errors
from simclr_jax.train import preemption
from simclr_jax.train import workdir_lock
from tests import conftest
from tests.conftest import REPO

MAIN = os.path.join(REPO, 'main.py')
FAULT_MAIN = os.path.join(REPO, 'tests', 'fault_main.py')
TINY = ('--config.data.name=synthetic_mri/small', '--config.data.image_size=32',
        '--config.data.channels=1', '--config.model.name=resnet18',
        '--config.model.width=0.125', '--config.model.encoder_output=avgpool',
        '--config.train.batch_size=16', '--config.eval.batch_size=32',
        '--config.train.num_summary_images=0')
# A baseline of 3 epochs (12 steps), a checkpoint every 2 steps.
BASELINE = ('--config=' + os.path.join(REPO, 'configs', 'baseline.py'), *TINY,
            '--config.train.num_epochs=3', '--config.train.checkpoint_every_steps=2',
            '--config.train.log_every_steps=2', '--config.labels.fraction=0.5')
# A pretraining of 2 epochs (18 steps), a checkpoint every 3 steps.
PRETRAIN = ('--config=' + os.path.join(REPO, 'configs', 'pretrain.py'), *TINY,
            '--config.pretrain.projection_dims=(32,16)', '--config.eval.knn_k=(1,5)',
            '--config.train.num_epochs=2', '--config.train.checkpoint_every_steps=3',
            '--config.train.log_every_steps=3')
# The runlocal sweep cut to the reference protocol's single split, one task, 100 % of
# the labels, short runs: four trained runs (pretraining, baseline, fine-tuning, linear
# probe), enough to stop in one run and resume it after another has finished.
SWEEP = ('--config=' + os.path.join(REPO, 'configs', 'sweep.py') + ':preset=runlocal',
         '--config.data.name=synthetic_mri/small', "--config.sweep.protocols=('reference',)",
         "--config.sweep.tasks=('four_class',)", '--config.sweep.fractions=(1.0,)',
         '--config.sweep.pretrain_num_epochs=1',
         '--config.sweep.max_steps_per_run=6', '--config.sweep.evals_per_run=2',
         '--config.sweep.bootstrap_samples=100', '--config.train.checkpoint_every_steps=2')
STOP_WITHIN_S = 60
TIMEOUT_S = 600
METRICS = ('accuracy', 'balanced_accuracy', 'macro_f1', 'chosen_step')


def _env():
  """No cluster's variables (a test under SLURM stays one process), one CPU device."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'OMPI_', 'PMIX_', 'TPU_', 'MEGASCALE_', 'JAX_COORD'))}
  env['JAX_PLATFORMS'] = 'cpu'
  env.pop('XLA_FLAGS', None)
  return env


def _command(flags, workdir, data_dir, *extra, main=MAIN):
  return [sys.executable, main, *flags, f'--workdir={workdir}',
          f'--config.data.dir={data_dir}', *extra]


def _run(flags, workdir, data_dir, *extra, main=MAIN, env=None):
  return subprocess.run(_command(flags, workdir, data_dir, *extra, main=main), cwd=REPO,
                        capture_output=True, text=True, timeout=TIMEOUT_S,
                        env=env or _env())


def _start(flags, workdir, data_dir, log, *extra):
  with open(log, 'w') as f:
    return subprocess.Popen(_command(flags, workdir, data_dir, *extra), cwd=REPO,
                            env=_env(), stdout=f, stderr=subprocess.STDOUT, text=True)


def _read(path):
  with open(path) as f:
    return f.read()


def _checkpoint_steps(workdir, which='latest'):
  folder = os.path.join(workdir, 'checkpoints', which)
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(n) for n in names if n.isdigit())


def _wait_for(condition, process, what, timeout=TIMEOUT_S):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    assert process.poll() is None, f'the run ended before {what}'
    time.sleep(0.1)
  raise AssertionError(f'timed out waiting for {what}')


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.json')) as f:
    return json.load(f)


def _assert_same_metrics(resumed, expected, keys=METRICS):
  for key in keys:
    assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key
  if 'confusion_matrix' in expected:
    assert resumed['confusion_matrix'] == expected['confusion_matrix']


def _assert_same_final_state(workdir, reference):
  """The last checkpoints hold the same parameters (the chosen one may predate a stop)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  states = []
  for folder in (workdir, reference):
    step = _checkpoint_steps(folder)[-1]
    path = os.path.join(folder, 'checkpoints', 'latest', str(step), 'default')
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path)
    tree = getattr(tree, 'item_metadata', tree)
    tree = getattr(tree, 'tree', tree)
    # As host arrays: a checkpoint of 2 processes holds shardings this process lacks.
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    states.append(checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args)))
  for a, b in zip(jax.tree.leaves(states[0]['params']), jax.tree.leaves(states[1]['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _assert_nothing_half_written(workdir):
  """No temporary JSON, no orbax temporary directory, no lock left behind."""
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      assert not name.endswith('.tmp') and 'orbax-checkpoint-tmp' not in name, (
          os.path.join(root, name))
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def _stopped_line(output):
  """The run's one `stopped:` line, which says how to resume."""
  lines = [line for line in output.splitlines() if line.startswith('stopped: ')]
  assert len(lines) == 1, output[-3000:]
  assert 'run the same command again' in lines[0], lines[0]
  assert f'(exit status {preemption.EXIT_STATUS})' in lines[0], lines[0]
  return lines[0]


def _stopped_step(output):
  """The step whose checkpoint the `stopped:` line names."""
  line = _stopped_line(output)
  match = re.search(r'saved the checkpoint of step (\d+)', line)
  assert match, line
  return int(match.group(1))


@pytest.fixture(scope='module')
def uninterrupted_baseline(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  result = _run(BASELINE, workdir, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_the_next_step_stops_and_resumes_exactly(uninterrupted_baseline,
                                                               data_dir, tmp_path):
  """One process: the signal's step is saved, exit 75, and the same command finishes it."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'run.log')
  process = _start(BASELINE, workdir, data_dir, log)
  try:
    _wait_for(lambda: _checkpoint_steps(workdir), process, 'the first checkpoint')
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    process.wait(timeout=STOP_WITHIN_S)
    assert time.time() - sent < STOP_WITHIN_S
  finally:
    process.kill()
  output = _read(log)
  assert process.returncode == preemption.EXIT_STATUS, output[-3000:]
  step = _stopped_step(output)
  assert _checkpoint_steps(workdir)[-1] == step
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  _assert_nothing_half_written(workdir)
  resumed = _run(BASELINE, workdir, data_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from step {step}' in resumed.stderr
  _assert_same_metrics(_metrics(workdir), _metrics(uninterrupted_baseline))
  _assert_same_final_state(workdir, uninterrupted_baseline)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start_two(workdir, data_dir, logs):
  port = _free_port()
  return [_start(PRETRAIN, workdir, data_dir, logs[i],
                 f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                 f'--process_id={i}') for i in range(2)]


def test_two_processes_agree_on_the_step_stop_and_resume_exactly(data_dir, tmp_path):
  """SIGTERM to process 1 alone: its preemption notice stops both at one step, saved."""
  reference, workdir = str(tmp_path / 'reference'), str(tmp_path / 'run')
  logs = [str(tmp_path / f'{name}{i}.log') for name in ('ref', 'run', 'resume')
          for i in range(2)]
  processes = _start_two(reference, data_dir, logs[:2])
  conftest.wait_all(processes, TIMEOUT_S)
  assert [p.returncode for p in processes] == [0, 0], _read(logs[0])[-3000:]

  processes = _start_two(workdir, data_dir, logs[2:4])
  try:
    _wait_for(lambda: _checkpoint_steps(workdir), processes[0], 'the first checkpoint')
    processes[1].send_signal(signal.SIGTERM)
    sent = time.time()
  finally:
    conftest.wait_all(processes, STOP_WITHIN_S)
  assert time.time() - sent < STOP_WITHIN_S
  outputs = [_read(log) for log in logs[2:4]]
  assert [p.returncode for p in processes] == [preemption.EXIT_STATUS] * 2, outputs[0][-3000:]
  steps = [_stopped_step(output) for output in outputs]
  assert steps[0] == steps[1] == _checkpoint_steps(workdir)[-1], steps
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  _assert_nothing_half_written(workdir)

  processes = _start_two(workdir, data_dir, logs[4:])
  conftest.wait_all(processes, TIMEOUT_S)
  assert [p.returncode for p in processes] == [0, 0], _read(logs[4])[-3000:]
  expected, resumed = _metrics(reference), _metrics(workdir)
  assert resumed['total_steps'] > steps[0]
  knn = [key for key in expected if key.startswith('knn')]
  assert knn
  _assert_same_metrics(resumed, expected, knn)
  _assert_same_final_state(workdir, reference)


def _run_workdirs(sweep_workdir):
  """Workdirs of the sweep's trained runs (those with checkpoints)."""
  found = []
  for root, dirs, _ in os.walk(sweep_workdir):
    if 'checkpoints' in dirs:
      found.append(root)
  return found


def test_sigterm_mid_sweep_stops_in_a_run_and_resumes_to_the_same_results(data_dir,
                                                                           tmp_path):
  reference, workdir = str(tmp_path / 'reference'), str(tmp_path / 'sweep')
  result = _run(SWEEP, reference, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  log = str(tmp_path / 'sweep.log')
  process = _start(SWEEP, workdir, data_dir, log)

  def second_run_training():  # One run finished, the next one checkpointed.
    runs = _run_workdirs(workdir)
    finished = [r for r in runs if os.path.exists(os.path.join(r, 'metrics.json'))]
    return finished and any(_checkpoint_steps(r) for r in runs if r not in finished)
  try:
    _wait_for(second_run_training, process, 'the second trained run')
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=STOP_WITHIN_S)
  finally:
    process.kill()
  output = _read(log)
  assert process.returncode == preemption.EXIT_STATUS, output[-3000:]
  # Within the run being trained, or (the signal came as it ended) before the next one.
  assert 'in ' + workdir in _stopped_line(output)
  assert not os.path.exists(os.path.join(workdir, 'results.csv')) or (
      len(conftest.metric_rows(workdir)) < len(conftest.metric_rows(reference)))
  _assert_nothing_half_written(workdir)
  result = _run(SWEEP, workdir, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert conftest.metric_rows(workdir) == conftest.metric_rows(reference)


SECOND_SIGNAL = """
import os, signal, sys, time
from simclr_jax.train import preemption
preemption.install_signal_handlers()
os.kill(os.getpid(), signal.SIG{first})
time.sleep(0.1)  # The Python-level handler runs here.
assert preemption.signal_name() == 'SIG{first}', preemption.signal_name()
print('asked', flush=True)
os.kill(os.getpid(), signal.SIG{second})
time.sleep(10)
sys.exit(0)
"""


@pytest.mark.parametrize('first,second', [('TERM', 'TERM'), ('INT', 'INT'), ('TERM', 'INT')])
def test_the_first_signal_asks_and_a_second_stops_at_once(first, second):
  """The first signal is a request (the loop saves and stops); the second kills at once."""
  start = time.time()
  result = subprocess.run([sys.executable, '-c', SECOND_SIGNAL.format(first=first,
                                                                      second=second)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
  assert result.stdout == 'asked\n', result.stderr[-3000:]
  assert result.returncode == -getattr(signal, f'SIG{second}'), result.stderr[-3000:]
  assert f'SIG{first} received' in result.stderr
  assert time.time() - start < 9


# ----------------------------------------------------------------------------- the lock


def test_a_busy_workdir_is_refused_and_a_killed_runs_lock_is_taken_over(
    uninterrupted_baseline, data_dir, tmp_path):
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'run.log')
  process = _start(BASELINE, workdir, data_dir, log)
  try:
    _wait_for(lambda: _checkpoint_steps(workdir), process, 'the first checkpoint')
    process.send_signal(signal.SIGSTOP)  # Busy however long the second takes to start.
    second = _run(BASELINE, workdir, data_dir)
    assert process.poll() is None
  finally:
    process.kill()  # SIGKILL: no handler runs, the lock file stays.
    process.wait()
  assert second.returncode == errors.EXIT_STATUS, second.stderr[-3000:]
  lines = [line for line in second.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and second.stderr.endswith(lines[0] + '\n'), second.stderr[-3000:]
  assert 'Traceback' not in second.stderr
  for words in ('is in use by another run', f'pid {process.pid}', socket.gethostname(),
                'started '):
    assert words in lines[0], (words, lines[0])

  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # Stale now.
  resumed = _run(BASELINE, workdir, data_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Took over the lock of a run that is no longer running' in resumed.stderr
  assert f'pid {process.pid}' in resumed.stderr
  _assert_same_metrics(_metrics(workdir), _metrics(uninterrupted_baseline))
  _assert_same_final_state(workdir, uninterrupted_baseline)
  _assert_nothing_half_written(workdir)


def test_lock_without_flock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path,
                                                                           monkeypatch):
  """The file-only lock of URL workdirs (and filesystems without flock)."""
  monkeypatch.setattr(workdir_lock.WorkdirLock, '_acquire_flock', lambda self: False)
  path = workdir_lock.lock_path(tmp_path)
  holder = {'host': socket.gethostname(), 'pid': os.getppid(), 'started': 'earlier',
            'renewed': time.time()}
  path.write_text(json.dumps(holder))
  with pytest.raises(errors.UserError, match=f'in use by another run .*pid {os.getppid()}'):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  path.write_text(json.dumps(dict(holder, pid=int(dead.stdout))))
  lock = workdir_lock.WorkdirLock(tmp_path)
  lock.acquire()
  assert json.loads(path.read_text())['pid'] == os.getpid()
  lock.release()
  assert not path.exists()
  # Another host's lock: stale once not renewed for STALE_AFTER_S.
  path.write_text(json.dumps(dict(holder, host='elsewhere')))
  with pytest.raises(errors.UserError, match='host elsewhere'):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  path.write_text(json.dumps(dict(holder, host='elsewhere',
                                  renewed=time.time() - workdir_lock.STALE_AFTER_S - 1)))
  with workdir_lock.hold(tmp_path):
    assert json.loads(path.read_text())['host'] == socket.gethostname()


# ----------------------------------------------------------------------------- full disk


@pytest.mark.parametrize('failing,errno_name,words', [
    # The 8th step's checkpoint (orbax's temporary directory, then renamed to 8).
    (os.path.join('checkpoints', 'latest', '8.orbax-checkpoint-tmp'), 'ENOSPC',
     ['No space left on the disk', 'run the same command again']),
    # The results, once every checkpoint is saved.
    ('metrics.json', 'EROFS', ['is read-only', 'run the same command again']),
])
def test_a_failed_write_stops_in_one_line_and_keeps_what_was_saved(
    uninterrupted_baseline, data_dir, tmp_path, failing, errno_name, words):
  workdir = str(tmp_path / 'run')
  env = dict(_env(), SIMCLR_JAX_FAIL_WRITES=failing, SIMCLR_JAX_FAIL_ERRNO=errno_name)
  result = _run(BASELINE, workdir, data_dir, main=FAULT_MAIN, env=env)
  assert result.returncode == errors.EXIT_STATUS, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and result.stderr.endswith(lines[0] + '\n'), result.stderr[-3000:]
  for word in words + [f'--workdir={workdir}']:
    assert word in lines[0], (word, lines[0])
  steps = _checkpoint_steps(workdir)
  assert steps and (steps[-1] < 8 if 'checkpoints' in failing else steps[-1] == 12), steps
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  with open(os.path.join(workdir, 'config.json')) as f:
    json.load(f)  # Whole.
  resumed = _run(BASELINE, workdir, data_dir)  # The disk has room again.
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from step {steps[-1]}' in resumed.stderr
  _assert_same_metrics(_metrics(workdir), _metrics(uninterrupted_baseline))
  _assert_same_final_state(workdir, uninterrupted_baseline)
  _assert_nothing_half_written(workdir)
