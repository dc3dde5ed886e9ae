"""End-to-end tests of pretrain -> finetune and baseline on tiny models."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from simclr_jax.data import arrays as arrays_lib
from simclr_jax.train import compile_cache
from simclr_jax.train import curves
from simclr_jax.train import evaluators
from simclr_jax.data import batches
from simclr_jax import run
from simclr_jax.train import workdirs
from simclr_jax.parallel import sharding
from simclr_jax.data import splits as splits_lib
from simclr_jax.train import optimizers
from simclr_jax.train import state as state_lib
from simclr_jax.train import recipes
from simclr_jax.train import steps as steps_lib
from simclr_jax.train import trainer
from tests.conftest import REPO, tiny_config


@pytest.fixture(scope='module')
def pretrain_workdir(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  trainer.train_and_evaluate(tiny_config(data_dir, 'pretrain'), workdir)
  return workdir


def test_pretrain_writes_outputs_and_knn_metrics(pretrain_workdir):
  with open(os.path.join(pretrain_workdir, 'metrics.json')) as f:
    metrics = json.load(f)
  assert 0.0 <= metrics['knn1_accuracy'] <= 1.0
  assert 'knn5_balanced_accuracy' in metrics
  assert metrics['chosen_step'] is not None
  assert workdirs.latest_step(pretrain_workdir) == metrics['total_steps']
  assert workdirs.latest_step(pretrain_workdir, 'best') == metrics['chosen_step']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(pretrain_workdir))
  assert 0.0 <= metrics['probe_balanced_accuracy'] <= 1.0
  # The learning curves: the NT-Xent loss at summaries, the monitors at evaluations.
  lines = curves.read_curves(pretrain_workdir)
  losses = [line['step'] for line in lines if 'train/loss' in line]
  monitors = [line for line in lines if 'val/probe_balanced_accuracy' in line]
  assert losses and losses == sorted(losses) and losses[-1] == metrics['total_steps']
  assert monitors and all('val/knn1_balanced_accuracy' in line for line in monitors)


def test_finetune_loads_encoder_and_reports_test_metrics(pretrain_workdir, data_dir, tmp_path):
  config = tiny_config(data_dir, 'finetune', pretrained_workdir=pretrain_workdir,
                       label_fraction=0.5)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  for key in ('accuracy', 'balanced_accuracy', 'macro_f1'):
    assert 0.0 <= result[key] <= 1.0
  assert len(result['per_class_recall']) == 4
  assert np.sum(result['confusion_matrix']) == result['num_examples']
  assert os.path.exists(tmp_path / 'confusion_matrix.png')
  _, _, variables = workdirs.restore_for_inference(str(tmp_path), which='latest')
  _, _, pretrained = workdirs.restore_for_inference(pretrain_workdir, which='latest')
  kernel = variables['params']['encoder']['conv_init']['kernel']
  assert kernel.shape == pretrained['params']['encoder']['conv_init']['kernel'].shape


def test_finetune_starts_from_the_pretrained_encoder_exactly(pretrain_workdir, data_dir):
  """Before the first step, the encoder's params and statistics are the pretrained ones."""
  config = tiny_config(data_dir, 'finetune', pretrained_workdir=pretrain_workdir,
                       label_fraction=0.5)
  mesh = sharding.create_mesh()
  recipe = recipes.create_recipe(config, mesh, compile_cache.CompileCache())
  fresh = state_lib.create_train_state(
      recipe.config, recipe.model, jax.random.key(config.seed),
      optimizers.create_optimizer(recipe.config), mesh)
  started = recipe.start(fresh)
  _, _, pretrained = workdirs.restore_for_inference(pretrain_workdir, which='latest')
  for name, tree in (('params', started.params), ('batch_stats', started.batch_stats)):
    leaves = jax.tree.leaves(tree['encoder'])
    expected = jax.tree.leaves(pretrained[name]['encoder'])
    assert len(leaves) == len(expected) > 0
    for a, b in zip(leaves, expected):
      np.testing.assert_array_equal(a, b)
  # ... and not the random initialisation it started from.
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(fresh.params['encoder']), jax.tree.leaves(started.params['encoder'])))
  assert int(started.step) == 0


def test_linear_probe_keeps_the_pretrained_encoder(pretrain_workdir, data_dir, tmp_path):
  # Precise BN is on: a probe's frozen encoder must keep its statistics all the same.
  config = tiny_config(data_dir, 'finetune', pretrained_workdir=pretrain_workdir,
                       linear_probe=True, num_epochs=1, precise_bn_batches=2)
  trainer.train_and_evaluate(config, str(tmp_path))
  _, _, probed = workdirs.restore_for_inference(str(tmp_path), which='latest')
  _, _, pretrained = workdirs.restore_for_inference(pretrain_workdir, which='latest')
  for name in ('params', 'batch_stats'):
    for a, b in zip(jax.tree.leaves(probed[name]['encoder']),
                    jax.tree.leaves(pretrained[name]['encoder'])):
      np.testing.assert_array_equal(a, b)


