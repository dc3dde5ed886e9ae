"""Training and evaluation of the three training modes: pretrain, finetune, baseline.

`pretrain`: SimCLR (two views, NT-Xent) with SAM/ASAM around SGD + momentum.
`finetune`: encoder from a pretrain run, new classification head, AdamW.
`baseline`: the same as finetune from the same random initialisation as pretraining
started from, so the two arms differ only by pretraining.

The loop is written for the global batch (big_vision style): one `jax.jit` step over
a device mesh, buffers donated, no host synchronisation between logging steps.
"""

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import metrics
from clu import periodic_actions
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from simclr_jax import evaluate
from simclr_jax import input_pipeline
from simclr_jax import losses
from simclr_jax import models
from simclr_jax import plots
from simclr_jax import sam
from simclr_jax import sharding

TRAIN_MODES = ('pretrain', 'finetune', 'baseline')
# Fields that fix the encoder's parameter shapes: a fine-tuning run must match its
# pretraining run on these.
ARCHITECTURE_FIELDS = ('model', 'width', 'encoder_output', 'channels', 'image_size')


class TrainState(train_state.TrainState):
  batch_stats: Any


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')
  grad_norm: metrics.Average.from_output('grad_norm')
  param_norm: metrics.LastValue.from_output('param_norm')
  update_norm: metrics.Average.from_output('update_norm')


@dataclasses.dataclass
class Data:
  """What a training run reads: the arrays, the split indices and their roles."""
  arrays: Any
  splits: dict
  train_idx: np.ndarray  # Pretraining images, or the labeled subset.
  select_idx: np.ndarray  # Model selection (validation, or test in the reference protocol).
  memory_idx: np.ndarray  # kNN monitor memory bank (labeled train images).


# ----------------------------------------------------------------------------- config


def check_config(config):
  """Rejects a config a run cannot use, in one sentence naming the fix."""
  if config.mode not in TRAIN_MODES:
    raise ValueError(f'Unknown mode {config.mode!r} for training; set --config.mode to '
                     f'one of {TRAIN_MODES}.')
  models.create_model(config, 'simclr')  # Validates model, dtype, encoder_output.
  if not 0.0 < config.label_fraction <= 1.0:
    raise ValueError(f'label_fraction {config.label_fraction} is outside (0, 1]; set '
                     '--config.label_fraction to e.g. 0.1 for 10 % of the labels.')
  if config.sam not in ('none', 'sam', 'asam'):
    raise ValueError(f'Unknown sam {config.sam!r}; set --config.sam to none, sam or asam.')
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
    pretrained_config(config)  # Fails early if the pretrain run is unusable.


def check_workdir_config(config, workdir):
  """Writes config.json, or checks that the workdir's run used the same config."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    differing = sorted(k for k in set(previous) | set(current)
                       if previous.get(k) != current.get(k))
    if differing:
      raise ValueError(
          f'The workdir {workdir} holds a run with a different config (fields '
          f'{", ".join(differing)} differ); use a new --workdir, or the same config to resume.')
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(current, f, indent=2, sort_keys=True)


def load_workdir_config(workdir):
  """The config a run in `workdir` was started with."""
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def pretrained_config(config):
  """Checks and returns the config of `config.pretrained_workdir`'s pretrain run."""
  workdir = config.pretrained_workdir
  if not workdir:
    raise ValueError('finetune needs a pretrain run; set --config.pretrained_workdir to '
                     'the --workdir of a `pretrain` run (or use configs/baseline.py).')
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path) or not latest_step(workdir):
    raise ValueError(f'No pretrain checkpoint found in {workdir}; run '
                     f'`python main.py --config=configs/pretrain.py --workdir={workdir}` '
                     'first or point --config.pretrained_workdir at a finished pretrain run.')
  previous = load_workdir_config(workdir)
  if previous.mode != 'pretrain':
    raise ValueError(f'{workdir} holds a {previous.mode} run, not a pretrain run; point '
                     '--config.pretrained_workdir at the workdir of a pretrain run.')
  mismatched = [f for f in ARCHITECTURE_FIELDS if previous.get(f) != config.get(f)]
  if mismatched:
    details = ', '.join(f'{f}={previous.get(f)!r}' for f in mismatched)
    raise ValueError(
        f'The pretrain run in {workdir} used another architecture ({details}); set the '
        f'same values, e.g. ' + ' '.join(f'--config.{f}={previous.get(f)}' for f in mismatched)
        + '.')
  return previous


