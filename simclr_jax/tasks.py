"""What each training mode is made of, built once from the config: the one dispatch.

`create_task(config, mesh)` is the only place that asks `config.mode`. It returns a
`Task`: the data roles, the model, the loss, the batches, the evaluators, the key
that selects the best checkpoint, and the hooks the loop calls (at a fresh start,
at the end of each epoch, before each evaluation). `train.py` runs any task the
same way.

- `pretrain`: SimCLR, two augmented views of each image, NT-Xent; the kNN monitor
  on the selection split; the reference's temperature step-down at epoch ends.
- `finetune`: the encoder of a pretrain run, a new classification head, cross
  entropy on a labeled subset; classification metrics.
- `baseline`: the same from the same random initialisation as pretraining.
"""

import dataclasses
import functools
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import data as data_lib
from simclr_jax import evaluate
from simclr_jax import input_pipeline
from simclr_jax import losses
from simclr_jax import models
from simclr_jax import runs
from simclr_jax import sam
from simclr_jax import sharding
from simclr_jax import splits as splits_lib
from simclr_jax import state as state_lib


@dataclasses.dataclass
class Data:
  """What a training run reads: the arrays, the split indices and their roles."""
  arrays: data_lib.DatasetArrays
  splits: dict
  train_idx: np.ndarray  # Pretraining images, or the labeled subset.
  select_idx: np.ndarray  # Model selection (validation, or test in the reference protocol).


@dataclasses.dataclass
class Task:
  """The pieces of one training mode (see the module docstring).

  Attributes:
    config: the run's config, completed (num_classes from the data set).
    data: the data set and the role of each split.
    model: the Flax module trained.
    loss_fn: (params, batch_stats, batch, rng, temperature) -> (loss, (new
      batch_stats, accuracy)); jittable.
    make_batches: start_step -> iterator of per-process numpy training batches.
    infer_step: (state, images) -> logits or embeddings; jittable.
    selection: evaluator of the selection split.
    test: evaluator of the test split (run once, on the chosen checkpoint).
    selection_key: the metric of `selection.run` that picks the best checkpoint.
    start: state -> state of a fresh run (fine-tuning loads the encoder here).
    epoch_end: state -> state at the end of every epoch; jittable.
    before_eval: state -> state before every evaluation (precise BatchNorm).
  """
  config: ml_collections.ConfigDict
  data: Data
  model: nn.Module
  loss_fn: Callable
  make_batches: Callable[[int], Any]
  infer_step: Callable
  selection: Any
  test: Any
  selection_key: str
  start: Callable
  epoch_end: Callable
  before_eval: Callable


def check_config(config):
  """Rejects a training config a run cannot use, in one sentence naming the fix."""
  if config.mode not in state_lib.TRAIN_MODES:
    raise ValueError(f'Unknown mode {config.mode!r} for training; set --config.mode to '
                     f'one of {state_lib.TRAIN_MODES}.')
  models.create_model(config, 'simclr')  # Validates model, dtype, encoder_output.
  if not 0.0 < config.label_fraction <= 1.0:
    raise ValueError(f'label_fraction {config.label_fraction} is outside (0, 1]; set '
                     '--config.label_fraction to e.g. 0.1 for 10 % of the labels.')
  sam.check_mode(config.sam)
  if config.selection_split not in ('val', 'test'):
    raise ValueError(f'Unknown selection_split {config.selection_split!r}; use val '
                     '(or test only to reproduce the reference protocol).')
  if config.num_epochs < 1:
    raise ValueError('num_epochs must be at least 1; set --config.num_epochs.')
  if config.precise_bn_batches is not None and config.precise_bn_batches < 1:
    raise ValueError(f'precise_bn_batches={config.precise_bn_batches} must be positive; '
                     'set it to e.g. 8, or to None for running averages.')
  sharding.check_batch_size(config.batch_size, 'batch_size')
  sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  if config.mode == 'finetune':
    runs.pretrained_config(config)  # Fails early if the pretrain run is unusable.


# ----------------------------------------------------------------------------- losses


