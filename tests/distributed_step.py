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
  from simclr_jax.parallel import distributed, sharding  # pylint: disable=g-import-not-at-top
  if len(sys.argv) > 3:
    process_id, num_processes, port = map(int, sys.argv[3:6])
    # main.py's start-up, with its --coordinator_address, --num_processes, --process_id.
    launch = distributed.maybe_initialize_distributed(f'localhost:{port}', num_processes,
                                                      process_id)
    assert launch.kind == 'flags' and jax.process_count() == num_processes, launch
  from simclr_jax.train import optimizers  # pylint: disable=g-import-not-at-top
  from simclr_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from simclr_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config('/unused', mode, batch_size=16, sam='asam')
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ('data',))
  model = state_lib.create_model(config)
  tx = optimizers.create_optimizer(config)
  state = state_lib.create_train_state(config, model, jax.random.key(0), tx, mesh)
  p_train_steps = steps_lib.make_train_steps(config, steps_lib.objective(config, model), mesh)
  # The same global batch on every process: each feeds its rows of it.
  state, metrics = p_train_steps(state, *steps_lib.example_arguments(config, mesh, 1))
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
