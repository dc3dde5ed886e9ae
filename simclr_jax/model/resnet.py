"""ResNet-18/34/50 encoders in Flax linen.

The ResNet follows the Flax ImageNet example (and torchvision, which the reference
used): a 7x7 stride-2 stem with max pooling, four stages, BatchNorm everywhere.
At 128 px the last stage is a 4 x 4 map, so the reference's flattened encoder output
of ResNet-50 has 2048 * 4 * 4 = 32,768 values. Each stage's output is sown into the
`intermediates` collection and marked with `perturb`, so Grad-CAM can take gradients
with respect to the activations of any stage (`stage1` .. `stage4`).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax.model import cpu_kernels

ModuleDef = Any

STAGE_SIZES = {
    'resnet18': (2, 2, 2, 2),
    'resnet34': (3, 4, 6, 3),
    'resnet50': (3, 4, 6, 3),
}
# Running averages: stat <- BN_MOMENTUM * stat + (1 - BN_MOMENTUM) * batch stat (PyTorch's 0.1).
BN_MOMENTUM = 0.9

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
                             conv_general_dilated=cpu_kernels.conv_general_dilated)
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
    x = cpu_kernels.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(num_filters * 2**i, strides=strides, conv=conv,
                           norm=norm, act=nn.relu)(x)
      name = f'stage{i + 1}'
      x = self.perturb(name, x)
      self.sow('intermediates', name, x)
    return x
