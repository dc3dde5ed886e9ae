"""The two networks a run trains, and their heads.

`SimCLRModel` (encoder + SimCLR projection head, pretraining) and `Classifier`
(encoder + classification head, fine-tuning and the baseline) both hold their
ResNet as the submodule `encoder`, so fine-tuning copies `params['encoder']` and
`batch_stats['encoder']` from a pretraining checkpoint. `create_model` builds either
from the config's `model` section.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax import errors
from simclr_jax.model import resnet

ModuleDef = Any

ENCODER_OUTPUTS = ('flatten', 'avgpool')

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
    self.encoder = resnet.ResNet(self.stage_sizes, self.block_cls, self.width, self.dtype)
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
    self.encoder = resnet.ResNet(self.stage_sizes, self.block_cls, self.width, self.dtype)
    self.head = ClassifierHead(self.num_classes, self.head_dropout)

  def __call__(self, x, train: bool = True):
    # A linear probe runs the encoder in inference mode: frozen weights and
    # frozen BatchNorm statistics.
    fmap = self.encoder(x, train and not self.freeze_encoder)
    return self.head(encoder_features(fmap, self.encoder_output), train)


def _architecture(name):
  if name not in resnet.STAGE_SIZES:
    raise errors.UserError(
        f'Unknown model {name!r}; set --config.model.name to one of {sorted(resnet.STAGE_SIZES)}.')
  block = resnet.BottleneckResNetBlock if name == 'resnet50' else resnet.ResNetBlock
  return resnet.STAGE_SIZES[name], block


def compute_dtype(name):
  """The compute dtype of `model.dtype`: 'auto' is bfloat16 on GPUs and TPUs, float32 on CPU."""
  if name not in ('float32', 'bfloat16', 'auto'):
    raise errors.UserError(f'Unknown dtype {name!r}; set --config.model.dtype to float32, '
                           'bfloat16 or auto.')
  if name == 'auto':
    name = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return jnp.bfloat16 if name == 'bfloat16' else jnp.float32


def create_model(config, kind, freeze_encoder=False):
  """Builds the SimCLR model (kind='simclr') or the classifier (kind='classifier').

  `freeze_encoder` (a linear probe) runs the classifier's encoder in inference mode.
  """
  stage_sizes, block_cls = _architecture(config.model.name)
  if config.model.encoder_output not in ENCODER_OUTPUTS:
    raise errors.UserError(
        f'Unknown encoder_output {config.model.encoder_output!r}; set '
        f'--config.model.encoder_output to one of {ENCODER_OUTPUTS}.')
  common = dict(stage_sizes=stage_sizes, block_cls=block_cls, width=config.model.width,
                encoder_output=config.model.encoder_output, dtype=compute_dtype(config.model.dtype))
  if kind == 'simclr':
    return SimCLRModel(projection_dims=tuple(config.pretrain.projection_dims),
                       projection_dropout=config.pretrain.projection_dropout, **common)
  if kind == 'classifier':
    return Classifier(num_classes=config.model.num_classes, head_dropout=config.supervised.head_dropout,
                      freeze_encoder=freeze_encoder, **common)
  raise ValueError(f'Unknown model kind {kind!r}; use simclr or classifier.')
