"""benchmarks/throughput.py at a tiny size, and the convolution it made fast."""

import importlib.util
import json
import os
import re

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.model import cpu_kernels
from simclr_jax.model import resnet
from tests.conftest import REPO


def _load_throughput():
  path = os.path.join(REPO, 'benchmarks', 'throughput.py')
  spec = importlib.util.spec_from_file_location('throughput', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TINY = ['--mode=baseline', '--model=resnet18', '--width=0.125', '--image_size=16',
        '--channels=1', '--batch_size=4', '--encoder_output=avgpool', '--warmup_steps=1',
        '--steps=2', '--window=2', '--num_devices=1']


def test_throughput_prints_json_with_every_figure(capsys, monkeypatch):
  throughput = _load_throughput()
  # Two one-block stages: XLA CPU's compile time grows with the number of layers.
  monkeypatch.setitem(resnet.STAGE_SIZES, 'resnet18', (1, 1))
  result = throughput.main(TINY)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == json.loads(json.dumps(result))
  for key in ('images_per_s', 'step_s_median', 'step_s_min', 'step_s_max', 'step_s_iqr',
              'compile_s', 'peak_memory_bytes', 'flops_per_step', 'achieved_flops',
              'peak_fraction', 'loadavg_start', 'loadavg_end', 'compiles_while_stepping',
              'xla_flags', 'num_devices'):
    assert key in printed, key
  assert printed['mode'] == 'baseline' and printed['sam'] == 'none'
  assert printed['num_devices'] == 1 and len(printed['step_s_windows']) == 1
  assert printed['images_per_s'] == pytest.approx(4 / printed['step_s_median'])
  assert printed['step_s_min'] <= printed['step_s_median'] <= printed['step_s_max']
  assert printed['flops_per_step'] > 0 and printed['peak_memory_bytes'] > 0
  assert printed['peak_fraction'] == pytest.approx(
      printed['achieved_flops'] / throughput.CPU_PEAK_FLOPS)
  assert printed['compiles_while_stepping'] == 0  # The step never recompiles.


def test_throughput_rejects_a_window_that_does_not_divide_the_steps():
  throughput = _load_throughput()
  with pytest.raises(SystemExit):
    throughput.parse_args(['--steps=5', '--window=2'])


class _Convolutions(nn.Module):
  """The convolutions of the ResNets' blocks: strided, 1x1 widening and narrowing, padded."""
  fast: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    extra = {'conv_general_dilated': cpu_kernels.conv_general_dilated} if self.fast else {}
    conv = lambda *a, **k: nn.Conv(*a, use_bias=False, dtype=self.dtype, **extra, **k)
    x = nn.relu(conv(24, (3, 3), (2, 2))(x))
    x = nn.relu(conv(16, (1, 1), (2, 2))(x))
    x = nn.relu(conv(160, (1, 1))(x))
    x = nn.relu(conv(16, (1, 1))(x))
    return conv(8, (3, 3), padding='VALID')(x)


@pytest.mark.parametrize('dtype,rtol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_fast_convolution_has_lax_values_and_gradients(dtype, rtol):
  """cpu_kernels.conv_general_dilated changes the order of sums, not the mathematics."""
  x = jax.random.normal(jax.random.key(0), (2, 15, 13, 16))
  variables = _Convolutions(False).init(jax.random.key(1), x)

  def loss_and_grads(fast):
    def loss(params, x):
      y = _Convolutions(fast, dtype).apply(params, x).astype(jnp.float32)
      return jnp.sum(y * jnp.cos(y))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)

  (lax_loss, lax_grads), (fast_loss, fast_grads) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(fast_loss, lax_loss, rtol=rtol)
  for lax_grad, fast_grad in zip(jax.tree.leaves(lax_grads), jax.tree.leaves(fast_grads)):
    scale = np.abs(np.asarray(lax_grad, np.float32)).max()
    np.testing.assert_allclose(np.asarray(fast_grad, np.float32) / scale,
                               np.asarray(lax_grad, np.float32) / scale, atol=rtol)


@pytest.mark.parametrize('channels,dilation,fast', [(32, 1, True), (32, 2, False),
                                                    (3, 1, False)])
def test_fast_convolution_leaves_dilated_and_stem_convolutions_to_lax(channels, dilation,
                                                                     fast):
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, channels))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, 4))
  args = (x, kernel, (1, 1), 'SAME')
  kwargs = dict(rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_array_equal(cpu_kernels.conv_general_dilated(*args, **kwargs),
                                lax.conv_general_dilated(*args, **kwargs))
  jaxpr = str(jax.make_jaxpr(lambda x, k: cpu_kernels.conv_general_dilated(
      x, k, (1, 1), 'SAME', **kwargs))(x, kernel))
  assert ('custom_vjp' in jaxpr) == fast


def _dot_operand_types(hlo):
  """The element types of the operands of every dot in a compiled HLO module."""
  types = dict(re.findall(r'%([\w.\-]+) = (\w+)\[', hlo))
  return [types[name] for operands in re.findall(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', hlo)
          for name in operands]


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU convolution path')
@pytest.mark.parametrize('window,features', [((3, 3), 64), ((1, 1), 256), ((1, 1), 16)])
def test_bfloat16_kernel_gradient_is_a_bfloat16_product(window, features):
  """XLA CPU widens a bf16 product whose operand is a folded transpose to float32."""
  x = jnp.ones((4, 8, 8, 64), jnp.bfloat16)
  dy = jnp.ones((4, 8, 8, features), jnp.bfloat16)
  padding = ((window[0] // 2,) * 2,) * 2
  hlo = jax.jit(lambda x, dy: cpu_kernels._kernel_gradient(x, dy, window, (1, 1), padding, None)
                ).lower(x, dy).compile().as_text()
  types = _dot_operand_types(hlo)
  assert types and set(types) == {'bf16'}, types