def test_pretrain_and_baseline_start_from_the_same_encoder(data_dir):
  states = []
  for mode in ('pretrain', 'baseline'):
    config = tiny_config(data_dir, mode)
    model = state_lib.create_model(config)
    params, _ = state_lib.init_variables(config, model, jax.random.key(config.seed))
    states.append(params['encoder'])
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)


def _classifier_state(config):
  """(arrays, train_idx, model, mesh, state) of a freshly initialised classifier."""
  config.model.num_classes = 4
  mesh = sharding.create_mesh()
  model = state_lib.create_model(config)
  state = state_lib.create_train_state(config, model, jax.random.key(0), optax.sgd(0.1), mesh)
  arrays = arrays_lib.load_arrays(config)
  train_idx = splits_lib.load_splits(config, arrays)['train']
  return arrays, train_idx, model, mesh, state


def test_precise_batch_stats_make_inference_match_training_mode_on_their_batch(data_dir):
  """With one batch, recomputed statistics are that batch's: inference == training mode."""
  config = tiny_config(data_dir, 'baseline', precise_bn_batches=1, batch_size=16,
                       head_dropout=0.0)  # Training mode without dropout noise.
  arrays, train_idx, model, mesh, state = _classifier_state(config)
  train_idx = train_idx[:16]
  # Running averages far from the data's, as after fast-moving training.
  state = state.replace(batch_stats=jax.tree.map(lambda s: s + 3.0, state.batch_stats))
  images = batches.preprocess(arrays.images[train_idx], config)
  training_mode, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                                 images, train=True,
                                 mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
  stale = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                      train=False)
  device_data = batches.DeviceDataset(arrays, mesh)
  stats = evaluators.PreciseBatchStats(device_data, train_idx, config, mesh)(state).batch_stats
  fresh = model.apply({'params': state.params, 'batch_stats': stats}, images, train=False)
  np.testing.assert_allclose(fresh, training_mode, rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(stale - training_mode)) > 1e-2  # The stale statistics did differ.


def test_precise_batch_stats_average_the_batches(data_dir):
  config = tiny_config(data_dir, 'baseline', precise_bn_batches=2, batch_size=16)
  arrays, train_idx, _, mesh, state = _classifier_state(config)
  precise = evaluators.PreciseBatchStats(batches.DeviceDataset(arrays, mesh), train_idx,
                                       config, mesh)
  stats = precise(state).batch_stats
  order = np.random.default_rng(config.seed).permutation(train_idx)
  per_batch = [jax.jit(evaluators.batch_stats_of)(
      state, batches.preprocess(arrays.images[order[i:i + 16]], config))
      for i in (0, 16)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *per_batch)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('overrides,needle', [
    (dict(mode='finetun'), '--config.mode'),
    (dict(model='resnet101'), '--config.model.name'),
    (dict(label_fraction=0.0), '--config.labels.fraction'),
    (dict(label_fraction=1.5), '--config.labels.fraction'),
    (dict(batch_size=15), None),  # Divisible by one CPU device: accepted by the check.
    (dict(mode='finetune'), '--config.finetune.pretrained_workdir'),
    (dict(mode='finetune', pretrained_workdir='/nonexistent'), 'No pretrain checkpoint'),
    (dict(precise_bn_batches=0), 'precise_bn_batches'),
])
def test_bad_config_is_one_clear_error_before_work(data_dir, overrides, needle):
  config = tiny_config(data_dir, overrides.pop('mode', 'pretrain'), **overrides)
  if needle is None:
    run.check_config(config)
    return
  with pytest.raises(ValueError, match=needle.replace('.', r'\.')):
    run.check_config(config)


def test_unknown_mode_in_dispatch(data_dir):
  with pytest.raises(ValueError, match='--config.mode'):
    run.run(tiny_config(data_dir, 'pretrian'), '/tmp/unused')


def test_finetune_from_another_architecture_is_rejected(pretrain_workdir, data_dir):
  config = tiny_config(data_dir, 'finetune', pretrained_workdir=pretrain_workdir, width=0.25)
  with pytest.raises(ValueError, match='another architecture.*--config.model.width=0.125'):
    run.check_config(config)


def test_workdir_with_a_different_config_is_rejected(pretrain_workdir, data_dir):
  config = tiny_config(data_dir, 'pretrain', temperature=0.1)
  with pytest.raises(ValueError, match='different config.*temperature'):
    trainer.train_and_evaluate(config, pretrain_workdir)


