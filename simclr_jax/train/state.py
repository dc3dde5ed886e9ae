"""The train state of every training mode: its fields, its initialisation, its optimizer.

One pytree holds everything a run resumes from: parameters, BatchNorm statistics,
optimizer state, and the loop's own bookkeeping (the NT-Xent temperature, the
running epoch's loss, the best selection metric and its step), so a checkpoint is
one `TrainState` and nothing lives beside it.

Modes map to a model kind (`MODEL_KINDS`); the kind picks the optimizer: the
SimCLR model trains with SGD + momentum inside SAM/ASAM and a one-cycle cosine
schedule (the reference), the classifier with AdamW at a constant learning rate.
"""

import functools
from typing import Any

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp

from simclr_jax.model import heads
from simclr_jax.parallel import sharding
from simclr_jax.train import kinds
from simclr_jax.train import optimizers

class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the loop's bookkeeping.

  Attributes:
    batch_stats: BatchNorm running statistics.
    temperature: float32 NT-Xent temperature (the step-down lowers it).
    epoch_loss: float32 [2], (sum, count) of the running epoch's step losses.
    best_metric: float32, the best selection metric so far (-inf before any).
    best_step: int32, the step it was reached at (-1 before any).
  """
  batch_stats: Any
  temperature: jax.Array
  epoch_loss: jax.Array
  best_metric: jax.Array
  best_step: jax.Array


def create_model(config):
  return heads.create_model(config, kinds.model_kind(config),
                           freeze_encoder=kinds.is_linear_probe(config))


def init_variables(config, model, rng):
  """Initial params and batch_stats; the encoder's depend only on the seed.

  SimCLRModel and Classifier both name their ResNet `encoder`, so for one seed the
  pretraining and the baseline start from identical encoder weights.
  """
  x = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.channels), jnp.float32)
  variables = model.init({'params': rng, 'dropout': rng}, x, train=False)
  return variables['params'], variables['batch_stats']


def _new_state(config, model, tx, rng):
  params, batch_stats = init_variables(config, model, rng)
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
      temperature=jnp.float32(config.pretrain.temperature), epoch_loss=jnp.zeros(2, jnp.float32),
      best_metric=jnp.float32(-jnp.inf), best_step=jnp.int32(-1))


def create_train_state(config, model, rng, tx, mesh=None, cache=None, key=None):
  """A fresh TrainState, created on the devices already replicated over `mesh`.

  With a `cache` (compile_cache.CompileCache) and the run's step key, runs of one
  key share the compiled initialiser.
  """
  mesh = mesh or sharding.create_mesh()

  def compile_init():
    create = jax.jit(functools.partial(_new_state, config, model, tx),
                     out_shardings=sharding.replicated_sharding(mesh))
    # Initialisation runs once per run: compiled without LLVM optimisation it takes
    # seconds on a CPU instead of a minute (the random initialisers compile slowly).
    return create.lower(rng).compile({'xla_backend_optimization_level': 0})

  init = compile_init() if cache is None else cache.get('init', (key, mesh), compile_init)
  return init(rng)


def abstract_state(config, mesh):
  """The shapes, dtypes and sharding of `config`'s TrainState, to restore into."""
  model = create_model(config)
  tx = optimizers.create_optimizer(config)
  state = jax.eval_shape(functools.partial(_new_state, config, model, tx),
                         jax.random.key(config.seed))
  repl = sharding.replicated_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)


def variables(state):
  """The model variables of a state, for `model.apply`."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def replace_encoder(state, params, batch_stats):
  """`state` with its encoder's params and statistics taken from another run's."""
  new_params = flax.core.unfreeze(state.params)
  new_stats = flax.core.unfreeze(state.batch_stats)
  new_params['encoder'] = params['encoder']
  new_stats['encoder'] = batch_stats['encoder']
  return state.replace(params=new_params, batch_stats=new_stats,
                       opt_state=state.tx.init(new_params))
