"""Convolution and max pooling with hand-written gradients for XLA CPU.

XLA CPU runs a convolution's kernel gradient and max pooling's gradient
(select_and_scatter) far slower than the same work written as matrix products
over shifted windows (docs/performance.md). `conv_general_dilated` and `max_pool`
keep lax's semantics and use these forms only in programs lowered for CPU (and,
for convolutions, where channels are many enough to gain), chosen by
`lax.platform_dependent` at lowering: a GPU or TPU program, even one lowered on
a CPU-only machine (`jax.export`, benchmarks/tpu_compile.py), holds lax's own
operations, where `jax.default_backend()` would have said 'cpu'.
"""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

_NHWC = ('NHWC', 'HWIO', 'NHWC')
_MIN_CHANNELS = 16
# Kernel gradients of larger kernels as products per tap from this many input
# channels; below it lax's is faster (docs/performance.md).
_MIN_TAP_CHANNELS = 64


def _on_cpu_only(cpu_fn, default_fn, *args):
  """cpu_fn(*args) in programs compiled for CPU, default_fn(*args) in any other.

  The choice follows the platform the program is lowered for, not
  `jax.default_backend()`: a TPU or GPU program lowered on a CPU-only machine (the
  TPU compilation check, `jax.export`) gets lax's operations. Each lowering keeps
  one branch, so the compiled program holds no conditional.
  """
  def cpu_branch(*args):
    with jax.named_scope('cpu_kernels'):
      return cpu_fn(*args)
  return lax.platform_dependent(*args, cpu=cpu_branch, default=default_fn)


def _dot(a, b, contracting, precision):
  """a . b over the `contracting` dimensions ((a's,), (b's,)), accumulated in float32.

  For bfloat16 operands XLA CPU (YNNPACK) has a bf16 x bf16 -> f32 product, 3-4x
  faster than float32 on a CPU with AMX (docs/performance.md), but computes a
  product with a bfloat16 result by widening both operands to float32. Rounding the
  float32 result gives the same numbers as XLA's bfloat16 product.
  """
  return lax.dot_general(a, b, (contracting, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32).astype(a.dtype)


def _is_pointwise(kernel, padding):
  return kernel.shape[:2] == (1, 1) and not any(sum(padding, ()))


def _output_size(size, window, stride, pads):
  return (size + sum(pads) - window) // stride + 1


def _smaller_than_kernel(height, width, kernel):
  """Whether an image of height x width is lower or narrower than the kernel."""
  return height < kernel.shape[0] or width < kernel.shape[1]


def _patches_conv(x, kernel, strides, padding, precision):
  """The convolution as one matrix product: every kernel tap's window of x side by
  side along channels (im2col), times the kernel as a (taps x C, C') matrix.

  For images smaller than the kernel (the last ResNet stage at 64 px is 2 x 2),
  XLA CPU swaps a convolution's operands and runs it, and lax's input gradient, in a
  generic loop 10-17x slower than this product (docs/performance.md); on larger
  images XLA's own convolution is faster.
  """
  (kh, kw, channels, features), (sh, sw) = kernel.shape, strides
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)])
  ho, wo = _output_size(x.shape[1], kh, sh, (0, 0)), _output_size(x.shape[2], kw, sw, (0, 0))
  taps = [x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw]
          for i in range(kh) for j in range(kw)]
  return _dot(jnp.concatenate(taps, axis=3), kernel.reshape(kh * kw * channels, features),
              ((3,), (0,)), precision)


def _conv_forward(x, kernel, strides, padding, precision):
  if _is_pointwise(kernel, padding):
    # A 1x1 convolution is a product over channels; XLA CPU runs it as a matrix
    # product 2x faster than as a convolution (docs/performance.md).
    x = x[:, ::strides[0], ::strides[1]]
    return _dot(x, kernel[0, 0], ((3,), (0,)), precision)
  if _smaller_than_kernel(*x.shape[1:3], kernel):
    return _patches_conv(x, kernel, strides, padding, precision)
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def _input_gradient(x, kernel, dy, strides, padding, precision):
  """dL/dx: lax's for larger kernels; for 1x1, dy @ kernel^T on the strided positions."""
  if not _is_pointwise(kernel, padding):
    _, x_vjp = jax.vjp(lambda x: _conv_forward(x, kernel, strides, padding, precision), x)
    return x_vjp(dy)[0]
  (_, h, w, _), (sh, sw), (_, ho, wo, _) = x.shape, strides, dy.shape
  dx = _dot(dy, kernel[0, 0], ((3,), (1,)), precision)
  return lax.pad(dx, jnp.zeros((), dx.dtype), [(0, 0, 0), (0, h - (ho - 1) * sh - 1, sh - 1),
                                               (0, w - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)])