# ----------------------------------------------------------------------------- state


def steps_per_epoch(num_examples, batch_size):
  return max(1, math.ceil(num_examples / batch_size))


def create_learning_rate_fn(config, total_steps):
  """One-cycle cosine for pretraining (the reference); constant for fine-tuning."""
  if config.mode == 'pretrain':
    opt = config.pretrain_optimizer
    return optax.cosine_onecycle_schedule(
        transition_steps=max(total_steps, 2), peak_value=opt.learning_rate,
        pct_start=opt.warmup_fraction)
  return optax.constant_schedule(config.finetune_optimizer.learning_rate)


def is_linear_probe(config):
  """A finetune run that trains only the head on a frozen encoder."""
  return config.mode == 'finetune' and config.linear_probe


def create_optimizer(config, learning_rate_fn):
  """SGD + momentum (pretrain) or AdamW (finetune, baseline); SAM is applied in the step."""
  if config.mode == 'pretrain':
    opt = config.pretrain_optimizer
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                     optax.sgd(learning_rate_fn, momentum=opt.momentum))
  else:
    opt = config.finetune_optimizer
    tx = optax.adamw(learning_rate_fn, weight_decay=opt.weight_decay)
  if is_linear_probe(config):
    # A linear probe trains only the head; the encoder's updates are zero.
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        lambda params: {k: 'frozen' if k == 'encoder' else 'train' for k in params})
  return tx


def model_kind(config):
  return 'simclr' if config.mode == 'pretrain' else 'classifier'


def init_variables(config, model, rng):
  """Initial params and batch_stats; the encoder's depend only on the seed.

  SimCLRModel and Classifier both name their ResNet `encoder`, so for one seed the
  pretraining and the baseline start from identical encoder weights.
  """
  x = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
  variables = model.init({'params': rng, 'dropout': rng}, x, train=False)
  return variables['params'], variables['batch_stats']


def create_train_state(config, model, rng, tx):
  init = jax.jit(functools.partial(init_variables, config, model))
  # Initialisation runs once: compiled without LLVM optimisation it takes seconds
  # on a CPU instead of a minute (the random initialisers compile slowly).
  compiled = init.lower(rng).compile({'xla_backend_optimization_level': 0})
  params, batch_stats = compiled(rng)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           batch_stats=batch_stats)


# ----------------------------------------------------------------------------- steps


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


def train_step(state, batch, rng, temperature, *, loss_fn, sam_mode, sam_rho, sam_eta):
  """One optimisation step shared by every mode: (state, batch) -> (state, metrics).

  With SAM/ASAM the gradient is taken at the perturbed weights; BatchNorm statistics
  and the reported loss come from the clean pass only.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_of_params(params):
    return loss_fn(params, state.batch_stats, batch, step_rng, temperature)

  loss, (new_stats, accuracy), grads, grad_norm = sam.sam_step_gradients(
      loss_of_params, state.params, mode=sam_mode, rho=sam_rho, eta=sam_eta)
  new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
  update_norm = optax.tree.norm(
      jax.tree.map(lambda a, b: a - b, new_state.params, state.params))
  step_metrics = TrainMetrics.single_from_model_output(
      loss=loss, accuracy=accuracy, grad_norm=grad_norm,
      param_norm=optax.tree.norm(new_state.params), update_norm=update_norm)
  return new_state, step_metrics


def eval_step(state, images):
  """Inference: logits of a classifier, or the encoder output h of a SimCLR model."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if 'projection' in state.params:
    return state.apply_fn(variables, images, method='embed')
  return state.apply_fn(variables, images, train=False)


