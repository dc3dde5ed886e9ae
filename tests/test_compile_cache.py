"""The compile cache: runs share compiled steps exactly when their shapes agree."""

import jax
import pytest

from simclr_jax.parallel import sharding
from simclr_jax.train import compile_cache
from simclr_jax.train import optimizers
from simclr_jax.train import state as state_lib
from simclr_jax.train import steps as steps_lib
from tests.conftest import tiny_config

# Fields that change what a compiled step computes or the shapes it takes.
SHAPING = [('data.image_size', 64), ('data.channels', 3), ('model.width', 0.25),
           ('model.name', 'resnet34'), ('model.dtype', 'bfloat16'),
           ('augment.crop_scale', (0.2, 1.0)), ('train.batch_size', 8),
           ('train.steps_per_dispatch', 4), ('data.on_device', 'False'),
           ('supervised.optimizer.learning_rate', 0.5), ('supervised.sam', 'asam'),
           ('supervised.head_dropout', 0.1), ('model.num_classes', 2)]
# Fields that are data to the same compiled step.
NOT_SHAPING = [('seed', 3), ('labels.fraction', 0.5), ('labels.seed', 2), ('split.fold', 1),
               ('split.seed', 4), ('train.num_epochs', 9), ('eval.every_epochs', 3),
               ('eval.selection_split', 'test'), ('labels.class_weights', 'none'),
               ('finetune.pretrained_workdir', '/elsewhere'), ('data.path', '/x.zip'),
               ('labels.unit', 'subject'), ('labels.subjects', 4)]


@pytest.mark.parametrize('field,value', SHAPING)
def test_a_field_that_shapes_the_step_changes_its_key(field, value):
  config = tiny_config('/unused', 'baseline')
  other = tiny_config('/unused', 'baseline', **{field: value})
  assert compile_cache.step_key(config) != compile_cache.step_key(other), field


@pytest.mark.parametrize('field,value', NOT_SHAPING)
def test_a_field_that_is_data_keeps_the_key(field, value):
  config = tiny_config('/unused', 'baseline')
  other = tiny_config('/unused', 'baseline', **{field: value})
  assert compile_cache.step_key(config) == compile_cache.step_key(other), field


def test_pretraining_keys_follow_their_own_section_not_the_length():
  config = tiny_config('/unused', 'pretrain')
  key = compile_cache.step_key(config)
  # The one-cycle schedule's length is a runtime value (optimizers.schedule_values).
  assert key == compile_cache.step_key(tiny_config('/unused', 'pretrain', num_epochs=7))
  for field, value in (('pretrain.temperature', 0.1), ('pretrain.sam_rho', 0.5),
                       ('pretrain.projection_dims', (8, 4)), ('pretrain.joint_views', False)):
    assert key != compile_cache.step_key(tiny_config('/unused', 'pretrain', **{field: value})), field
  # The classifier's settings do not shape the SimCLR step, nor the reverse.
  assert key == compile_cache.step_key(
      tiny_config('/unused', 'pretrain', **{'supervised.optimizer.learning_rate': 0.5}))
  assert compile_cache.step_key(config) != compile_cache.step_key(
      tiny_config('/unused', 'baseline'))


def test_runs_of_another_shape_never_reuse_a_compiled_step():
  """One cache, three runs: equal keys share the jitted steps, another shape gets its own."""
  cache = compile_cache.CompileCache()
  mesh = sharding.create_mesh()

  def steps_of(config):
    model = cache.get('model', compile_cache.model_key(config),
                      lambda: state_lib.create_model(config))
    key = compile_cache.step_key(config)
    return key, steps_lib.make_train_steps(config, steps_lib.objective(config, model), mesh,
                                           cache, key)

  key, first = steps_of(tiny_config('/unused', 'baseline'))
  same_key, same = steps_of(tiny_config('/unused', 'baseline', seed=5, label_fraction=0.5))
  other_key, other = steps_of(tiny_config('/unused', 'baseline', image_size=64))
  assert key == same_key and same is first
  assert other_key != key and other is not first
  assert len([name for name, _ in cache.names() if name == 'train_steps']) == 2
  # The other shape's step really runs on its own shapes (64 px inputs).
  config = tiny_config('/unused', 'baseline', image_size=64)
  model = cache.get('model', compile_cache.model_key(config), lambda: None)
  tx = optimizers.create_optimizer(config)
  state = state_lib.create_train_state(config, model, jax.random.key(0), tx, mesh)
  state, metrics = other(state, *steps_lib.example_arguments(config, mesh, 1))
  assert int(state.step) == 1 and bool(jax.numpy.isfinite(metrics.compute()['loss']))
