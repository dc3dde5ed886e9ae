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

from simclr_jax import augment
from simclr_jax import checks
from simclr_jax import data as data_lib
from simclr_jax import evaluate
from simclr_jax import input_pipeline
from simclr_jax import losses
from simclr_jax import runs
from simclr_jax import sharding
from simclr_jax import splits as splits_lib
from simclr_jax import state as state_lib


@dataclasses.dataclass
class Data:
  """What a training run reads: the arrays, the split indices and their roles."""
  arrays: data_lib.DatasetArrays
  labels: np.ndarray  # int32 [N] labels of the run's task (config.task).
  class_names: list  # Class names of the run's task.
  splits: dict
  train_idx: np.ndarray  # Pretraining images, or the labeled subset.
  select_idx: np.ndarray  # Model selection (validation, or test in the reference protocol).

  @property
  def selection_classes(self):
    """The classes present in the selection split (the selection metric averages these)."""
    present = np.unique(self.labels[self.select_idx])
    return [self.class_names[k] for k in present]


@dataclasses.dataclass
class Task:
  """The pieces of one training mode (see the module docstring).

  Attributes:
    config: the run's config, completed (num_classes from the data set).
    key: `state.run_key` of the run: runs with one key share compiled steps.
    data: the data set and the role of each split.
    model: the Flax module trained.
    loss_fn: (params, batch_stats, batch, rng, temperature) -> (loss, (new
      batch_stats, accuracy)); jittable.
    make_batch: (uint8 images, labels, stream positions, augmentation key,
      run values) -> the batch `loss_fn` takes (augmented views, labels, example
      weights); jittable.
    run_values: arrays the compiled steps take as inputs because they differ
      between runs that share them (the class weights of the labeled subset).
    rows: the training rows and how batches walk them.
    device_data: the data set's images for the jitted steps.
    infer_step: (state, model inputs) -> logits or embeddings; jittable.
    selection: evaluator of the selection split.
    test: evaluator of the test split (run once, on the chosen checkpoint).
    selection_key: the metric of `selection.run` that picks the best checkpoint.
    start: state -> state of a fresh run (fine-tuning loads the encoder here).
    epoch_end: state -> state at the end of every epoch; jittable.
    before_eval: state -> state before every evaluation (precise BatchNorm).
  """
  config: ml_collections.ConfigDict
  key: str
  data: Data
  model: nn.Module
  loss_fn: Callable
  make_batch: Callable
  run_values: dict
  rows: input_pipeline.TrainingRows
  device_data: input_pipeline.DeviceData
  infer_step: Callable
  selection: Any
  test: Any
  selection_key: str
  start: Callable
  epoch_end: Callable
  before_eval: Callable


def check_config(config):
  """Rejects a training config a run cannot use, in one sentence naming the fix."""
  checks.check_train_config(config)


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
  """Cross entropy weighted by batch['weight']; returns (loss, (new batch_stats, accuracy))."""
  del temperature
  logits, updates = apply_fn({'params': params, 'batch_stats': batch_stats},
                             batch['image'], train=True, mutable=['batch_stats'],
                             rngs={'dropout': rng})
  loss = losses.cross_entropy_loss(logits, batch['label'], batch.get('weight'))
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
  labels, class_names = data_lib.task_labels(arrays, config)
  config.num_classes = len(class_names)
  # Splits and label subsets follow the data set's own classes for either task.
  splits = splits_lib.load_splits(config, arrays)
  if config.selection_split == 'test':
    logging.warning('Model selection on the TEST split: this reproduces the reference '
                    'protocol and overstates accuracy; use selection_split=val.')
  build = {'pretrain': _pretrain_task, 'finetune': _supervised_task,
           'baseline': _supervised_task}[config.mode]
  device_data = input_pipeline.DeviceData(arrays, mesh, config.data_on_device, labels=labels)
  task = build(config, Data(arrays, labels, class_names, splits, *_train_and_select(
      config, arrays, splits)), device_data, mesh)
  missing = sorted(set(class_names) - set(task.data.selection_classes))
  if missing:
    logging.warning('The %s split holds no image of %s: %s averages over %s only.',
                    config.selection_split, ', '.join(missing), task.selection_key,
                    ', '.join(task.data.selection_classes))
  return task


def _train_and_select(config, arrays, splits):
  """(training rows, selection rows) of the mode."""
  if state_lib.model_kind(config) == 'simclr':
    train_idx = splits_lib.pretrain_indices(splits, config.include_test_in_pretrain)
  else:
    train_idx = splits_lib.label_subset(arrays.labels, splits['train'],
                                        config.label_fraction, config.label_seed)
  return train_idx, splits[config.selection_split]