def test_nan_loss_stops_with_a_clear_message_and_keeps_last_checkpoint(data_dir, tmp_path):
  config = tiny_config(data_dir, 'baseline', num_epochs=3, checkpoint_every_steps=4,
                       log_every_steps=4)
  config.supervised.optimizer.learning_rate = 1e30  # Diverges within a few steps.
  with pytest.raises(FloatingPointError, match='last good checkpoint'):
    trainer.train_and_evaluate(config, str(tmp_path))
  step = workdirs.latest_step(str(tmp_path))
  if step is not None:
    _, _, variables = workdirs.restore_for_inference(str(tmp_path), which='latest')
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))


def _main_command(workdir, data_dir, extra=()):
  return [sys.executable, os.path.join(REPO, 'main.py'),
          '--config=' + os.path.join(REPO, 'configs', 'baseline.py'),
          f'--workdir={workdir}',
          '--config.data.name=synthetic_mri/small', f'--config.data.dir={data_dir}',
          '--config.data.image_size=32', '--config.data.channels=1', '--config.model.name=resnet18',
          '--config.model.width=0.125', '--config.model.encoder_output=avgpool',
          '--config.train.batch_size=16', '--config.eval.batch_size=32', '--config.train.num_epochs=3',
          '--config.train.checkpoint_every_steps=2', '--config.train.log_every_steps=2',
          '--config.labels.fraction=0.5', '--config.train.num_summary_images=0', *extra]


def test_resume_after_kill_9_ends_with_the_same_metrics(data_dir, tmp_path):
  """A run killed with SIGKILL mid-training and restarted matches an uninterrupted run."""
  env = dict(os.environ)
  reference = tmp_path / 'uninterrupted'
  subprocess.run(_main_command(reference, data_dir), check=True, env=env, cwd=REPO,
                 capture_output=True)
  killed = tmp_path / 'killed'
  process = subprocess.Popen(_main_command(killed, data_dir), env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if (workdirs.latest_step(str(killed)) or 0) >= 2:
      break
    time.sleep(0.2)
  assert process.poll() is None, 'the run ended before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.exists(killed / 'metrics.json')
  subprocess.run(_main_command(killed, data_dir), check=True, env=env, cwd=REPO,
                 capture_output=True)
  with open(reference / 'metrics.json') as f:
    expected = json.load(f)
  with open(killed / 'metrics.json') as f:
    resumed = json.load(f)
  for key in ('accuracy', 'balanced_accuracy', 'macro_f1', 'chosen_step'):
    assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key
  assert resumed['confusion_matrix'] == expected['confusion_matrix']
  # The resumed run's curves hold each step once, as the uninterrupted run's.
  assert [line['step'] for line in curves.read_curves(killed)] == [
      line['step'] for line in curves.read_curves(reference)]


def test_linear_probe_step_neither_trains_nor_perturbs_the_encoder(data_dir):
  """With SAM on, a linear probe's encoder gets a zero gradient: no update, no perturbation."""
  config = tiny_config(data_dir, 'finetune', linear_probe=True, finetune_sam='asam',
                       sam_rho=0.5, batch_size=8)
  config.model.num_classes = 4
  mesh = sharding.create_mesh()
  model = state_lib.create_model(config)
  tx = optimizers.create_optimizer(config)
  state = state_lib.create_train_state(config, model, jax.random.key(0), tx, mesh)
  before = jax.tree.map(np.asarray, state.params)
  step = steps_lib.make_train_steps(config, steps_lib.objective(config, model), mesh)
  new_state, _ = step(state, *steps_lib.example_arguments(config, mesh, 1))
  for a, b in zip(jax.tree.leaves(new_state.params['encoder']),
                  jax.tree.leaves(before['encoder'])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(new_state.params['head']['dense']['kernel'],
                         before['head']['dense']['kernel'])


def test_unreadable_newest_checkpoint_resumes_from_the_one_before(data_dir, tmp_path, caplog):
  """A damaged newest checkpoint (array files truncated, as by a crash or a full disk)
  is skipped with a warning and deleted; the run resumes from the one before and finishes."""
  import logging  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir, 'baseline', num_epochs=2, checkpoint_every_steps=2,
                       label_fraction=0.5, num_summary_images=0)
  workdir = str(tmp_path)
  first = trainer.train_and_evaluate(config, workdir)
  latest = tmp_path / 'checkpoints' / 'latest'
  steps = sorted(int(name) for name in os.listdir(latest) if name.isdigit())
  assert len(steps) >= 2 and steps[-1] == first['total_steps']
  truncated = 0
  for root, _, names in os.walk(latest / str(steps[-1])):
    if os.path.basename(root) == 'd':  # The array data (OCDBT).
      for name in names:
        open(os.path.join(root, name), 'w').close()
        truncated += 1
  assert truncated
  os.remove(tmp_path / 'metrics.json')
  with caplog.at_level(logging.INFO):
    second = trainer.train_and_evaluate(config, workdir)
  messages = [record.getMessage() for record in caplog.records]
  assert any(f'checkpoint of step {steps[-1]}' in m and 'unreadable' in m
             for m in messages), messages
  assert any(f'Resumed from step {steps[-2]}' in m for m in messages), messages
  assert workdirs.latest_step(workdir) == first['total_steps']
  _, _, variables = workdirs.restore_for_inference(workdir, which='latest')  # Readable again.
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))
  for key in ('accuracy', 'balanced_accuracy', 'chosen_step'):
    assert second[key] == pytest.approx(first[key], abs=1e-6), key
  # A resumed run that reaches a saved step again (here: best) replaces that checkpoint.
  checkpoints = workdirs.Checkpoints(workdir, config.train.keep_checkpoints)
  state = checkpoints.restore_latest(
      state_lib.abstract_state(workdirs.load_config(workdir), sharding.create_mesh()))
  checkpoints.save_best(state)
  checkpoints.save_best(state)
  checkpoints.close()
  assert workdirs.latest_step(workdir, 'best') == first['total_steps']


