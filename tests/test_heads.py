"""Tests of the two networks (SimCLRModel, Classifier), their ResNet encoders and heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from simclr_jax.model import heads
from tests.conftest import with_fields


def _init(model, x, seed=0):
  """model.init compiled without LLVM optimisation: seconds instead of a minute."""
  init = jax.jit(lambda key: model.init(key, x, train=False))
  key = jax.random.key(seed)
  return init.lower(key).compile({'xla_backend_optimization_level': 0})(key)


def _config(**overrides):
  return with_fields(default.get_config(), **overrides)


@pytest.mark.parametrize('name,channels', [('resnet18', 1), ('resnet34', 3), ('resnet50', 3)])
def test_feature_map_and_flattened_output_sizes(name, channels):
  config = _config(model=name, width=1.0, channels=channels)
  model = heads.create_model(config, 'simclr')
  x = jnp.zeros((1, 128, 128, channels))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  (h, z) = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  final_channels = 2048 if name == 'resnet50' else 512
  # The reference's flattened 2048 x 4 x 4 map at 128 px.
  assert h.shape == (1, final_channels * 4 * 4)
  assert z.shape == (1, 128)
  assert variables['params']['projection']['dense0']['kernel'].shape == (final_channels * 16, 256)


def test_width_multiplier_and_avgpool():
  config = _config(model='resnet18', width=0.25, encoder_output='avgpool')
  model = heads.create_model(config, 'classifier')
  x = jnp.zeros((2, 32, 32, 3))
  variables = _init(model, x)
  logits = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  assert logits.shape == (2, 4)
  assert variables['params']['encoder']['conv_init']['kernel'].shape == (7, 7, 3, 16)
  assert variables['params']['head']['dense']['kernel'].shape == (128, 4)


def test_same_seed_gives_same_encoder_in_both_arms():
  config = _config(model='resnet18', width=0.125, encoder_output='avgpool')
  x = jnp.zeros((1, 32, 32, 3))
  def init(kind):
    model = heads.create_model(config, kind)
    return _init(model, x, seed=3)
  simclr, classifier = init('simclr'), init('classifier')
  leaves_a = jax.tree.leaves(simclr['params']['encoder'])
  leaves_b = jax.tree.leaves(classifier['params']['encoder'])
  assert all(np.array_equal(a, b) for a, b in zip(leaves_a, leaves_b))


def test_stages_are_sown_and_perturbable():
  config = _config(model='resnet18', width=0.125)
  model = heads.create_model(config, 'classifier')
  x = jnp.ones((1, 64, 64, 1))
  variables = _init(model, x)
  _, state = jax.jit(lambda v: model.apply(v, x, train=False, mutable=['intermediates']))(
      {k: variables[k] for k in ('params', 'batch_stats')})
  shapes = {k: v[0].shape for k, v in state['intermediates']['encoder'].items()}
  assert shapes == {'stage1': (1, 16, 16, 8), 'stage2': (1, 8, 8, 16),
                    'stage3': (1, 4, 4, 32), 'stage4': (1, 2, 2, 64)}
  assert set(variables['perturbations']['encoder']) == set(shapes)


def test_bfloat16_compute_keeps_float32_params():
  config = _config(model='resnet18', width=0.125, dtype='bfloat16')
  model = heads.create_model(config, 'classifier')
  x = jnp.ones((2, 32, 32, 1))
  variables = _init(model, x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables['params']))
  assert jax.jit(lambda v: model.apply(v, x, train=False))(variables).dtype == jnp.float32


@pytest.mark.parametrize('field,value,needle', [
    ('model', 'resnet101', '--config.model.name'),
    ('dtype', 'float16', '--config.model.dtype'),
    ('encoder_output', 'gap', '--config.model.encoder_output'),
])
def test_bad_architecture_is_one_clear_error(field, value, needle):
  with pytest.raises(ValueError, match=needle):
    heads.create_model(_config(**{field: value}), 'simclr')
