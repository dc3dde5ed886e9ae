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
import json
from typing import Any

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from simclr_jax import models
from simclr_jax import sam
from simclr_jax import sharding

MODEL_KINDS = {'pretrain': 'simclr', 'finetune': 'classifier', 'baseline': 'classifier'}
TRAIN_MODES = tuple(MODEL_KINDS)
# Fields that fix the encoder's parameter shapes: a fine-tuning run must match its
# pretraining run on these.
ARCHITECTURE_FIELDS = ('model', 'width', 'encoder_output', 'channels', 'image_size')


# Config fields that change nothing a compiled step or model computes: runs whose
# configs differ only in these share their model, optimizer and compiled steps
# (every other field, known or not, is part of `run_key`).
_UNCOMPILED_FIELDS = frozenset((
    'seed', 'label_fraction', 'label_seed', 'split_scheme', 'split_seed', 'test_fraction',
    'val_fraction', 'include_test_in_pretrain', 'num_epochs', 'eval_every_epochs',
    'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'num_summary_images',
    'pretrained_workdir', 'dataset_path', 'data_dir', 'selection_metric', 'selection_split',
    'knn_k', 'precise_bn_batches', 'eval_batch_size', 'skip_unreadable', 'subject_ids',
    'subject_grouping_threshold', 'subject_grouping_k', 'subject_grouping_size',
    'nifti_slice_selection', 'nifti_num_slices', 'nifti_slice_step',
    'nifti_min_mask_fraction', 'dataset', 'fold', 'num_folds', 'task',
    'binary_negative_class', 'class_weights'))
# Fields only the other model kind's steps read.
_UNUSED_BY_KIND = {
    'simclr': frozenset(('finetune_optimizer', 'finetune_sam', 'head_dropout', 'train_augment',
                         'linear_probe')),
    'classifier': frozenset(('pretrain_optimizer', 'sam', 'joint_views', 'temperature',
                             'temperature_schedule', 'temperature_steps', 'projection_dims',
                             'projection_dropout')),
}
# The fields that make a model and the shape of its inputs (models.create_model).
_MODEL_FIELDS = ('model', 'width', 'encoder_output', 'dtype', 'projection_dims',
                 'projection_dropout', 'head_dropout', 'num_classes', 'image_size', 'channels')
_MEMO = {}


def run_key(config, total_steps):
  """What a run's model, optimizer and compiled steps depend on, as a hashable string.

  The one-cycle schedule of pretraining depends on the run's length; the
  fine-tuning schedule is constant, so fine-tuning and baseline runs of any
  length (and either arm) share one key.
  """
  kind = model_kind(config)
  fields = {k: v for k, v in json.loads(config.to_json_best_effort()).items()
            if k not in _UNCOMPILED_FIELDS and k not in _UNUSED_BY_KIND[kind]}
  fields['total_steps'] = total_steps if kind == 'simclr' else None
  fields['mode'] = kind
  fields['linear_probe'] = is_linear_probe(config)
  return json.dumps(fields, sort_keys=True)


def model_key(config):
  """What a run's model and its inference steps depend on: runs of one key share them."""
  kind = model_kind(config)
  fields = {k: config.get(k) for k in _MODEL_FIELDS if k not in _UNUSED_BY_KIND[kind]}
  fields.update(kind=kind, frozen=is_linear_probe(config))
  return json.dumps(fields, sort_keys=True, default=list)


def memoized(name, key, make):
  """`make()` once per (name, key) in this process: equal runs share one object.

  A sweep's runs then share their model and optimizer objects, hence the pytree
  structure of their states, hence their jitted steps: each shape compiles once.
  """
  if (name, key) not in _MEMO:
    _MEMO[name, key] = make()
  return _MEMO[name, key]


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


def model_kind(config):
  return MODEL_KINDS[config.mode]


def is_linear_probe(config):
  """A finetune run that trains only the head on a frozen encoder."""
  return config.mode == 'finetune' and bool(config.linear_probe)


def frozen_subtrees(config):
  """Top-level parameter subtrees that a run neither trains nor back-propagates into."""
  return ('encoder',) if is_linear_probe(config) else ()


def create_model(config):
  return models.create_model(config, model_kind(config),
                             freeze_encoder=is_linear_probe(config))


def create_learning_rate_fn(config, total_steps):
  """One-cycle cosine for pretraining (the reference); constant for fine-tuning."""
  if model_kind(config) == 'simclr':
    opt = config.pretrain_optimizer
    return optax.cosine_onecycle_schedule(
        transition_steps=max(total_steps, 2), peak_value=opt.learning_rate,
        pct_start=opt.warmup_fraction)
  return optax.constant_schedule(config.finetune_optimizer.learning_rate)


def create_optimizer(config, learning_rate_fn):
  """The mode's optimizer as one optax transformation, SAM/ASAM included.

  SGD + momentum (pretrain) or AdamW (finetune, baseline), wrapped in the SAM
  or ASAM transform of `sam.py` when `config.sam` (pretrain) or
  `config.finetune_sam` asks for it. Every transformation takes the extra
  `grad_fn` argument that SAM needs (the others ignore it). A linear probe's
  frozen encoder gets no updates (not even weight decay).
  """
  if model_kind(config) == 'simclr':
    opt = config.pretrain_optimizer
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                     optax.sgd(learning_rate_fn, momentum=opt.momentum))
    sam_mode = config.sam
  else:
    opt = config.finetune_optimizer
    tx = optax.adamw(learning_rate_fn, weight_decay=opt.weight_decay)
    sam_mode = config.finetune_sam
  frozen = frozen_subtrees(config)
  if frozen:
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        lambda params: {k: 'frozen' if k in frozen else 'train' for k in params})
  # SAM outermost: its perturbed pass sees every parameter (the frozen ones get a
  # zero gradient, hence no perturbation: see train.train_step).
  tx = sam.wrap(tx, sam_mode, config.sam_rho, eta=config.sam_eta)
  return optax.with_extra_args_support(tx)


def init_variables(config, model, rng):
  """Initial params and batch_stats; the encoder's depend only on the seed.

  SimCLRModel and Classifier both name their ResNet `encoder`, so for one seed the
  pretraining and the baseline start from identical encoder weights.
  """
  x = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
  variables = model.init({'params': rng, 'dropout': rng}, x, train=False)
  return variables['params'], variables['batch_stats']


def _new_state(config, model, tx, rng):
  params, batch_stats = init_variables(config, model, rng)
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
      temperature=jnp.float32(config.temperature), epoch_loss=jnp.zeros(2, jnp.float32),
      best_metric=jnp.float32(-jnp.inf), best_step=jnp.int32(-1))


def create_train_state(config, model, rng, tx, mesh=None, key=None):
  """A fresh TrainState, created on the devices already replicated over `mesh`.

  With a `run_key`, runs of one key in the process share the compiled initialiser.
  """
  mesh = mesh or sharding.create_mesh()

  def compile_init():
    create = jax.jit(functools.partial(_new_state, config, model, tx),
                     out_shardings=sharding.replicated_sharding(mesh))
    # Initialisation runs once per run: compiled without LLVM optimisation it takes
    # seconds on a CPU instead of a minute (the random initialisers compile slowly).
    return create.lower(rng).compile({'xla_backend_optimization_level': 0})

  init = compile_init() if key is None else memoized('init', (key, mesh), compile_init)
  return init(rng)


def abstract_state(config, mesh):
  """The shapes, dtypes and sharding of `config`'s TrainState, to restore into."""
  model = create_model(config)
  tx = create_optimizer(config, create_learning_rate_fn(config, 2))
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