def class_weights(config, labels, num_classes):
  """Cross-entropy weight of each class: 1, or n / (K * n_class) with 'balanced'."""
  if config.get('class_weights', 'none') == 'none':
    return np.ones(num_classes, np.float32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
  return weights.astype(np.float32)


def _key_and_model(config, rows):
  key = state_lib.run_key(config, rows.steps_per_epoch * config.num_epochs)
  model = state_lib.memoized('model', state_lib.model_key(config),
                             lambda: state_lib.create_model(config))
  return key, model


def _infer(config, mesh, infer_step, device_data):
  """(state, idx) -> outputs of `infer_step` over those rows of the data set."""

  def infer(state, data, inputs):
    images, _ = input_pipeline.DeviceData.images(data, inputs)
    return infer_step(state, augment.model_input(images, config.image_size, config.channels))

  step = state_lib.memoized(('infer', infer_step.__name__),
                            (state_lib.model_key(config), mesh),
                            lambda: jax.jit(infer, out_shardings=sharding.data_sharding(mesh)))
  return lambda state, idx: evaluate.predict(step, state, device_data, idx,
                                             config.eval_batch_size)


def _rows(config, train_idx):
  batch_size = input_pipeline.train_batch_size(len(train_idx), config.batch_size,
                                               jax.device_count())
  if batch_size != config.batch_size:
    logging.info('%d training images, fewer than batch_size %d: batches of %d (no image '
                 'twice in a batch).', len(train_idx), config.batch_size, batch_size)
  return input_pipeline.TrainingRows(np.asarray(train_idx), batch_size, config.seed)


def _precise_bn(config, device_data, train_idx, mesh):
  # A linear probe's encoder keeps its pretrained statistics.
  if not config.precise_bn_batches or state_lib.is_linear_probe(config):
    return _unchanged
  return evaluate.PreciseBatchStats(device_data, train_idx, config, mesh,
                                    key=state_lib.model_key(config))


def _pretrain_batch(images, labels, positions, key, run_values, *, config):
  del labels, run_values  # Unused: pretraining is self-supervised.
  return input_pipeline.pretrain_batch(images, positions, key, config)


def _supervised_batch(images, labels, positions, key, run_values, *, config):
  return {'image': input_pipeline.supervised_image(images, positions, key, config),
          'label': labels, 'weight': jnp.asarray(run_values['class_weights'])[labels]}


def _embed_step(state, images):
  return state.apply_fn(state_lib.variables(state), images, method='embed')


def _logits_step(state, images):
  return state.apply_fn(state_lib.variables(state), images, train=False)


def _pretrain_task(config, data, device_data, mesh):
  rows = _rows(config, data.train_idx)
  key, model = _key_and_model(config, rows)
  infer = _infer(config, mesh, _embed_step, device_data)

  def knn(idx):
    return evaluate.KnnEvaluator(infer, idx, data.splits['train'], data.labels,
                                 tuple(config.knn_k), config.num_classes)

  k = config.knn_k[1] if len(config.knn_k) > 1 else config.knn_k[0]
  suffix = 'balanced_accuracy' if config.selection_metric == 'balanced_accuracy' else 'accuracy'
  loss_fn, epoch_end = objective(config, model)
  return Task(
      config=config, key=key, data=data, model=model, loss_fn=loss_fn,
      make_batch=functools.partial(_pretrain_batch, config=config),
      run_values={'class_weights': np.ones(config.num_classes, np.float32)},
      rows=rows, device_data=device_data,
      infer_step=_embed_step, selection=knn(data.select_idx),
      test=knn(data.splits['test']), selection_key=f'knn{k}_{suffix}', start=_unchanged,
      epoch_end=epoch_end,
      before_eval=_precise_bn(config, device_data, data.train_idx, mesh))


def _supervised_task(config, data, device_data, mesh):
  rows = _rows(config, data.train_idx)
  key, model = _key_and_model(config, rows)
  infer = _infer(config, mesh, _logits_step, device_data)

  def classifier(idx):
    return evaluate.ClassifierEvaluator(infer, idx, data.labels, data.arrays.subject_ids,
                                        config.num_classes)

  start = (functools.partial(runs.load_pretrained_encoder, config, mesh=mesh)
           if config.mode == 'finetune' else _unchanged)
  loss_fn, epoch_end = objective(config, model)
  return Task(
      config=config, key=key, data=data, model=model, loss_fn=loss_fn,
      make_batch=functools.partial(_supervised_batch, config=config),
      run_values={'class_weights': class_weights(config, data.labels[data.train_idx],
                                                 config.num_classes)},
      rows=rows, device_data=device_data,
      infer_step=_logits_step, selection=classifier(data.select_idx),
      test=classifier(data.splits['test']), selection_key=config.selection_metric,
      start=start, epoch_end=epoch_end,
      before_eval=_precise_bn(config, device_data, data.train_idx, mesh))