def test_balanced_class_weights_weigh_each_class_equally():
  config = tiny_config('/unused', 'baseline', class_weights='balanced')
  labels = np.array([0] * 6 + [1] * 2 + [3] * 4)
  weights = recipes.class_weights(config, labels, 4)
  # n / (K * n_class), and every present class then weighs n / K in total.
  np.testing.assert_allclose(weights, [12 / 24, 12 / 8, 0.0, 12 / 16])
  np.testing.assert_allclose(np.bincount(labels, weights=weights[labels]), [3, 3, 0, 3])
  config.labels.class_weights = 'none'
  np.testing.assert_array_equal(recipes.class_weights(config, labels, 4), np.ones(4))


@pytest.mark.parametrize('overrides,needle', [
    (dict(split_seed=1), r'split the data otherwise.*split\.seed'),
    (dict(num_folds=2, fold=1), r'split the data otherwise.*split\.num_folds'),
    (dict(include_test_in_pretrain=False, pretrain_saw_test=True), 'saw the test images'),
])
def test_finetune_refuses_a_pretraining_that_may_have_seen_its_test_subjects(
    pretrain_workdir, data_dir, tmp_path, overrides, needle):
  source = pretrain_workdir
  if overrides.pop('pretrain_saw_test', False):
    # A copy of the pretraining, recorded as transductive.
    source = str(tmp_path / 'transductive')
    shutil.copytree(pretrain_workdir, source)
    with open(os.path.join(source, 'config.json')) as f:
      recorded = json.load(f)
    recorded['split']['include_test_in_pretrain'] = True
    with open(os.path.join(source, 'config.json'), 'w') as f:
      json.dump(recorded, f)
  config = tiny_config(data_dir, 'finetune', pretrained_workdir=source, **overrides)
  with pytest.raises(ValueError, match=needle):
    run.check_config(config)


def test_finetune_refuses_an_unfinished_pretraining(pretrain_workdir, data_dir, tmp_path):
  unfinished = str(tmp_path / 'unfinished')
  shutil.copytree(pretrain_workdir, unfinished)
  os.remove(os.path.join(unfinished, 'metrics.json'))
  config = tiny_config(data_dir, 'finetune', pretrained_workdir=unfinished)
  with pytest.raises(ValueError, match='stopped before its last step'):
    run.check_config(config)


def test_summaries_never_cut_a_scanned_dispatch_short():
  assert trainer.summary_period(10, 1) == 10  # CPU: one step per dispatch, as configured.
  assert trainer.summary_period(10, 16) == 16  # A summary every dispatch, not at step 10.
  assert trainer.summary_period(20, 16) == 32
  assert trainer.summary_period(None, 16) is None
  periods = (trainer.summary_period(10, 16), 48, None)
  assert trainer.next_boundary(16, 100, periods) == 32  # The dispatch runs its 16 steps.


def test_checkpoint_clock_asks_for_a_save_after_its_minutes(monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(trainer.time, 'monotonic', lambda: now[0])
  clock = trainer.CheckpointClock(10.0)
  now[0] += 599.0
  assert not clock.due()
  now[0] += 1.0
  assert clock.due()
  clock.restart()
  assert not clock.due()
  assert not trainer.CheckpointClock(None).due()  # By steps only.
