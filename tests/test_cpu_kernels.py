"""The CPU convolution and max pooling: lax's values and gradients, and where they apply."""

import re

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from simclr_jax.model import cpu_kernels
from simclr_jax.model import heads
from tests.conftest import with_fields


class _Convolutions(nn.Module):
  """The convolutions of the ResNets' blocks: strided, 1x1 widening, 3x3 narrowing, padded."""
  fast: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    extra = {'conv_general_dilated': cpu_kernels.conv_general_dilated} if self.fast else {}
    conv = lambda *a, **k: nn.Conv(*a, use_bias=False, dtype=self.dtype, **extra, **k)
    x = nn.relu(conv(24, (3, 3), (2, 2))(x))
    x = nn.relu(conv(16, (1, 1), (2, 2))(x))
    x = nn.relu(conv(160, (1, 1))(x))
    x = nn.relu(conv(16, (3, 3))(x))  # 160 channels: the kernel gradient per tap.
    return conv(8, (3, 3), padding='VALID')(x)  # A 2 x 2 output: products of patches.


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


@pytest.mark.parametrize('dtype,rtol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('size,strides,padding', [
    (2, (1, 1), ((1, 1), (1, 1))),  # the last stage of a ResNet at 64 px
    (4, (2, 2), ((1, 1), (1, 1))),  # its strided entry: a 2 x 2 output
    (1, (1, 1), ((1, 1), (1, 1))),  # the last stage at 32 px
    (3, (1, 1), ((0, 1), (2, 0))),  # asymmetric padding, a 1 x 4 output
])
def test_images_smaller_than_the_kernel_have_lax_values_and_gradients(size, strides, padding,
                                                                      dtype, rtol):
  """The patches' product (im2col) computes lax's convolution and its gradients."""
  x = jax.random.normal(jax.random.key(0), (3, size, size, 16)).astype(dtype)
  kernel = (0.1 * jax.random.normal(jax.random.key(1), (3, 3, 16, 24))).astype(dtype)

  def loss_and_grads(conv):
    def loss(x, kernel):
      y = conv(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jnp.sum(y.astype(jnp.float32) * jnp.cos(y.astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)

  (lax_loss, lax_grads), (fast_loss, fast_grads) = (
      loss_and_grads(lax.conv_general_dilated),
      loss_and_grads(cpu_kernels.conv_general_dilated))
  np.testing.assert_allclose(fast_loss, lax_loss, rtol=rtol)
  for lax_grad, fast_grad in zip(lax_grads, fast_grads):
    scale = np.abs(np.asarray(lax_grad, np.float32)).max()
    np.testing.assert_allclose(np.asarray(fast_grad, np.float32) / scale,
                               np.asarray(lax_grad, np.float32) / scale, atol=rtol)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU convolution path')
@pytest.mark.parametrize('size,channels,convolutions', [
    (2, 64, 0), (2, 32, 0),  # products only
    (8, 64, 2),              # XLA's forward and input gradient, kernel gradient per tap
    (8, 32, 3),              # fewer channels: XLA's kernel gradient too
])
def test_which_convolutions_stay_xlas(size, channels, convolutions):
  """XLA CPU swaps the operands of a convolution of a 2 x 2 image, 10x slower: all
  three of its products there are matrix products; larger images keep XLA's
  convolution, and its kernel gradient below 64 channels."""
  x = jnp.ones((4, size, size, channels))
  kernel = jnp.ones((3, 3, channels, 32))
  step = jax.jit(jax.grad(lambda x, k: jnp.sum(cpu_kernels.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) ** 2), argnums=(0, 1)))
  hlo = step.lower(x, kernel).compile().as_text()
  assert len(re.findall(r' convolution\(', hlo)) == convolutions


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


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('window,strides,padding', [
    ((3, 3), (2, 2), 'SAME'),       # the ResNet stem's pooling
    ((3, 3), (2, 2), 'VALID'),
    ((3, 3), (1, 1), [(1, 1), (1, 1)]),
    ((2, 3), (3, 2), [(2, 0), (0, 1)]),
    ((2, 2), (2, 2), 'SAME'),
])
def test_max_pool_has_lax_values_and_gradients_with_ties(dtype, window, strides, padding):
  """cpu_kernels.max_pool: nn.max_pool's values; each window's gradient to its first maximum.

  ReLU outputs rounded to halves tie often (many zeros); integer cotangents keep
  the sums exact, so the gradients must be equal, not merely close.
  """
  for shape in [(2, 15, 17, 3), (2, 16, 16, 2)]:
    x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.key(0), shape)) * 2) / 2
    x = x.astype(dtype)
    y, vjp = jax.vjp(lambda x: cpu_kernels.max_pool(x, window, strides, padding), x)
    lax_y, lax_vjp = jax.vjp(lambda x: nn.max_pool(x, window, strides, padding), x)
    assert y.dtype == lax_y.dtype == dtype
    np.testing.assert_array_equal(y, lax_y)
    dy = jnp.round(8 * jax.random.normal(jax.random.key(1), y.shape)).astype(dtype)
    (dx,), (lax_dx,) = vjp(dy), lax_vjp(dy)
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, lax_dx)


def test_max_pool_gradient_of_random_inputs_and_its_use_in_the_resnet():
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 8))
  cotangent = jax.random.normal(jax.random.key(3), (2, 16, 16, 8))
  grads = [jax.jit(jax.grad(lambda x: jnp.sum(pool(x, (3, 3), (2, 2), 'SAME') * cotangent)))(x)
           for pool in (cpu_kernels.max_pool, nn.max_pool)]
  # Up to four windows add into one input, in another order than lax's: float noise.
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6 * np.abs(grads[1]).max())
  config = with_fields(default.get_config(), model='resnet18', width=0.125, channels=1)
  model = heads.create_model(config, 'classifier')
  image = x[..., :1]
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
  program = jax.jit(jax.grad(lambda v, image: jnp.sum(model.apply(v, image, train=False)),
                             argnums=1)).lower(variables, image).as_text()
  # On CPU the stem's pooling is differentiated without lax's select_and_scatter
  # (the jaxpr holds both forms; lowering keeps the platform's).
  assert ('select_and_scatter' in program) == (jax.default_backend() != 'cpu')
