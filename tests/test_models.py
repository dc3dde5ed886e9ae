"""Tests of the ResNet encoders and heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from simclr_jax.model import cpu_kernels
from simclr_jax.model import heads


def _init(model, x, seed=0):
  """model.init compiled without LLVM optimisation: seconds instead of a minute."""
  init = jax.jit(lambda key: model.init(key, x, train=False))
  key = jax.random.key(seed)
  return init.lower(key).compile({'xla_backend_optimization_level': 0})(key)


def _config(**overrides):
  config = default.get_config()
  config.update(overrides)
  return config


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
  model = heads.create_model(_config(model='resnet18', width=0.125, channels=1), 'classifier')
  image = x[..., :1]
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda v, image: jnp.sum(model.apply(v, image, train=False)), argnums=1))(variables, image))
  # On CPU the stem's pooling is differentiated without lax's select_and_scatter.
  assert ('select_and_scatter' in jaxpr) == (jax.default_backend() != 'cpu')
