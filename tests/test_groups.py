"""Runs trained together in one vmapped program: the same runs, the same workdirs.

Tolerances. A group runs each step under `jax.vmap`, so XLA fuses it otherwise
than the lone step (a convolution with per-run kernels becomes one grouped
convolution), and a group of 2 otherwise than a group of 3: the first step's loss
agrees to 1e-7, but training amplifies the rounding. AdamW (the baseline) moves an
element whose gradient is at rounding level by about +-lr whatever its sign, so
the parameters drift apart by a few learning rates (1e-4) while the function
barely changes. Measured on these runs (XLA CPU): train losses within 1.0e-4
relative, grad norms 3.4e-4, all variables within 1.5e-4 relative L2 (largest
element 1.3e-3), test probabilities within 1e-4,
validation and test metrics and chosen steps equal; the bounds are about 10x
(probabilities, losses) and 13x (variables) those. Pretraining is compared with
pretrain.sam=none: ASAM at rho 2 on a tiny network flips ReLU and max-pool ties
under any change of fusion (tests/test_steps.py), so after 6 steps its kNN
metrics differ by one or two test images from the lone run's (as a lone run
scanned 2 steps per dispatch drifts too); with SGD the folds agree within 9e-6
(losses) and 3e-6 (variables, relative L2), bounded at 1e-4 and 3e-5.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import run as run_lib
from simclr_jax.parallel import sharding
from simclr_jax.train import compile_cache
from simclr_jax.train import curves
from simclr_jax.train import groups
from simclr_jax.train import optimizers
from simclr_jax.train import preemption
from simclr_jax.train import state as state_lib
from simclr_jax.train import steps as steps_lib
from simclr_jax.train import trainer
from simclr_jax.train import workdirs
from tests.conftest import REPO
from tests.conftest import run_on_host_devices
from tests.conftest import tiny_config

# (seed, label fraction): 60, 30 and 60 labeled images, 8, 4 and 8 steps.
BASELINES = ((0, 0.5), (1, 0.25), (2, 0.5))


def _baseline_configs(data_dir):
  return [tiny_config(data_dir, 'baseline', seed=seed, label_fraction=fraction)
          for seed, fraction in BASELINES]


def _train_both(configs, root):
  """Each config trained alone (train_and_evaluate), then all as one group."""
  cache = compile_cache.CompileCache()
  alone = [str(root / f'alone{i}') for i in range(len(configs))]
  grouped = [str(root / f'group{i}') for i in range(len(configs))]
  alone_results = [trainer.train_and_evaluate(c, w, cache) for c, w in zip(configs, alone)]
  group_results = groups.train_group(configs, grouped, cache)
  return alone, alone_results, grouped, group_results


@pytest.fixture(scope='module')
def baselines(data_dir, tmp_path_factory):
  return _train_both(_baseline_configs(data_dir), tmp_path_factory.mktemp('baselines'))


def _variables(workdir):
  return jax.tree.leaves(workdirs.restore_for_inference(workdir, which='latest')[2])


def _relative_l2(a, b):
  """||a - b|| / ||a|| over every variable of two runs (params and BatchNorm statistics)."""
  diff = sum(float(np.sum((x - y)**2)) for x, y in zip(a, b))
  return np.sqrt(diff / sum(float(np.sum(x**2)) for x in a))


def _curve_differences(a, b):
  """The largest relative difference of each scalar of two runs' curves (same steps)."""
  lines_a, lines_b = curves.read_curves(a), curves.read_curves(b)
  assert [(l['step'], sorted(l)) for l in lines_a] == [(l['step'], sorted(l)) for l in lines_b]
  worst = {}
  for x, y in zip(lines_a, lines_b):
    for name in x:
      relative = abs(x[name] - y[name]) / max(abs(x[name]), 1e-12)
      worst[name] = max(worst.get(name, 0.0), relative)
  return worst


def _assert_same_metrics(expected, actual, atol=1e-6):
  assert expected['chosen_step'] == actual['chosen_step']
  assert expected.keys() == actual.keys()
  for key, value in expected.items():
    if isinstance(value, float):
      assert actual[key] == pytest.approx(value, abs=atol), key
    else:
      assert actual[key] == value, key