def make_steps(config, state, mesh):
  """Jitted train and eval steps for the config's mode."""
  repl = sharding.replicated_sharding(mesh)
  data = sharding.data_sharding(mesh)
  if config.mode == 'pretrain':
    loss_fn = functools.partial(pretrain_loss_fn, apply_fn=state.apply_fn,
                                joint_views=config.joint_views)
    sam_mode = config.sam
  else:
    loss_fn = functools.partial(supervised_loss_fn, apply_fn=state.apply_fn)
    sam_mode = config.finetune_sam
  step = functools.partial(train_step, loss_fn=loss_fn, sam_mode=sam_mode,
                           sam_rho=config.sam_rho, sam_eta=config.sam_eta)
  p_train_step = jax.jit(step, in_shardings=(repl, data, repl, repl),
                         out_shardings=(repl, repl), donate_argnums=(0,))
  p_eval_step = jax.jit(eval_step, in_shardings=(repl, data), out_shardings=data)
  return p_train_step, p_eval_step


# ----------------------------------------------------------------------------- data


def load_data(config):
  """Loads the data set and picks each role's indices for the config's mode."""
  arrays = input_pipeline.load_arrays(config)
  splits = input_pipeline.make_splits(arrays, config.split_scheme, config.split_seed,
                                      config.test_fraction, config.val_fraction)
  select_idx = splits[config.selection_split]
  if config.selection_split == 'test':
    logging.warning('Model selection on the TEST split: this reproduces the reference '
                    'protocol and overstates accuracy; use selection_split=val.')
  if config.mode == 'pretrain':
    train_idx = input_pipeline.pretrain_indices(splits, config.include_test_in_pretrain)
  else:
    train_idx = input_pipeline.label_subset(arrays.labels, splits['train'],
                                            config.label_fraction, config.label_seed)
  return Data(arrays=arrays, splits=splits, train_idx=train_idx, select_idx=select_idx,
              memory_idx=splits['train'])


def predict_arrays(p_eval_step, state, data, idx, config, mesh):
  """Runs eval_step over `idx`; returns the outputs of the valid rows and their labels."""
  outputs, labels = [], []
  batches = input_pipeline.eval_batches(
      data.arrays, idx, config, batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  for batch in sharding.prefetch(batches, sharding.data_sharding(mesh)):
    out = p_eval_step(state, batch['image'])
    out, label, valid = sharding.to_host((out, batch['label'], batch['valid']))
    outputs.append(out[valid])
    labels.append(label[valid])
  return np.concatenate(outputs), np.concatenate(labels)


def make_batch_stats_step(mesh):
  """Jitted: (state, images) -> the BatchNorm statistics of that batch, in training mode."""

  def batch_stats_step(state, images):
    # From zero running averages, one update leaves (1 - momentum) * the batch's own.
    zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
    _, updates = state.apply_fn({'params': state.params, 'batch_stats': zeros}, images,
                                train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.key(0)})
    return jax.tree.map(lambda s: s / (1.0 - models.BN_MOMENTUM), updates['batch_stats'])

  return jax.jit(batch_stats_step, in_shardings=(sharding.replicated_sharding(mesh),
                                                 sharding.data_sharding(mesh)),
                 out_shardings=sharding.replicated_sharding(mesh))


