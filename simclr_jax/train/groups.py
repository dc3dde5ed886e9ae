"""Runs of equal shapes trained together: one compiled program with a leading run axis.

`train_group(configs, workdirs)` trains R runs whose configs share
`compile_cache.step_key` (same model, optimizer, augmentation, batch and steps per
dispatch) as one jitted program per dispatch: `jax.vmap` of `steps.train_steps`
over a leading run axis of the state (parameters, optimizer state, BatchNorm
statistics, step counter, temperature, bookkeeping), of the train metrics, of the
per-step inputs (each run's own rows and stream positions), of the keys and of
the per-run values (steps of this dispatch, steps per epoch, class weights,
schedule). The data set on the devices is shared, not vmapped.

What differs between the runs is data: their labeled rows, their selection
rows, their length (steps per epoch, epochs), their class weights, their seeds.
Each run keeps its own step counter: a dispatch runs `num_steps` of its k steps
for each run (0 for a run that has finished or stops at a boundary sooner), the
others masked. Everything around the dispatches is each run's own
`trainer.RunLoop`, applied to its slice of the stacked state: summaries,
evaluation on its own selection split with its best checkpoint kept,
checkpoints, the final test metrics; evaluations run one run after another,
each on its own slice. So each run's directory is what a run trained alone
writes (config.json, checkpoints, curves.jsonl, TensorBoard events,
metrics.json, test_predictions.npz) and resumes from it: each run restores its
own latest checkpoint, runs at different steps go on from theirs, and a
finished run (metrics.json) is skipped.

Under `vmap` a masked step is a select of both branches: a finished run's slot
still computes, so a group pays for its longest run R times.
"""

import json

from absl import logging
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import errors
from simclr_jax.parallel import sharding
from simclr_jax.train import compile_cache
from simclr_jax.train import preemption
from simclr_jax.train import steps as steps_lib
from simclr_jax.train import trainer
from simclr_jax.train import workdirs as workdirs_lib


def train_group(configs, workdirs, cache=None, run_devices=0):
  """Trains the runs of `configs` in `workdirs` together; each resumes from its checkpoint.

  Args:
    configs: checked pretrain, finetune or baseline configs of one step key.
    workdirs: each run's directory, as `trainer.train_and_evaluate` takes it.
    cache: the compile_cache.CompileCache to share compiled steps with other runs
      and groups; None: the group's own.
    run_devices: at most this many devices along the mesh's `run` axis (0: no
      bound): `sharding.run_devices` takes the most that divide both the device
      count and the runs to train. Each run's batch is split over the `data`
      devices of its row; 1: every run's batch over every device, as a lone run's.

  Returns:
    Each run's test metrics (as `train_and_evaluate` returns them; a finished
    run's from its metrics.json), in the order of `configs`.

  Raises:
    errors.UserError: the runs differ in their step key, data set or batch.
    preemption.Stopped: a stop was requested; every run saved its checkpoint.
  """
  if len(configs) != len(workdirs) or not configs:
    raise errors.UserError(f'A group needs one workdir per config, got {len(configs)} configs '
                           f'and {len(workdirs)} workdirs.')
  _check_same(compile_cache.step_key, configs, workdirs)
  cache = compile_cache.CompileCache() if cache is None else cache
  results = [workdirs_lib.read_metrics(w) if workdirs_lib.is_finished(w) else None
             for w in workdirs]
  pending = [i for i, result in enumerate(results) if result is None]
  mesh = sharding.create_mesh(sharding.run_devices(max(len(pending), 1), run_devices))
  runs = []
  try:
    for i in pending:
      runs.append(trainer.RunLoop(configs[i], workdirs[i], mesh, cache))
  except preemption.Stopped:  # Asked to stop before the first step: nothing to save.
    _close(runs)
    raise
  _check_runs(runs)
  for i, run in zip(pending, runs):
    if run.done:  # Its last checkpoint saved, its metrics not yet written.
      results[i] = run.finish(run.take_start()[0])
  training = [(i, run) for i, run in zip(pending, runs) if not run.done]
  if training:
    indices, runs = zip(*training)
    for i, result in zip(indices, _train(runs, mesh, cache)):
      results[i] = result
  return results


def _train(runs, mesh, cache):
  """The group's loop over its dispatches; each run's test metrics, in order."""
  first = runs[0]
  # The runs over the `run` axis where it divides them (a resumed group may train fewer).
  spread = 'run' in mesh.axis_names and len(runs) % mesh.shape['run'] == 0
  take, put, stack = _slicers(mesh, cache, spread)
  starts = [run.take_start() for run in runs]
  state, train_metrics = stack(starts)
  del starts  # The stacked copy is the one trained.
  rngs = sharding.replicate_tree(_stack_host([run.host_rngs for run in runs]), mesh)
  group_steps = make_group_steps(first.config, first.recipe.objective, mesh, cache,
                                 first.recipe.key, spread)
  device_data = first.recipe.device_data  # Every run reads the same data set (checked).
  done = sum(run.step for run in runs)
  progress = periodic_actions.ReportProgress(
      num_train_steps=sum(run.total_steps for run in runs), writer=None,
      every_steps=len(runs) * first.log_every if first.log_every else None,
      every_secs=None if first.log_every else 60.0)
  logging.info('A group of %d runs in one program: steps %s of %s, %d per dispatch; '
               'mesh %s.', len(runs), [run.step for run in runs],
               [run.total_steps for run in runs], first.k, dict(mesh.shape))
  results = [None] * len(runs)
  slot = 0  # Dispatch slots run so far: the preemption sync point's step count.
  while not all(run.done for run in runs):
    counts = [run.next_num_steps() for run in runs]
    inputs = device_data.inputs(
        _stack_host([run.host_inputs(n) for run, n in zip(runs, counts)]), batch_axis=2,
        runs=spread)
    values = sharding.replicate_tree(
        _stack_host([run.step_values(n) for run, n in zip(runs, counts)]), mesh)
    state, train_metrics = group_steps(state, train_metrics, inputs, device_data.arrays,
                                       rngs, values)
    for step in range(done + 1, done + sum(counts) + 1):
      progress(step)  # clu's periodic actions want every step.
    done += sum(counts)
    stop_now = preemption.reached_stop_step(slot + 1, slot + max(counts))
    slot += max(counts)
    for i, (run, count) in enumerate(zip(runs, counts)):
      due = run.advance(count, stop_now) if count else None
      if not due or not any(due):
        continue
      index = np.int32(i)
      old_state, old_metrics = take(state, index), take(train_metrics, index)
      new_state, new_metrics = run.periodic(old_state, old_metrics, due, progress.timed)
      if new_state is not old_state:
        state = put(state, new_state, index)
      if new_metrics is not old_metrics:
        train_metrics = put(train_metrics, new_metrics, index)
      if run.done:
        results[i] = run.finish(new_state)
    if stop_now:
      unfinished = [run for run in runs if not run.done]
      _close(unfinished)
      raise preemption.Stopped(', '.join(str(run.step) for run in unfinished),
                               ', '.join(run.workdir for run in unfinished),
                               preemption.reason())
  return results


