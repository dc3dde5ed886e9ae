"""ResNet encoders, SimCLR projection head and classification head in Flax linen.

The ResNet follows the Flax ImageNet example (and torchvision, which the reference
used): a 7x7 stride-2 stem with max pooling, four stages, BatchNorm everywhere.
At 128 px the last stage is a 4 x 4 map, so the reference's flattened encoder output
of ResNet-50 has 2048 * 4 * 4 = 32,768 values.

Both `SimCLRModel` and `Classifier` hold their ResNet as the submodule `encoder`,
so fine-tuning copies `params['encoder']` and `batch_stats['encoder']` from a
pretraining checkpoint. Each stage's output is sown into the `intermediates`
collection and marked with `perturb`, so Grad-CAM can take gradients with respect
to the activations of any stage (`stage1` .. `stage4`).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from simclr_jax import errors

ModuleDef = Any

STAGE_SIZES = {
    'resnet18': (2, 2, 2, 2),
    'resnet34': (3, 4, 6, 3),
    'resnet50': (3, 4, 6, 3),
}
ENCODER_OUTPUTS = ('flatten', 'avgpool')
# Running averages: stat <- BN_MOMENTUM * stat + (1 - BN_MOMENTUM) * batch stat (PyTorch's 0.1).
BN_MOMENTUM = 0.9
_NHWC = ('NHWC', 'HWIO', 'NHWC')
_MIN_CHANNELS = 16


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


def _conv_forward(x, kernel, strides, padding, precision):
  if _is_pointwise(kernel, padding):
    # A 1x1 convolution is a product over channels; XLA CPU runs it as a matrix
    # product 2x faster than as a convolution (docs/performance.md).
    x = x[:, ::strides[0], ::strides[1]]
    return _dot(x, kernel[0, 0], ((3,), (0,)), precision)
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
  image) runs 5-10x slower (docs/performance.md).
  """
  (kh, kw), (sh, sw), (_, ho, wo, features) = window, strides, dy.shape
  channels = x.shape[3]
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
  dx = _input_gradient(x, kernel, dy, strides, padding, precision)
  dkernel = _kernel_gradient(x, dy, kernel.shape[:2], strides, padding, precision)
  return dx, dkernel.astype(kernel.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated` computed the way XLA CPU runs fastest.

  On CPU, for a plain (undilated, ungrouped) NHWC convolution of at least 16
  input channels, the kernel gradient is one matrix product per kernel tap and a
  1x1 convolution is a matrix product over channels: the same sums in another
  order, 3x faster for a ResNet-50 step. Other convolutions, and every
  convolution on an accelerator, go to lax unchanged.
  """
  plain = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
           and feature_group_count == 1 and not kwargs
           and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ())))
  # On a few input channels (the stem's RGB or gray image) lax's own gradient is
  # faster; accelerators keep their convolution libraries (cuDNN).
  if not plain or lhs.shape[3] < _MIN_CHANNELS or jax.default_backend() != 'cpu':
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return _conv_nhwc(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision)


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
  if x.ndim != 4 or jax.default_backend() != 'cpu':
    return nn.max_pool(x, window_shape, strides, padding)
  window, strides = tuple(window_shape), tuple(strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  return _max_pool_nhwc(x, window, strides, tuple(map(tuple, padding)))


class _Block(nn.Module):
  """What the residual blocks share: their fields and the shortcut."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  def shortcut_sum(self, residual, y):
    """act(residual + y), the residual projected where its shape differs from y's."""
    if residual.shape != y.shape:
      residual = self.conv(y.shape[-1], (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return self.act(residual + y)


class ResNetBlock(_Block):
  """Basic two-convolution residual block (ResNet-18/34)."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    return self.shortcut_sum(x, y)


class BottleneckResNetBlock(_Block):
  """Bottleneck residual block (ResNet-50), stride on the 3x3 convolution."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (1, 1))(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), self.strides)(y)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    return self.shortcut_sum(x, y)


class ResNet(nn.Module):
  """ResNet encoder returning the final feature map [N, h, w, C]."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             conv_general_dilated=conv_general_dilated)
    # BatchNorm statistics over the global batch: under jit with a sharded batch XLA
    # reduces across devices, so no axis_name is needed.
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
        epsilon=1e-5, dtype=self.dtype)
    num_filters = max(1, int(round(64 * self.width)))
    x = x.astype(self.dtype)
    x = conv(num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
    x = norm(name='bn_init')(x)
    x = nn.relu(x)
    x = max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(num_filters * 2**i, strides=strides, conv=conv,
                           norm=norm, act=nn.relu)(x)
      name = f'stage{i + 1}'
      x = self.perturb(name, x)
      self.sow('intermediates', name, x)
    return x


def encoder_features(feature_map, encoder_output):
  """Turns the final map into the encoder's output vector h."""
  if encoder_output == 'avgpool':
    return jnp.mean(feature_map, axis=(1, 2))
  return feature_map.reshape((feature_map.shape[0], -1))


class ProjectionHead(nn.Module):
  """SimCLR projection MLP: [Dropout -> Dense -> ReLU]* -> Dropout -> Dense.

  With dims (256, 128) and dropout 0.5 this is the reference's
  Dropout(0.5) -> Linear(32768, 256) -> Dropout(0.5) -> Linear(256, 128).
  """
  dims: Sequence[int] = (256, 128)
  dropout: float = 0.5

  @nn.compact
  def __call__(self, h, train: bool = True):
    z = h.astype(jnp.float32)
    for i, dim in enumerate(self.dims):
      z = nn.Dropout(self.dropout, deterministic=not train)(z)
      z = nn.Dense(dim, name=f'dense{i}')(z)
      if i < len(self.dims) - 1:
        z = nn.relu(z)
    return z


class ClassifierHead(nn.Module):
  """The reference's classification head: Dropout -> Dense(num_classes)."""
  num_classes: int
  dropout: float = 0.5

  @nn.compact
  def __call__(self, h, train: bool = True):
    h = nn.Dropout(self.dropout, deterministic=not train)(h.astype(jnp.float32))
    return nn.Dense(self.num_classes, name='dense')(h)


class SimCLRModel(nn.Module):
  """Encoder + projection head; returns (h, z)."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  width: float = 1.0
  encoder_output: str = 'flatten'
  projection_dims: Sequence[int] = (256, 128)
  projection_dropout: float = 0.5
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = ResNet(self.stage_sizes, self.block_cls, self.width, self.dtype)
    self.projection = ProjectionHead(self.projection_dims, self.projection_dropout)

  def __call__(self, x, train: bool = True):
    h = encoder_features(self.encoder(x, train), self.encoder_output)
    return h.astype(jnp.float32), self.projection(h, train)

  def embed(self, x):
    """Encoder output h in inference mode (the kNN monitor's embedding)."""
    return encoder_features(self.encoder(x, False), self.encoder_output).astype(jnp.float32)


class Classifier(nn.Module):
  """Encoder + classification head; returns logits."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  width: float = 1.0
  encoder_output: str = 'flatten'
  head_dropout: float = 0.5
  dtype: Any = jnp.float32
  freeze_encoder: bool = False

  def setup(self):
    self.encoder = ResNet(self.stage_sizes, self.block_cls, self.width, self.dtype)
    self.head = ClassifierHead(self.num_classes, self.head_dropout)

  def __call__(self, x, train: bool = True):
    # A linear probe runs the encoder in inference mode: frozen weights and
    # frozen BatchNorm statistics.
    fmap = self.encoder(x, train and not self.freeze_encoder)
    return self.head(encoder_features(fmap, self.encoder_output), train)


def _architecture(name):
  if name not in STAGE_SIZES:
    raise errors.UserError(
        f'Unknown model {name!r}; set --config.model to one of {sorted(STAGE_SIZES)}.')
  block = BottleneckResNetBlock if name == 'resnet50' else ResNetBlock
  return STAGE_SIZES[name], block


def _dtype(name):
  if name not in ('float32', 'bfloat16'):
    raise errors.UserError(f'Unknown dtype {name!r}; set --config.dtype to float32 or bfloat16.')
  return jnp.bfloat16 if name == 'bfloat16' else jnp.float32


def create_model(config, kind, freeze_encoder=False):
  """Builds the SimCLR model (kind='simclr') or the classifier (kind='classifier').

  `freeze_encoder` (a linear probe) runs the classifier's encoder in inference mode.
  """
  stage_sizes, block_cls = _architecture(config.model)
  if config.encoder_output not in ENCODER_OUTPUTS:
    raise errors.UserError(
        f'Unknown encoder_output {config.encoder_output!r}; set '
        f'--config.encoder_output to one of {ENCODER_OUTPUTS}.')
  common = dict(stage_sizes=stage_sizes, block_cls=block_cls, width=config.width,
                encoder_output=config.encoder_output, dtype=_dtype(config.dtype))
  if kind == 'simclr':
    return SimCLRModel(projection_dims=tuple(config.projection_dims),
                       projection_dropout=config.projection_dropout, **common)
  if kind == 'classifier':
    return Classifier(num_classes=config.num_classes, head_dropout=config.head_dropout,
                      freeze_encoder=freeze_encoder, **common)
  raise ValueError(f'Unknown model kind {kind!r}; use simclr or classifier.')
