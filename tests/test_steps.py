"""The scanned train steps: k steps per dispatch equal k single dispatches; lowering for GPU and TPU.

Accelerators default to 16 steps per dispatch under `lax.scan` (with a `lax.cond`
per step for `num_steps` and one for the epoch's end); CPU runs one. These tests
run the scanned path on CPU, on 1 and on 8 host devices, and export the tiny
model's programs for 'cuda' and 'tpu' so that anything that cannot lower there
fails here.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from simclr_jax.explain import gradcam
from simclr_jax.model import sam
from simclr_jax.parallel import sharding
from simclr_jax.train import optimizers
from simclr_jax.train import state as state_lib
from simclr_jax.train import steps as steps_lib
from tests import conftest

# Steps per epoch in these runs: the epoch's end (the temperature step-down) falls
# inside the scanned dispatch.
STEPS_PER_EPOCH = 2


def _setup(num_devices, sam):
  # A step-down threshold (loss 100) above any first-epoch loss: the first epoch's end lowers
  # the temperature, inside the scanned dispatch.
  config = conftest.tiny_config(None, 'pretrain', **{
      'pretrain.temperature_schedule': True, 'pretrain.temperature_steps': ((100.0, 0.3),),
      'pretrain.sam': sam})
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ('data',))
  model = state_lib.create_model(config)
  tx = optimizers.create_optimizer(config)
  initial = state_lib.create_train_state(config, model, jax.random.key(0), tx, mesh)
  fresh = lambda: jax.tree.map(jnp.copy, initial)  # The steps donate the state they take.
  run = steps_lib.make_train_steps(config, steps_lib.objective(config, model), mesh)
  return config, mesh, fresh, run


def _values(num_steps, mesh):
  return sharding.replicate_tree(
      steps_lib.step_values(num_steps, STEPS_PER_EPOCH, np.ones(4), np.array([3, 10])), mesh)


def check_scanned_equals_single(num_devices, sam='none', k=4, num_steps=(4, 3)):
  """k steps in one dispatch give the state and metrics of single dispatches.

  For each n in `num_steps`: one dispatch of k scanned steps of which the first n
  run, against n dispatches of one step on the same inputs. With SAM/ASAM the
  optimizer's momentum is left out of the comparison: the gradient at the
  perturbed weights (rho = 2, a tiny random network) flips ReLU and max-pool ties
  under the float noise of another fusion, so single elements of it differ by a
  few percent; the parameters, which move by the learning rate times it, agree.
  """
  config, mesh, fresh, run = _setup(num_devices, sam)
  metrics, inputs, data, rngs, _ = steps_lib.example_arguments(config, mesh, k)
  host_inputs = jax.device_get(inputs)
  rows = sharding.data_sharding(mesh, batch_axis=1)
  for n in num_steps:
    scanned, scanned_metrics = run(fresh(), jax.tree.map(jnp.copy, metrics), inputs, data,
                                   rngs, _values(n, mesh))
    single, single_metrics = fresh(), jax.tree.map(jnp.copy, metrics)
    for i in range(n):
      step_inputs = jax.tree.map(lambda x, i=i: jax.device_put(x[i:i + 1], rows), host_inputs)
      single, single_metrics = run(single, single_metrics, step_inputs, data, rngs,
                                   _values(1, mesh))
    assert int(scanned.step) == int(single.step) == n
    # The epoch's end ran inside the scan: the temperature went down.
    assert float(scanned.temperature) == float(single.temperature) < config.pretrain.temperature
    compared = (scanned, single) if sam == 'none' else (
        scanned.replace(opt_state=()), single.replace(opt_state=()))
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(compared[0]))
    for (path, a), b in zip(leaves, jax.tree.leaves(jax.device_get(compared[1]))):
      # A step inside a loop may fuse differently from one alone: float noise only.
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5,
                                 err_msg=f'{n} steps: {jax.tree_util.keystr(path)}')
    computed = jax.device_get(scanned_metrics.compute())
    expected = jax.device_get(single_metrics.compute())
    for name in expected:
      np.testing.assert_allclose(computed[name], expected[name], rtol=2e-5, err_msg=name)
    assert int(scanned_metrics.loss.count) == int(single_metrics.loss.count) == n


@pytest.mark.parametrize('sam', ['none', 'asam'])
def test_four_scanned_steps_equal_four_single_steps(sam):
  check_scanned_equals_single(1, sam)


def test_scanned_steps_on_eight_host_devices():
  code = ('from tests.test_steps import check_scanned_equals_single; '
          'check_scanned_equals_single(8, "asam"); print("scanned == single on 8 devices")')
  assert 'scanned == single on 8 devices' in conftest.run_on_host_devices(code)


def _exported_text(fn, *args):
  exported = jax.export.export(fn, platforms=['cuda', 'tpu'])(*args)
  assert exported.platforms == ('cuda', 'tpu')
  return exported.mlir_module()


def _no_host_callback(text):
  return not re.search(r'callback|stablehlo\.(send|recv)|outfeed|infeed', text)


def test_tiny_programs_export_for_gpu_and_tpu():
  """The scanned train step, inference and Grad-CAM lower for CUDA and TPU.

  Their programs call no host callback, and hold lax's max-pool gradient
  (select_and_scatter), not cpu_kernels' CPU-only form.
  """
  config = conftest.tiny_config(None, 'baseline')
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  model = state_lib.create_model(config)
  state = state_lib.abstract_state(config, mesh)
  train_steps = steps_lib.make_train_steps(config, steps_lib.objective(config, model), mesh)
  text = _exported_text(train_steps, state,
                        *steps_lib.example_arguments(config, mesh, 2, abstract=True))
  assert 'stablehlo.while' in text and 'select_and_scatter' in text
  assert _no_host_callback(text)

  size, channels = config.data.image_size, config.data.channels
  images = jax.ShapeDtypeStruct((4, size, size, channels), jnp.float32)
  variables = state_lib.variables(state)
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  assert _no_host_callback(_exported_text(infer, variables, images))

  cam = jax.jit(lambda v, x, c: gradcam._cam(model, v, x, c, None, method='gradcam',  # pylint: disable=protected-access
                                             layer='stage2'))
  text = _exported_text(cam, variables, images, jax.ShapeDtypeStruct((4,), jnp.int32))
  assert _no_host_callback(text)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU kernels are for CPU')
def test_cpu_kernels_follow_the_platform_lowered_for():
  """On this CPU, a CPU program uses cpu_kernels' forms, a CUDA or TPU export lax's."""
  config = conftest.tiny_config(None, 'baseline')
  model = state_lib.create_model(config)
  x = jnp.zeros((2, config.data.image_size, config.data.image_size, config.data.channels))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  grad = jax.jit(jax.grad(lambda v, x: jnp.sum(model.apply(v, x, train=False)), argnums=1))
  cpu_text = grad.lower(variables, x).as_text()
  assert 'select_and_scatter' not in cpu_text
  for platform in ('cuda', 'tpu'):
    text = jax.export.export(grad, platforms=[platform])(variables, x).mlir_module()
    assert 'select_and_scatter' in text, platform


class _TinyBatchNormModel(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(1)(nn.relu(x))[:, 0]


def test_sam_train_step_keeps_the_clean_pass_loss_statistics_and_grad_norm():
  """train_step with ASAM: BatchNorm statistics, loss and grad norm of the clean pass."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=8), jnp.float32)
  model = _TinyBatchNormModel()
  variables = model.init(jax.random.key(0), x, train=False)
  tx = optax.with_extra_args_support(sam.wrap(optax.sgd(0.1, momentum=0.9), 'asam', 2.0))
  state = state_lib.TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables['batch_stats'], temperature=jnp.float32(0.5),
      epoch_loss=jnp.zeros(2), best_metric=jnp.float32(-jnp.inf), best_step=jnp.int32(-1))

  def loss_fn(params, batch_stats, batch, rng, temperature):
    del rng, temperature
    predictions, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                       batch['x'], train=True, mutable=['batch_stats'])
    loss = jnp.mean((predictions - batch['y'])**2)
    return loss, (updates['batch_stats'], jnp.float32(0.0))

  step = jax.jit(functools.partial(steps_lib.train_step, loss_fn=loss_fn, steps_per_epoch=100,
                                   epoch_end=lambda s: s))
  new_state, step_metrics = step(state, {'x': x, 'y': y}, jax.random.key(1))
  (clean_loss, (clean_stats, _)), clean_grads = jax.value_and_grad(
      lambda p: loss_fn(p, state.batch_stats, {'x': x, 'y': y}, None, None),
      has_aux=True)(state.params)
  summary = step_metrics.compute()
  np.testing.assert_allclose(summary['loss'], clean_loss, rtol=1e-6)
  np.testing.assert_allclose(summary['grad_norm'], optax.tree.norm(clean_grads), rtol=1e-5)
  for actual, expected in zip(jax.tree.leaves(new_state.batch_stats),
                              jax.tree.leaves(clean_stats)):
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
  assert new_state.step == 1
  # The update is SGD on the gradient at the perturbed weights, not the clean one.
  plain = optax.apply_updates(state.params, jax.tree.map(lambda g: -0.1 * g, clean_grads))
  assert not np.allclose(new_state.params['Dense_0']['kernel'], plain['Dense_0']['kernel'])
  assert not np.allclose(new_state.params['Dense_0']['kernel'],
                         state.params['Dense_0']['kernel'])
