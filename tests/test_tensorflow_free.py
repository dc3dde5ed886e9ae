"""The core a train step needs runs where TensorFlow and TFDS are not installed."""

import os
import subprocess
import sys

from tests.conftest import REPO

# The model, losses, SAM, augmentation, batch makers, the steps (single and scanned),
# the compile cache and the step benchmark: none may import TensorFlow or TFDS.
CORE = ('simclr_jax.model.resnet', 'simclr_jax.model.heads', 'simclr_jax.model.cpu_kernels',
        'simclr_jax.model.losses', 'simclr_jax.model.sam', 'simclr_jax.data.augment',
        'simclr_jax.data.batches', 'simclr_jax.parallel.sharding', 'simclr_jax.train.kinds',
        'simclr_jax.train.state', 'simclr_jax.train.optimizers', 'simclr_jax.train.steps',
        'simclr_jax.train.compile_cache')

SCRIPT = f'''
import sys
sys.modules['tensorflow'] = None  # Any import of it now fails.
sys.modules['tensorflow_datasets'] = None
sys.path.insert(0, {REPO!r})
sys.path.insert(0, {os.path.join(REPO, 'benchmarks')!r})
import importlib
for name in {CORE!r}:
  importlib.import_module(name)
import throughput  # The step benchmark.
import jax
from simclr_jax.parallel import sharding
from simclr_jax.train import optimizers, state, steps
from tests.conftest import tiny_config
config = tiny_config('/unused', 'pretrain', batch_size=8)
mesh = sharding.create_mesh()
model = state.create_model(config)
tx = optimizers.create_optimizer(config)
train_state = state.create_train_state(config, model, jax.random.key(0), tx, mesh)
train_steps = steps.make_train_steps(config, steps.objective(config, model), mesh)
train_state, metrics = train_steps(train_state, *steps.example_arguments(config, mesh, 2))
print('steps', int(train_state.step), float(metrics.compute()['loss']))
print('tensorflow' in sys.modules and sys.modules['tensorflow'] is not None)
'''


def test_core_imports_and_runs_scanned_steps_with_tensorflow_blocked():
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.split()
  assert lines[-1] == 'False'  # Nothing sneaked TensorFlow in.
  assert lines[-4] == 'steps' and lines[-3] == '2'  # Two steps in one scanned dispatch.
  assert float(lines[-2]) > 0
