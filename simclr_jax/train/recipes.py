"""What each training mode is made of, built once from the config: the one dispatch.

`create_recipe(config, mesh, cache)` is the only place that asks `config.mode`. It
returns a `Recipe`: the rows and their roles, the model, the objective (loss, epoch
hook, batch maker), the evaluators, the key that selects the best checkpoint, and
the hooks the loop calls (at a fresh start, before each evaluation). The trainer
runs any recipe the same way.

- `pretrain`: SimCLR, two augmented views of each image (or, with
  positive_pairs=subject, of an image and a nearby slice of its subject), NT-Xent; the kNN monitor
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
import ml_collections
import numpy as np

from simclr_jax.data import arrays as arrays_lib
from simclr_jax.data import augment
from simclr_jax.data import batches
from simclr_jax.data import splits as splits_lib
from simclr_jax.data import subjects
from simclr_jax.parallel import sharding
from simclr_jax.train import compile_cache
from simclr_jax.train import evaluators
from simclr_jax.train import kinds
from simclr_jax.train import state as state_lib
from simclr_jax.train import steps as steps_lib
from simclr_jax.train import workdirs


@dataclasses.dataclass
class RunRows:
  """What a training run reads: the arrays, the split indices and their roles."""
  arrays: arrays_lib.DatasetArrays
  labels: np.ndarray  # int32 [N] labels of the run's label task (config.labels.task).
  class_names: list  # Class names of the run's label task.
  splits: dict
  train_idx: np.ndarray  # Pretraining images, or the labeled subset.
  select_idx: np.ndarray  # Model selection (validation, or test in the reference protocol).

  @property
  def selection_classes(self):
    """The classes present in the selection split (the selection metric averages these)."""
    present = np.unique(self.labels[self.select_idx])
    return [self.class_names[k] for k in present]


@dataclasses.dataclass
class Recipe:
  """The pieces of one training mode (see the module docstring).

  Attributes:
    config: the run's config, completed (num_classes from the data set).
    key: `compile_cache.step_key` of the run: runs with one key share compiled steps.
    rows_of: the data set and the role of each split.
    model: the Flax module trained.
    objective: the loss, epoch hook and batch maker of the train steps.
    class_weights: float32 [K] cross-entropy weight of each class: an input of the
      compiled steps, as it differs between runs that share them.
    rows: the training rows and how batches walk them.
    device_data: the data set's images for the jitted steps.
    infer_step: (state, model inputs) -> logits or embeddings; jittable.
    selection: evaluator of the selection split.
    test: evaluator of the test split (run once, on the chosen checkpoint).
    selection_key: the metric of `selection.run` that picks the best checkpoint.
    start: state -> state of a fresh run (fine-tuning loads the encoder here).
    before_eval: state -> state before every evaluation (precise BatchNorm).
  """
  config: ml_collections.ConfigDict
  key: str
  rows_of: RunRows
  model: nn.Module
  objective: steps_lib.Objective
  class_weights: np.ndarray
  rows: batches.TrainingRows
  device_data: batches.DeviceDataset
  infer_step: Callable
  selection: Any
  test: Any
  selection_key: str
  start: Callable
  before_eval: Callable


def create_recipe(config, mesh, cache):
  """Builds the Recipe of a checked config's mode (data loaded, evaluators ready).

  Args:
    config: a pretrain, finetune or baseline config, checked (run.py checks once).
    mesh: the device mesh.
    cache: the compile_cache.CompileCache of the run (or of the sweep running it).
  """
  config = ml_collections.ConfigDict(config)  # A copy we may complete.
  arrays = arrays_lib.load_arrays(config)
  labels, class_names = arrays_lib.task_labels(arrays, config)
  config.model.num_classes = len(class_names)
  # Splits and label subsets follow the data set's own classes for either task.
  splits = splits_lib.load_splits(config, arrays)
  if config.eval.selection_split == 'test':
    logging.warning('Model selection on the TEST split: this reproduces the reference '
                    'protocol and overstates accuracy; use selection_split=val.')
  build = {'pretrain': _pretrain_recipe, 'finetune': _supervised_recipe,
           'baseline': _supervised_recipe}[config.mode]
  # Runs of one data set and task (a sweep's, a group's) share its copy on the devices.
  device_data = cache.get(
      'device_data', (config.data.to_json_best_effort(), config.labels.task,
                      config.labels.binary_negative_class, mesh),
      lambda: batches.DeviceDataset(arrays, mesh, config.data.on_device, labels=labels))
  recipe = build(config, RunRows(arrays, labels, class_names, splits, *_train_and_select(
      config, arrays, splits)), device_data, mesh, cache)
  missing = sorted(set(class_names) - set(recipe.rows_of.selection_classes))
  if missing:
    logging.warning('The %s split holds no image of %s: %s averages over %s only.',
                    config.eval.selection_split, ', '.join(missing), recipe.selection_key,
                    ', '.join(recipe.rows_of.selection_classes))
  return recipe


def _train_and_select(config, arrays, splits):
  """(training rows, selection rows) of the mode."""
  if kinds.model_kind(config) == 'simclr':
    train_idx = splits_lib.pretrain_indices(splits, config.split.include_test_in_pretrain)
  else:
    train_idx = splits_lib.labeled_rows(config, arrays, splits['train'])
  return train_idx, splits[config.eval.selection_split]


def class_weights(config, labels, num_classes):
  """Cross-entropy weight of each class: 1, or n / (K * n_class) with 'balanced'."""
  if config.labels.class_weights == 'none':
    return np.ones(num_classes, np.float32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
  return weights.astype(np.float32)


def _key_and_model(config, cache):
  key = compile_cache.step_key(config)
  model = cache.get('model', compile_cache.model_key(config),
                    lambda: state_lib.create_model(config))
  return key, model


def _infer(config, mesh, infer_step, device_data, cache):
  """(state, idx) -> outputs of `infer_step` over those rows of the data set."""

  def infer(state, data, inputs):
    images, _ = batches.DeviceDataset.images(data, inputs)
    return infer_step(state, augment.model_input(images, config.data.image_size, config.data.channels))

  step = cache.get(('infer', infer_step.__name__), (compile_cache.model_key(config), mesh),
                   lambda: jax.jit(infer, out_shardings=sharding.data_sharding(mesh)))
  return lambda state, idx, on_device=False: evaluators.infer_rows(
      step, state, device_data, idx, config.eval.batch_size, on_device)


def _rows(config, train_idx):
  batch_size = batches.train_batch_size(len(train_idx), config.train.batch_size,
                                        jax.device_count())
  if batch_size != config.train.batch_size:
    logging.info('%d training images, fewer than batch_size %d: batches of %d (no image '
                 'twice in a batch).', len(train_idx), config.train.batch_size, batch_size)
  return batches.TrainingRows(np.asarray(train_idx), batch_size, config.seed)


def _precise_bn(config, device_data, train_idx, mesh, cache):
  # A linear probe's encoder keeps its pretrained statistics.
  if not config.eval.precise_bn_batches or kinds.is_linear_probe(config):
    return steps_lib.unchanged
  return evaluators.PreciseBatchStats(device_data, train_idx, config, mesh, cache=cache,
                                      key=compile_cache.model_key(config))


def _embed_step(state, images):
  return state.apply_fn(state_lib.variables(state), images, method='embed')


def _logits_step(state, images):
  return state.apply_fn(state_lib.variables(state), images, train=False)


def _pretrain_recipe(config, rows_of, device_data, mesh, cache):
  rows = _rows(config, rows_of.train_idx)
  if config.pretrain.positive_pairs == 'subject':  # MICLe: view 2 from a nearby slice.
    subjects.check_subject_pairs(config)
    rows.partners = batches.SubjectPartners(rows_of.arrays.subject_ids,
                                            rows_of.arrays.slice_index, rows.rows,
                                            config.pretrain.positive_max_slice_distance)
  key, model = _key_and_model(config, cache)
  infer = _infer(config, mesh, _embed_step, device_data, cache)

  def knn(idx):
    return evaluators.KnnEvaluator(infer, idx, rows_of.splits['train'], rows_of.labels,
                                   tuple(config.eval.knn_k), config.model.num_classes)

  k = config.eval.knn_k[1] if len(config.eval.knn_k) > 1 else config.eval.knn_k[0]
  suffix = 'balanced_accuracy' if config.eval.selection_metric == 'balanced_accuracy' else 'accuracy'
  return Recipe(
      config=config, key=key, rows_of=rows_of, model=model,
      objective=steps_lib.objective(config, model),
      class_weights=np.ones(config.model.num_classes, np.float32),
      rows=rows, device_data=device_data,
      infer_step=_embed_step, selection=knn(rows_of.select_idx),
      test=knn(rows_of.splits['test']), selection_key=f'knn{k}_{suffix}',
      start=steps_lib.unchanged,
      before_eval=_precise_bn(config, device_data, rows_of.train_idx, mesh, cache))


def _supervised_recipe(config, rows_of, device_data, mesh, cache):
  rows = _rows(config, rows_of.train_idx)
  key, model = _key_and_model(config, cache)
  infer = _infer(config, mesh, _logits_step, device_data, cache)

  def classifier(idx):
    return evaluators.ClassifierEvaluator(infer, idx, rows_of.labels,
                                          rows_of.arrays.subject_ids, config.model.num_classes)

  start = (functools.partial(workdirs.load_pretrained_encoder, config, mesh=mesh)
           if config.mode == 'finetune' else steps_lib.unchanged)
  return Recipe(
      config=config, key=key, rows_of=rows_of, model=model,
      objective=steps_lib.objective(config, model),
      class_weights=class_weights(config, rows_of.labels[rows_of.train_idx],
                                  config.model.num_classes),
      rows=rows, device_data=device_data,
      infer_step=_logits_step, selection=classifier(rows_of.select_idx),
      test=classifier(rows_of.splits['test']), selection_key=config.eval.selection_metric,
      start=start,
      before_eval=_precise_bn(config, device_data, rows_of.train_idx, mesh, cache))