def precise_batch_stats(p_stats_step, state, data, config, mesh):
  """BatchNorm statistics recomputed with the current weights ("precise BN").

  The mean over `config.precise_bn_batches` batches (of `config.batch_size`
  unaugmented training images, a fixed seeded draw) of each batch's statistics,
  as detectron2's PreciseBN. Running averages lag behind fast-moving weights and
  describe augmented crops; on short runs they can make the evaluated network
  answer one class while the same weights with fresh statistics do not.
  """
  num = config.precise_bn_batches * config.batch_size
  order = np.random.default_rng(config.seed).permutation(data.train_idx)
  usable = max(config.batch_size, min(num, len(order)) // config.batch_size * config.batch_size)
  idx = np.resize(order, usable)  # Repeats the images when fewer than one batch.
  batches = input_pipeline.eval_batches(
      data.arrays, idx, config, batch_size=config.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  total, count = None, 0
  for batch in sharding.prefetch(batches, sharding.data_sharding(mesh)):
    stats = p_stats_step(state, batch['image'])
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  return jax.tree.map(lambda s: s / count, total)


def evaluate_classifier(p_eval_step, state, data, idx, config, mesh):
  logits, labels = predict_arrays(p_eval_step, state, data, idx, config, mesh)
  return evaluate.classification_metrics(labels, logits.argmax(-1), config.num_classes)


def evaluate_embeddings(p_eval_step, state, data, idx, config, mesh):
  """kNN accuracy of `idx` against the labeled train split as memory bank."""
  memory, memory_labels = predict_arrays(p_eval_step, state, data, data.memory_idx,
                                         config, mesh)
  queries, labels = predict_arrays(p_eval_step, state, data, idx, config, mesh)
  return evaluate.knn_monitor(memory, memory_labels, queries, labels, config.knn_k,
                              config.num_classes)


def selection_key(config):
  if config.mode == 'pretrain':
    k = config.knn_k[1] if len(config.knn_k) > 1 else config.knn_k[0]
    return f'knn{k}_balanced_accuracy' if config.selection_metric == 'balanced_accuracy' \
        else f'knn{k}_accuracy'
  return config.selection_metric


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_managers(workdir):
  """`latest` (periodic, for resuming) and `best` (best on the selection split)."""
  latest = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints', 'latest'),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints', 'best'),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  return latest, best


def latest_step(workdir, which='latest'):
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', which)
  if not os.path.isdir(path):
    return None
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      read_only=True)) as manager:
    return manager.latest_step()


def save_checkpoint(manager, state, meta):
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(manager, state, step=None):
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
  return restored['state'], restored['meta']


def abstract_state(config, mesh, rng=None):
  """A TrainState of `config` with its sharding, for restoring into."""
  model = models.create_model(config, model_kind(config))
  tx = create_optimizer(config, create_learning_rate_fn(config, 2))
  rng = jax.random.key(config.seed) if rng is None else rng

  def create():
    params, batch_stats = init_variables(config, model, rng)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats=batch_stats)

  state = jax.eval_shape(create)
  repl = sharding.replicated_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)


def load_pretrained_encoder(config, state, mesh):
  """Copies encoder params and batch_stats of the pretrain run's final checkpoint."""
  pre_config = pretrained_config(config)
  latest, _ = checkpoint_managers(config.pretrained_workdir)
  with latest:
    target = abstract_state(pre_config, mesh)
    pretrained, _ = restore_checkpoint(latest, target)
  params = flax.core.unfreeze(state.params)
  stats = flax.core.unfreeze(state.batch_stats)
  params['encoder'] = pretrained.params['encoder']
  stats['encoder'] = pretrained.batch_stats['encoder']
  logging.info('Encoder loaded from %s (step %d).', config.pretrained_workdir,
               int(pretrained.step))
  return state.replace(params=params, batch_stats=stats,
                       opt_state=state.tx.init(params))


def restore_for_inference(workdir, which='best'):
  """(config, model, variables) of the best (or latest) checkpoint of a run."""
  config = load_workdir_config(workdir)
  mesh = sharding.create_mesh()
  latest, best = checkpoint_managers(workdir)
  manager = best if which == 'best' and best.latest_step() is not None else latest
  if manager.latest_step() is None:
    raise ValueError(f'No checkpoint in {workdir}; train there first or point at the '
                     'workdir of a finished run.')
  state, _ = restore_checkpoint(manager, abstract_state(config, mesh))
  latest.close()
  best.close()
  model = models.create_model(config, model_kind(config))
  return config, model, {'params': state.params, 'batch_stats': state.batch_stats}


# ----------------------------------------------------------------------------- loop