def make_group_steps(config, objective, mesh, cache, key, spread=False):
  """`steps.train_steps` vmapped over a leading run axis, jitted; the data set shared.

  (states, metrics, inputs [R, k, B], data, rngs [R], values [R]) -> (states,
  metrics), the states and metrics donated. A run whose `num_steps` is 0 keeps
  its state and metrics: `train_steps` runs a k = 1 dispatch without its mask.
  `spread`: the states and metrics stay split over the mesh's `run` axis (else
  replicated). One compiled program per (step key, mesh, spread) and number of runs.
  """
  steps = steps_lib.bound_train_steps(config, objective)

  def one_run(state, metrics, inputs, data, rngs, values):
    new = steps(state, metrics, inputs, data, rngs, values)
    ran = values['num_steps'] > 0
    return jax.tree.map(lambda a, b: jnp.where(ran, a, b), new, (state, metrics))

  def make():
    stacked = _stacked_sharding(mesh, spread)
    return jax.jit(jax.vmap(one_run, in_axes=(0, 0, 0, None, 0, 0)),
                   out_shardings=(stacked, stacked), donate_argnums=(0, 1))

  return cache.get('group_steps', (key, mesh, spread), make)


def _stacked_sharding(mesh, spread):
  return sharding.run_sharding(mesh) if spread else sharding.replicated_sharding(mesh)


def _slicers(mesh, cache, spread=False):
  """(take, put, stack): one run's slice of a stacked tree, its replacement, the stacking.

  `take(tree, i)` and `put(tree, one, i)` (which donates `tree`) take the index as
  an array, so every run's slice shares one compiled program. A slice is
  replicated (what a lone run's loop works on); the stacked trees are split over
  the `run` axis when `spread`.
  """

  def make():
    repl, stacked = sharding.replicated_sharding(mesh), _stacked_sharding(mesh, spread)
    take = jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree), out_shardings=repl)
    put = jax.jit(lambda tree, one, i: jax.tree.map(lambda x, y: x.at[i].set(y), tree, one),
                  out_shardings=stacked, donate_argnums=0)
    stack = jax.jit(lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees),
                    out_shardings=stacked)
    return take, put, lambda trees: tuple(stack([tree[j] for tree in trees])
                                          for j in range(len(trees[0])))

  return cache.get('group_slicers', (mesh, spread), make)


def _stack_host(trees):
  """Host trees (numpy, or single-device keys) stacked on a leading run axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array)
                      else np.stack(xs), *trees)


def _close(runs):
  """Waits for the runs' checkpoint saves in flight, flushes their writers."""
  for run in runs:
    run.checkpoints.close()
    run.writer.flush()


def _flat_key(key):
  """A step key as {dotted config field: value}, the model key's fields among them."""
  fields = json.loads(key)
  fields.update(json.loads(fields.pop('model', '{}')))
  return flax.traverse_util.flatten_dict(fields, sep='.')


def _check_same(key_of, configs, workdirs, what='step key'):
  """Raises a one-line UserError naming the fields where a run's key differs from the first's."""
  first = _flat_key(key_of(configs[0]))
  for config, workdir in zip(configs[1:], workdirs[1:]):
    other = _flat_key(key_of(config))
    differing = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
    if differing:
      raise errors.UserError(
          f'The runs of a group must share one {what}: {workdir} differs from '
          f'{workdirs[0]} in {", ".join(differing)}; train them in separate groups.')


def _check_runs(runs):
  """The runs' completed configs share a step key, one data set, its labels and one batch."""
  if not runs:
    return
  configs, workdirs = [run.config for run in runs], [run.workdir for run in runs]
  _check_same(compile_cache.step_key, configs, workdirs)
  _check_same(lambda c: json.dumps({'data': json.loads(c.data.to_json_best_effort()),
                                    'task': c.labels.task}), configs, workdirs,
              'data set and label task')
  first = runs[0].recipe.rows
  for run in runs[1:]:
    if run.recipe.rows.batch_size != first.batch_size:
      raise errors.UserError(
          f'The runs of a group must train on equal batches: {run.workdir} has '
          f'{len(run.recipe.rows.rows)} training images, batches of {run.recipe.rows.batch_size}, '
          f'{runs[0].workdir} batches of {first.batch_size}; train them in separate groups.')
