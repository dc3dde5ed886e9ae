"""One train step of a tiny model, run as a script by tests/test_sharding.py.

  python tests/distributed_step.py MODE DEVICES [PROCESS_ID NUM_PROCESSES PORT]

Prints one JSON line: the step's loss and a checksum of the updated parameters.
With DEVICES=k the mesh holds the first k devices; with several processes each
feeds its own rows of the same global batch.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import Mesh  # pylint: disable=wrong-import-position


def main():
  mode, num_devices = sys.argv[1], int(sys.argv[2])
  from simclr_jax import distributed, sharding, tasks, train  # pylint: disable=g-import-not-at-top
  if len(sys.argv) > 3:
    process_id, num_processes, port = map(int, sys.argv[3:6])
    # main.py's start-up, with its --coordinator_address, --num_processes, --process_id.
    launch = distributed.maybe_initialize_distributed(f'localhost:{port}', num_processes,
                                                      process_id)
    assert launch.kind == 'flags' and jax.process_count() == num_processes, launch
  from simclr_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config('/unused', mode, batch_size=16, sam='asam')
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ('data',))
  model = state_lib.create_model(config)
  tx = state_lib.create_optimizer(config, state_lib.create_learning_rate_fn(config, 10))
  state = state_lib.create_train_state(config, model, jax.random.key(0), tx, mesh)
  loss_fn, epoch_end = tasks.objective(config, model)
  p_train_step = train.make_train_step(config, loss_fn, epoch_end, mesh, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.image_size, config.image_size, config.channels)
  global_batch = {'image1': rng.random(shape, np.float32),
                  'image2': rng.random(shape, np.float32),
                  'image': rng.random(shape, np.float32),
                  'label': rng.integers(0, 4, config.batch_size).astype(np.int32)}
  if mode == 'pretrain':
    global_batch = {k: global_batch[k] for k in ('image1', 'image2')}
  else:
    global_batch = {k: global_batch[k] for k in ('image', 'label')}
  rows = config.batch_size // jax.process_count()
  start = jax.process_index() * rows
  local = {k: v[start:start + rows] for k, v in global_batch.items()}
  batch = sharding.to_global(local, sharding.data_sharding(mesh))
  state, metrics = p_train_step(state, batch, jax.random.key(1))
  params = sharding.to_host(state.params)
  leaves = jax.tree.leaves(params)
  print(json.dumps({
      'loss': float(metrics.compute()['loss']),
      'grad_norm': float(metrics.compute()['grad_norm']),
      'checksum': float(sum(np.abs(l).sum() for l in leaves)),
      'first': np.concatenate([l.ravel()[:4] for l in leaves]).tolist(),
      'devices': mesh.size,
  }))


if __name__ == '__main__':
  main()