def _write_final(config, workdir, writer, step, test_metrics, extra):
  result = dict(test_metrics)
  result.update(extra)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump(result, f, indent=2)
  scalars = {f'test/{k}': v for k, v in test_metrics.items()
             if isinstance(v, (int, float))}
  writer.write_scalars(step, scalars)
  if 'confusion_matrix' in test_metrics and jax.process_index() == 0:
    image = plots.plot_confusion_matrix(
        np.asarray(test_metrics['confusion_matrix']), extra['class_names'],
        os.path.join(workdir, 'confusion_matrix.png'),
        title=f'{config.mode} (test, checkpoint chosen on {config.selection_split})')
    writer.write_images(step, {'test/confusion_matrix': image[None]})
  return result


def train_and_evaluate(config, workdir):
  """Trains `config.mode` in `workdir`, resuming if a checkpoint exists.

  Returns:
    The test metrics of the checkpoint chosen on the selection split (also written
    to `workdir/metrics.json`).
  """
  config = ml_collections.ConfigDict(config)  # A copy we may complete.
  check_config(config)
  mesh = sharding.create_mesh()
  data = load_data(config)
  config.num_classes = len(data.arrays.class_names)
  check_workdir_config(config, workdir)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  per_epoch = steps_per_epoch(len(data.train_idx), config.batch_size)
  total_steps = per_epoch * config.num_epochs
  logging.info('%s: %d training images, %d steps per epoch, %d steps.', config.mode,
               len(data.train_idx), per_epoch, total_steps)

  model = models.create_model(config, model_kind(config))
  lr_fn = create_learning_rate_fn(config, total_steps)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  del init_rng  # The init key is config.seed itself, shared by both arms.
  state = create_train_state(config, model, rng, create_optimizer(config, lr_fn))
  state = jax.device_put(state, sharding.replicated_sharding(mesh))

  latest, best = checkpoint_managers(workdir)
  meta = {'temperature': float(config.temperature), 'best_metric': None,
          'best_step': None, 'epoch_loss_sum': 0.0, 'epoch_loss_count': 0}
  if latest.latest_step() is not None:
    state, meta = restore_checkpoint(latest, state)
    logging.info('Resumed from step %d of %s.', int(state.step), workdir)
  elif config.mode == 'finetune':
    state = load_pretrained_encoder(config, state, mesh)
  start_step = int(jax.device_get(state.step))
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})

  p_train_step, p_eval_step = make_steps(config, state, mesh)
  # A linear probe's encoder keeps its pretrained statistics.
  p_stats_step = (make_batch_stats_step(mesh)
                  if config.precise_bn_batches and not is_linear_probe(config) else None)
  batch_fn = (input_pipeline.pretrain_batches if config.mode == 'pretrain'
              else input_pipeline.supervised_batches)
  batches = sharding.prefetch(
      batch_fn(data.arrays, data.train_idx, config, seed=config.seed, start_step=start_step,
               process_index=jax.process_index(), process_count=jax.process_count()),
      sharding.data_sharding(mesh), size=config.prefetch)

  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps,
      every_secs=None)
  train_metrics = None
  last_good_step = start_step
  for step in range(start_step + 1, total_steps + 1):
    batch = next(batches)
    if step == 1 and config.num_summary_images:
      _write_views(writer, batch, config)
    state, step_metrics = p_train_step(state, batch, step_rng,
                                       jnp.float32(meta['temperature']))
    train_metrics = step_metrics if train_metrics is None else train_metrics.merge(
        step_metrics)
    report_progress(step)
    end_of_epoch = step % per_epoch == 0
    if step % config.log_every_steps == 0 or end_of_epoch or \
        step % config.checkpoint_every_steps == 0:
      summary = train_metrics.compute()
      loss = float(summary['loss'])
      if not math.isfinite(loss):
        latest.wait_until_finished()
        raise FloatingPointError(
            f'Training diverged: the loss is {loss} at step {step}; the last good '
            f'checkpoint (step {last_good_step}) is kept in {workdir}. Lower the learning '
            'rate (or sam_rho) and run the same command again with a new --workdir.')
      meta['epoch_loss_sum'] += loss * int(train_metrics.loss.count)
      meta['epoch_loss_count'] += int(train_metrics.loss.count)
      summary = {f'train/{k}': float(v) for k, v in summary.items()}
      summary['train/learning_rate'] = float(lr_fn(step - 1))
      if config.mode == 'pretrain':
        summary['train/temperature'] = meta['temperature']
      writer.write_scalars(step, summary)
      train_metrics = None
    evaluated = False
    if end_of_epoch:
      epoch = step // per_epoch
      if config.mode == 'pretrain' and config.temperature_schedule:
        epoch_loss = meta['epoch_loss_sum'] / max(1, meta['epoch_loss_count'])
        # One-way step-down, as the reference: the temperature never rises again.
        meta['temperature'] = min(meta['temperature'], float(losses.temperature_for_loss(
            epoch_loss, config.temperature, config.temperature_steps)))
      meta['epoch_loss_sum'], meta['epoch_loss_count'] = 0.0, 0
      if epoch % config.eval_every_epochs == 0 or step == total_steps:
        with report_progress.timed('eval'):
          if p_stats_step is not None:
            state = state.replace(batch_stats=precise_batch_stats(
                p_stats_step, state, data, config, mesh))
          selection = _evaluate(config, p_eval_step, state, data, data.select_idx, mesh)
        split = config.selection_split
        writer.write_scalars(step, {f'{split}/{k}': v for k, v in selection.items()
                                    if isinstance(v, (int, float))})
        evaluated = True
        value = selection[selection_key(config)]
        if meta['best_metric'] is None or value > meta['best_metric']:
          meta['best_metric'], meta['best_step'] = float(value), step
          save_checkpoint(best, state, meta)
    # Batches are a function of (seed, step), so a run resumes exactly from any step;
    # saving every epoch would cost more than the steps when epochs are a few steps.
    if evaluated or step % config.checkpoint_every_steps == 0 or step == total_steps:
      save_checkpoint(latest, state, meta)
      last_good_step = step
  latest.wait_until_finished()
  best.wait_until_finished()

  # Final evaluation on test of the checkpoint chosen on the selection split.
  chosen_state, chosen_meta = restore_checkpoint(best, state) if best.latest_step() \
      else (state, meta)
  test_metrics = _evaluate(config, p_eval_step, chosen_state, data, data.splits['test'],
                           mesh)
  extra = {
      'mode': config.mode, 'chosen_step': chosen_meta['best_step'],
      f'selection_{config.selection_split}_{selection_key(config)}':
          chosen_meta['best_metric'],
      'num_train_images': int(len(data.train_idx)), 'total_steps': total_steps,
      'class_names': list(data.arrays.class_names),
      'label_counts': np.bincount(data.arrays.labels[data.train_idx],
                                  minlength=config.num_classes).tolist(),
  }
  result = _write_final(config, workdir, writer, total_steps, test_metrics, extra)
  writer.flush()
  latest.close()
  best.close()
  logging.info('Test metrics of the step-%s checkpoint: %s', chosen_meta['best_step'],
               {k: v for k, v in test_metrics.items() if isinstance(v, float)})
  return result


def _evaluate(config, p_eval_step, state, data, idx, mesh):
  if config.mode == 'pretrain':
    return evaluate_embeddings(p_eval_step, state, data, idx, config, mesh)
  return evaluate_classifier(p_eval_step, state, data, idx, config, mesh)


def _write_views(writer, batch, config):
  n = config.num_summary_images
  host = sharding.to_host(batch)
  if 'image1' in host:
    images = np.concatenate([host['image1'][:n], host['image2'][:n]], axis=2)
  else:
    images = host['image'][:n]
  writer.write_images(1, {'train/input_views': np.clip(images, 0, 1)})


def _flatten(tree, prefix=''):
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return flat