def test_group_matches_each_run_trained_alone(baselines):
  alone, alone_results, grouped, group_results = baselines
  assert [r['total_steps'] for r in group_results] == [8, 4, 8]  # Runs of other lengths.
  for a, g, expected, actual in zip(alone, grouped, alone_results, group_results):
    _assert_same_metrics(expected, actual)
    assert workdirs.read_metrics(g) == actual
    worst = _curve_differences(a, g)
    assert worst['train/loss'] < 1e-3 and worst['train/grad_norm'] < 5e-3, worst
    assert all(worst[k] == 0.0 for k in worst if k.startswith(('val/', 'test/'))), worst
    assert _relative_l2(_variables(a), _variables(g)) < 2e-3
    probabilities = [np.load(workdirs.predictions_path(w))['probabilities'] for w in (a, g)]
    np.testing.assert_allclose(probabilities[1], probabilities[0], atol=1e-3)


def _listing(workdir):
  """A run directory's files, checkpoint steps included, event files by their prefix."""
  names = []
  for root, folders, files in os.walk(workdir):
    folders[:] = [f for f in folders if not root.endswith(('latest', 'best'))]
    for name in files + [f for f in folders if root.endswith(('latest', 'best'))]:
      name = 'events.out.tfevents' if name.startswith('events.out.tfevents') else name
      names.append(os.path.relpath(os.path.join(root, name), workdir))
  return sorted(names)


def test_group_workdirs_hold_what_a_lone_run_writes(baselines):
  alone, _, grouped, _ = baselines
  for a, g in zip(alone, grouped):
    assert _listing(g) == _listing(a)
    assert {'config.json', 'metrics.json', 'curves.jsonl', 'test_predictions.npz',
            'events.out.tfevents'} <= set(_listing(g))
    for which in ('latest', 'best'):
      assert workdirs.latest_step(g, which) == workdirs.latest_step(a, which)
    assert workdirs.load_config(g).to_dict() == workdirs.load_config(a).to_dict()


def test_group_resumes_runs_from_their_own_checkpoints(baselines, data_dir, tmp_path,
                                                       monkeypatch):
  """Stopped at dispatch 5 (one run already finished), then one run's checkpoint lost:
  the group resumes each run from its own step (5 and 0) and ends as the uninterrupted
  group; the finished run is skipped."""
  _, _, uninterrupted, expected = baselines
  configs = _baseline_configs(data_dir)
  dirs = [str(tmp_path / f'run{i}') for i in range(len(configs))]
  with monkeypatch.context() as patch:
    # The stop lands on a periodic checkpoint (step 5): the same summaries as uninterrupted.
    patch.setattr(preemption, 'reached_stop_step', lambda first, last: last >= 5)
    with pytest.raises(preemption.Stopped, match='saved the checkpoint of step 5, 5 in'):
      groups.train_group(configs, dirs)
  assert workdirs.is_finished(dirs[1]) and not workdirs.is_finished(dirs[0])
  assert [workdirs.latest_step(d) for d in dirs] == [5, 4, 5]
  shutil.rmtree(os.path.join(dirs[2], 'checkpoints', 'latest', '5'))  # Starts again.
  finished = os.path.getmtime(os.path.join(dirs[1], 'metrics.json'))
  results = groups.train_group(configs, dirs)
  assert os.path.getmtime(os.path.join(dirs[1], 'metrics.json')) == finished  # Skipped.
  for d, u, want, got in zip(dirs, uninterrupted, expected, results):
    # The resumed group holds two runs, not three: another program, the same bounds.
    _assert_same_metrics(want, got)
    worst = _curve_differences(u, d)
    assert worst['train/loss'] < 1e-3, worst
    assert _relative_l2(_variables(u), _variables(d)) < 2e-3