def pretrain_loss_fn(params, batch_stats, batch, rng, temperature, *, apply_fn,
                     joint_views):
  """NT-Xent of the two views; returns (loss, (new batch_stats, accuracy))."""
  variables = {'params': params, 'batch_stats': batch_stats}
  image1, image2 = batch['image1'], batch['image2']
  if joint_views:
    # Both views in one pass, BatchNorm over the 2N views (SimCLR's own choice).
    # Interleaving keeps each device's rows local: device d holds rows of both views.
    n = image1.shape[0]
    x = jnp.stack([image1, image2], axis=1).reshape((2 * n,) + image1.shape[1:])
    (_, z), updates = apply_fn(variables, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': rng})
    z = z.reshape((n, 2, -1))
    z1, z2 = z[:, 0], z[:, 1]
    new_stats = updates['batch_stats']
  else:
    # The reference: two separate calls, BatchNorm statistics per view batch.
    rng1, rng2 = jax.random.split(rng)
    (_, z1), updates = apply_fn(variables, image1, train=True, mutable=['batch_stats'],
                                rngs={'dropout': rng1})
    variables = {'params': params, 'batch_stats': updates['batch_stats']}
    (_, z2), updates = apply_fn(variables, image2, train=True, mutable=['batch_stats'],
                                rngs={'dropout': rng2})
    new_stats = updates['batch_stats']
  loss = losses.nt_xent_loss(z1, z2, temperature)
  return loss, (new_stats, losses.nt_xent_accuracy(z1, z2))


def supervised_loss_fn(params, batch_stats, batch, rng, temperature, *, apply_fn):
  """Cross entropy; returns (loss, (new batch_stats, accuracy))."""
  del temperature
  logits, updates = apply_fn({'params': params, 'batch_stats': batch_stats},
                             batch['image'], train=True, mutable=['batch_stats'],
                             rngs={'dropout': rng})
  loss = losses.cross_entropy_loss(logits, batch['label'])
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return loss, (updates['batch_stats'], accuracy)


def temperature_step_down(state, *, base, steps):
  """The reference's one-way step-down from the finished epoch's mean loss."""
  epoch_loss = state.epoch_loss[0] / jnp.maximum(state.epoch_loss[1], 1.0)
  temperature = losses.temperature_for_loss(epoch_loss, base, steps)
  return state.replace(temperature=jnp.minimum(state.temperature, temperature))


def _unchanged(state):
  return state


def objective(config, model):
  """(loss_fn, epoch_end) of the mode: what its train step minimises, and its epoch hook.

  Needs no data, so benchmarks build the real train step from it.
  """
  if state_lib.model_kind(config) == 'simclr':
    epoch_end = (functools.partial(temperature_step_down, base=config.temperature,
                                   steps=tuple(map(tuple, config.temperature_steps)))
                 if config.temperature_schedule else _unchanged)
    return functools.partial(pretrain_loss_fn, apply_fn=model.apply,
                             joint_views=config.joint_views), epoch_end
  return functools.partial(supervised_loss_fn, apply_fn=model.apply), _unchanged


# ----------------------------------------------------------------------------- tasks


def create_task(config, mesh):
  """Checks `config` and builds its mode's Task (data loaded, evaluators ready)."""
  config = ml_collections.ConfigDict(config)  # A copy we may complete.
  check_config(config)
  arrays = data_lib.load_arrays(config)
  config.num_classes = len(arrays.class_names)
  splits = splits_lib.load_splits(config, arrays)
  if config.selection_split == 'test':
    logging.warning('Model selection on the TEST split: this reproduces the reference '
                    'protocol and overstates accuracy; use selection_split=val.')
  build = {'pretrain': _pretrain_task, 'finetune': _supervised_task,
           'baseline': _supervised_task}[config.mode]
  return build(config, arrays, splits, mesh)


def _infer(config, mesh, infer_step, arrays):
  """(state, idx) -> outputs of `infer_step` over those rows, jitted over the mesh."""
  step = jax.jit(infer_step, in_shardings=(sharding.replicated_sharding(mesh),
                                           sharding.data_sharding(mesh)),
                 out_shardings=sharding.data_sharding(mesh))
  return lambda state, idx: evaluate.predict(step, state, arrays, idx, config, mesh)


def _batches(batch_fn, arrays, idx, config):
  return functools.partial(batch_fn, arrays, idx, config, seed=config.seed,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())


def _precise_bn(config, arrays, train_idx, mesh):
  # A linear probe's encoder keeps its pretrained statistics.
  if not config.precise_bn_batches or state_lib.is_linear_probe(config):
    return _unchanged
  return evaluate.PreciseBatchStats(arrays, train_idx, config, mesh)


def _embed_step(state, images):
  return state.apply_fn(state_lib.variables(state), images, method='embed')


def _logits_step(state, images):
  return state.apply_fn(state_lib.variables(state), images, train=False)


def _pretrain_task(config, arrays, splits, mesh):
  train_idx = splits_lib.pretrain_indices(splits, config.include_test_in_pretrain)
  data = Data(arrays, splits, train_idx, splits[config.selection_split])
  model = state_lib.create_model(config)
  infer = _infer(config, mesh, _embed_step, arrays)

  def knn(idx):
    return evaluate.KnnEvaluator(infer, idx, splits['train'], arrays.labels,
                                 tuple(config.knn_k), config.num_classes)

  k = config.knn_k[1] if len(config.knn_k) > 1 else config.knn_k[0]
  suffix = 'balanced_accuracy' if config.selection_metric == 'balanced_accuracy' else 'accuracy'
  loss_fn, epoch_end = objective(config, model)
  return Task(
      config=config, data=data, model=model, loss_fn=loss_fn,
      make_batches=_batches(input_pipeline.pretrain_batches, arrays, train_idx, config),
      infer_step=_embed_step, selection=knn(data.select_idx), test=knn(splits['test']),
      selection_key=f'knn{k}_{suffix}', start=_unchanged, epoch_end=epoch_end,
      before_eval=_precise_bn(config, arrays, train_idx, mesh))


def _supervised_task(config, arrays, splits, mesh):
  train_idx = splits_lib.label_subset(arrays.labels, splits['train'], config.label_fraction,
                                      config.label_seed)
  data = Data(arrays, splits, train_idx, splits[config.selection_split])
  model = state_lib.create_model(config)
  infer = _infer(config, mesh, _logits_step, arrays)

  def classifier(idx):
    return evaluate.ClassifierEvaluator(infer, idx, arrays.labels, config.num_classes)

  start = (functools.partial(runs.load_pretrained_encoder, config, mesh=mesh)
           if config.mode == 'finetune' else _unchanged)
  loss_fn, epoch_end = objective(config, model)
  return Task(
      config=config, data=data, model=model, loss_fn=loss_fn,
      make_batches=_batches(input_pipeline.supervised_batches, arrays, train_idx, config),
      infer_step=_logits_step, selection=classifier(data.select_idx),
      test=classifier(splits['test']), selection_key=config.selection_metric,
      start=start, epoch_end=epoch_end,
      before_eval=_precise_bn(config, arrays, train_idx, mesh))