def _kernel_gradient(x, dy, window, strides, padding, precision):
  """dL/dkernel of a convolution as one matrix product per kernel tap.

  For tap (i, j) the gradient is taps(x)^T @ dy over the N * H * W output
  positions. XLA CPU's own kernel-gradient convolution (a window as large as the
  image) ran 5-10x slower on ResNet-50's shapes on an AVX2 CPU; on a Sapphire Rapids
  CPU it is as fast from 64 channels and 1.5-2.4x faster below, where it is kept
  (docs/performance.md).
  """
  (kh, kw), (sh, sw), (_, ho, wo, features) = window, strides, dy.shape
  channels = x.shape[3]
  if kh * kw > 1 and channels < _MIN_TAP_CHANNELS:
    # Few channels: copying the taps costs more than the products gain.
    _, kernel_vjp = jax.vjp(
        lambda k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_NHWC,
                                           precision=precision),
        jnp.zeros((kh, kw, channels, features), x.dtype))
    return kernel_vjp(dy)[0]
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)])
  # The rows and columns of x that tap (i, j) of the kernel sees.
  taps = [(slice(i, i + (ho - 1) * sh + 1, sh), slice(j, j + (wo - 1) * sw + 1, sw))
          for i in range(kh) for j in range(kw)]
  # Each product is (C, N*H*W) @ (N*H*W, C'), bfloat16 operands kept bfloat16 with
  # float32 sums. Its left operand is transposed as a 4-D array, once: dy, or x if
  # that is smaller. XLA folds a 2-D transpose into the product's dimension
  # numbers; such a product runs in Eigen, up to 1.5x slower in float32, and with
  # bfloat16 operands widened to float32, 3-5x slower (docs/performance.md).
  dot = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=jnp.float32)
  if features <= kh * kw * channels:
    dy_t = jnp.transpose(dy, (3, 0, 1, 2)).reshape(features, -1)
    grads = [dot(dy_t, x[:, rows, cols].reshape(-1, channels)) for rows, cols in taps]
    grads = jnp.stack(grads).transpose(0, 2, 1)
  elif x.dtype == jnp.float32:
    # Widening 1x1 kernels in float32: Eigen's product over the first dimension of
    # both operands is up to 2x faster than transposing x.
    dy = dy.reshape(-1, features)
    grads = jnp.stack([lax.dot_general(x[:, rows, cols].reshape(-1, channels), dy,
                                       (((0,), (0,)), ((), ())), precision=precision)
                       for rows, cols in taps])
  else:
    x_t = jnp.transpose(x, (3, 0, 1, 2))
    dy = dy.reshape(-1, features)
    grads = jnp.stack([dot(x_t[:, :, rows, cols].reshape(channels, -1), dy)
                       for rows, cols in taps])
  return grads.reshape(kh, kw, channels, features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(x, kernel, strides, padding, precision):
  return _conv_forward(x, kernel, strides, padding, precision)


def _conv_nhwc_fwd(x, kernel, strides, padding, precision):
  return _conv_forward(x, kernel, strides, padding, precision), (x, kernel)


def _conv_nhwc_bwd(strides, padding, precision, residuals, dy):
  x, kernel = residuals
  if not _is_pointwise(kernel, padding) and (_smaller_than_kernel(*x.shape[1:3], kernel) or
                                             _smaller_than_kernel(*dy.shape[1:3], kernel)):
    # An input or output smaller than the kernel: lax's gradients are convolutions
    # as slow there as the forward one (over the dilated dy for the input's); the
    # patches' product's gradients are two products.
    _, vjp = jax.vjp(lambda x, k: _patches_conv(x, k, strides, padding, precision), x, kernel)
    dx, dkernel = vjp(dy)
  else:
    dx = _input_gradient(x, kernel, dy, strides, padding, precision)
    dkernel = _kernel_gradient(x, dy, kernel.shape[:2], strides, padding, precision)
  return dx, dkernel.astype(kernel.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated` computed the way XLA CPU runs fastest.

  On CPU, for a plain (undilated, ungrouped) NHWC convolution of at least 16
  input channels, the kernel gradient is one matrix product per kernel tap, a
  1x1 convolution is a matrix product over channels, and a convolution of an
  image smaller than its kernel (and its input gradient, where the output is) one
  product of patches: the same sums in another order, 3x faster for a ResNet-50
  step. Other convolutions, and every
  convolution on an accelerator, go to lax unchanged.
  """
  plain = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
           and feature_group_count == 1 and not kwargs
           and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ())))
  # On a few input channels (the stem's RGB or gray image) lax's own gradient is
  # faster; accelerators keep their convolution libraries (cuDNN).
  def lax_conv(lhs, rhs):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)

  if not plain or lhs.shape[3] < _MIN_CHANNELS:
    return lax_conv(lhs, rhs)
  pads = padding
  if isinstance(pads, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, pads)
  cpu_conv = lambda lhs, rhs: _conv_nhwc(lhs, rhs, tuple(window_strides),
                                         tuple(map(tuple, pads)), precision)
  return _on_cpu_only(cpu_conv, lax_conv, lhs, rhs)


def _window_taps(x, window, strides, padding):
  """x's values at each tap (i, j) of every pooling window (x padded with -inf)."""
  (kh, kw), (sh, sw) = window, strides
  x = lax.pad(x, jnp.array(-jnp.inf, x.dtype),
              [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)])
  n, hp, wp, c = x.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  return [lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)], (hp, wp)


# Max pooling computes in float32: XLA CPU's bfloat16 reduce_window is 2x slower,
# and the maximum of bfloat16 values is the same number in either type.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_nhwc(x, window, strides, padding):
  return lax.reduce_window(x.astype(jnp.float32), -jnp.inf, lax.max, (1, *window, 1),
                           (1, *strides, 1), ((0, 0), *padding, (0, 0))).astype(x.dtype)


def _max_pool_fwd(x, window, strides, padding):
  y = _max_pool_nhwc(x, window, strides, padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, dy):
  """Each window's gradient goes to its first maximum (row-major), as lax's does.

  lax's gradient is a select_and_scatter, which XLA CPU expands into slow scatter
  code (docs/performance.md). Here: the first tap equal to the window's maximum,
  then, for each residue (r, q) of the input's position modulo the strides, the
  sum of the gradients of the taps (r + sh * m, q + sw * n), shifted by (m, n),
  interleaved into the input's shape. Float32 sums, as select_and_scatter_add's
  in float32; in bfloat16, the same values up to the rounding of the sums.
  """
  x, y = residuals
  taps, (hp, wp) = _window_taps(x.astype(jnp.float32), window, strides, padding)
  y = y.astype(jnp.float32)
  first = jnp.full(y.shape, len(taps), jnp.int8)
  for t in reversed(range(len(taps))):
    first = jnp.where(taps[t] == y, jnp.int8(t), first)
  (kh, kw), (sh, sw), (n, ho, wo, c) = window, strides, y.shape
  dy, zero = dy.astype(jnp.float32), jnp.zeros((), jnp.float32)
  rows, cols = -(-hp // sh), -(-wp // sw)
  planes = []
  for r in range(sh):
    row = []
    for q in range(sw):
      plane = jnp.zeros((n, rows, cols, c), jnp.float32)
      for i in range(r, kh, sh):
        for j in range(q, kw, sw):
          g = jnp.where(first == i * kw + j, dy, zero)
          m, k = i // sh, j // sw
          plane = plane + lax.pad(g, zero, [(0, 0, 0), (m, rows - m - ho, 0),
                                            (k, cols - k - wo, 0), (0, 0, 0)])
      row.append(plane)
    planes.append(jnp.stack(row, axis=3))
  dx = jnp.stack(planes, axis=2).reshape(n, rows * sh, cols * sw, c)
  (top, _), (left, _) = padding
  return (dx[:, top:top + x.shape[1], left:left + x.shape[2]].astype(x.dtype),)


_max_pool_nhwc.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window_shape, strides, padding='VALID'):
  """`nn.max_pool` of an NHWC batch, with a gradient that XLA CPU runs fast.

  The same values and gradients as `nn.max_pool` (each window's gradient goes to
  its first maximum), about 4x faster on CPU for the ResNet's 3x3 stride-2 pooling
  (docs/performance.md). Only on CPU: accelerators keep lax's select_and_scatter.
  """
  lax_pool = lambda x: nn.max_pool(x, window_shape, strides, padding)
  if x.ndim != 4:
    return lax_pool(x)
  window, pads = tuple(window_shape), padding
  if isinstance(pads, str):
    pads = lax.padtype_to_pads(x.shape[1:3], window, tuple(strides), pads)
  cpu_pool = lambda x: _max_pool_nhwc(x, window, tuple(strides), tuple(map(tuple, pads)))
  return _on_cpu_only(cpu_pool, lax_pool, x)