def test_runs_of_other_shapes_are_refused_in_one_line(data_dir, tmp_path):
  configs = _baseline_configs(data_dir)[:2]
  configs[1].model.width = 0.25
  configs[1].train.batch_size = 8
  with pytest.raises(ValueError) as error:
    groups.train_group(configs, [str(tmp_path / 'a'), str(tmp_path / 'b')])
  message = str(error.value)
  assert '\n' not in message and 'model.width, train.batch_size' in message, message
  assert not os.path.exists(tmp_path / 'a')  # Refused before any work.
  # 13 labeled images make batches of 13, not 16: equal step keys, unequal batches.
  configs = [tiny_config(data_dir, 'baseline', label_fraction=f, num_summary_images=0)
             for f in (0.5, 0.1)]
  with pytest.raises(ValueError, match='equal batches.*batches of 13') as error:
    groups.train_group(configs, [str(tmp_path / 'c'), str(tmp_path / 'd')])
  assert '\n' not in str(error.value)


def test_pretrain_group_of_two_folds_matches_the_folds_trained_alone(data_dir, tmp_path):
  configs = [tiny_config(data_dir, 'pretrain', seed=fold, num_folds=2, fold=fold, num_epochs=1,
                         sam='none') for fold in (0, 1)]
  alone, alone_results, grouped, group_results = _train_both(configs, tmp_path)
  for a, g, expected, actual in zip(alone, grouped, alone_results, group_results):
    _assert_same_metrics(expected, actual)
    assert 'knn5_balanced_accuracy' in actual
    worst = _curve_differences(a, g)
    assert worst['train/loss'] < 1e-4, worst
    assert _relative_l2(_variables(a), _variables(g)) < 3e-5
    assert _listing(g) == _listing(a)
  # A fold's fine-tuning accepts the group's pretraining as it would a lone one's.
  run_lib.check_config(tiny_config(data_dir, 'finetune', pretrained_workdir=grouped[1],
                                   num_folds=2, fold=1, seed=1))


@pytest.mark.parametrize('k,counts', [(1, (1, 0)), (2, (2, 1))])
def test_group_steps_mask_each_runs_own_number_of_steps(k, counts):
  """Run r runs counts[r] of the dispatch's k steps, as it would alone; a run with 0 keeps
  its state and metrics bit for bit (train_steps' k = 1 dispatch has no mask of its own)."""
  config = tiny_config(None, 'pretrain', sam='none')
  config.model.num_classes = 4
  mesh = sharding.create_mesh()
  model = state_lib.create_model(config)
  tx = optimizers.create_optimizer(config)
  objective = steps_lib.objective(config, model)
  states = [state_lib.create_train_state(config, model, jax.random.key(s), tx, mesh)
            for s in range(2)]
  metrics, inputs, data, rngs, _ = steps_lib.example_arguments(config, mesh, k)
  values = [steps_lib.step_values(n, 2, np.ones(4), np.array([3, 10])) for n in counts]
  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  before = jax.device_get((stack(states), stack([metrics] * 2)))
  grouped = groups.make_group_steps(config, objective, mesh, compile_cache.CompileCache(), 'k')
  after = jax.device_get(grouped(*jax.tree.map(jnp.asarray, before), stack([inputs] * 2), data,
                                 stack([rngs] * 2), stack(values)))
  single = jax.jit(steps_lib.bound_train_steps(config, objective))
  for r, n in enumerate(counts):
    one = jax.tree.map(lambda x, r=r: x[r], after)
    if n == 0:
      for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda x: x[r], before))):
        np.testing.assert_array_equal(x, y)
      continue
    alone = jax.device_get(single(states[r], metrics, inputs, data, rngs,
                                  sharding.replicate_tree(values[r], mesh)))
    assert int(one[0].step) == int(alone[0].step) == n
    for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(alone)):
      np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5)  # As tests/test_steps.py.


EIGHT_DEVICES = """
import json
from simclr_jax.parallel import sharding
from simclr_jax.train import compile_cache, groups, trainer
from tests import test_groups

data_dir, root = DATA_DIR, ROOT
configs = test_groups._baseline_configs(data_dir)[:2]  # 8 and 4 steps, batches of 16.
cache = compile_cache.CompileCache()
alone = [f'{root}/alone{i}' for i in range(2)]
grouped = [f'{root}/group{i}' for i in range(2)]
alone_results = [trainer.train_and_evaluate(c, w, cache) for c, w in zip(configs, alone)]
group_results = groups.train_group(configs, grouped, cache)
meshes = [dict(key[1].shape) for name, key in cache.names() if name == 'group_steps'
          if key[2]]  # Spread over the run axis.
print(json.dumps({
    'run_devices': [sharding.run_devices(n, m) for n, m in ((2, 0), (10, 0), (5, 0), (8, 0),
                                                             (8, 4), (2, 1))],
    'meshes': meshes, 'alone': alone_results, 'grouped': group_results,
    'curves': [test_groups._curve_differences(a, g) for a, g in zip(alone, grouped)],
    'variables': [test_groups._relative_l2(test_groups._variables(a), test_groups._variables(g))
                  for a, g in zip(alone, grouped)]}))
"""


def test_a_group_on_eight_devices_splits_its_runs_over_a_run_axis(data_dir, tmp_path):
  """2 runs on 8 host devices: a (run 2, data 4) mesh, each run's batch over 4 devices;
  each ends as it does alone on all 8 (data 8), within the 1-device group's bounds."""
  code = EIGHT_DEVICES.replace('DATA_DIR', repr(str(data_dir))).replace('ROOT', repr(str(tmp_path)))
  out = run_on_host_devices(code, 8).strip().splitlines()[-1]
  result = json.loads(out)
  assert result['run_devices'] == [2, 2, 1, 8, 4, 1]
  assert result['meshes'] == [{'run': 2, 'data': 4}]
  for expected, actual, worst, l2 in zip(result['alone'], result['grouped'], result['curves'],
                                         result['variables']):
    _assert_same_metrics(expected, actual, atol=1e-6)
    assert worst['train/loss'] < 1e-3 and worst['train/grad_norm'] < 5e-3, worst
    assert l2 < 2e-3


KILLED_GROUP = """
from simclr_jax.train import groups
from tests import test_groups
groups.train_group(test_groups.kill_configs(DATA_DIR), [ROOT + '/killed0', ROOT + '/killed1'])
"""


def kill_configs(data_dir):
  """Two baselines of 12 and 6 steps, checkpointed every 2 steps."""
  return [tiny_config(data_dir, 'baseline', seed=seed, label_fraction=fraction, num_epochs=3,
                      checkpoint_every_steps=2, log_every_steps=2, num_summary_images=0)
          for seed, fraction in BASELINES[:2]]


def test_a_group_killed_mid_training_resumes_to_the_uninterrupted_groups_end(data_dir,
                                                                            tmp_path):
  """SIGKILL (no chance to save) after the first checkpoint, then the same group again:
  each run resumes from its own last checkpoint and ends as the uninterrupted group."""
  configs = kill_configs(data_dir)
  reference = [str(tmp_path / f'reference{i}') for i in range(2)]
  expected = groups.train_group(configs, reference)
  killed = [str(tmp_path / f'killed{i}') for i in range(2)]
  code = KILLED_GROUP.replace('DATA_DIR', repr(str(data_dir))).replace('ROOT', repr(str(tmp_path)))
  process = subprocess.Popen([sys.executable, '-c', code], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if (workdirs.latest_step(killed[0]) or 0) >= 2:
      break
    time.sleep(0.1)
  assert process.poll() is None, 'the group ended before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not any(workdirs.is_finished(w) for w in killed)
  steps = [workdirs.latest_step(w) or 0 for w in killed]
  assert 2 <= steps[0] < 12
  resumed = groups.train_group(configs, killed)
  for want, got, r, k in zip(expected, resumed, reference, killed):
    _assert_same_metrics(want, got)
    assert [line['step'] for line in curves.read_curves(k)] == [
        line['step'] for line in curves.read_curves(r)]  # Each step once.
    for x, y in zip(_variables(r), _variables(k)):
      np.testing.assert_array_equal(x, y)  # Exact: the same program from the same state.
