"""The compile cache a run or a sweep owns: equal shapes compile once.

A sweep's runs share their model and optimizer objects, hence the pytree structure
of their states, hence their jitted steps: each shape compiles once. `step_key` and
`model_key` say what a compiled step and a model depend on; `CompileCache` holds
the objects made for each key. It is an object passed down from the run (or the
sweep that runs many), never process-wide state, so two runs that must not share
(a different shape) cannot, and a test can give each run its own.
"""

import json

from simclr_jax.train import kinds


class CompileCache:
  """Objects made once per (name, key): models, optimizers, jitted and compiled steps."""

  def __init__(self):
    self._objects = {}

  def get(self, name, key, make):
    """`make()` the first time (name, key) is asked for; the same object afterwards."""
    if (name, key) not in self._objects:
      self._objects[name, key] = make()
    return self._objects[name, key]

  def __len__(self):
    return len(self._objects)

  def names(self):
    """The (name, key) pairs held, in the order they were made."""
    return list(self._objects)


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
# The fields that make a model and the shape of its inputs (heads.create_model).
_MODEL_FIELDS = ('model', 'width', 'encoder_output', 'dtype', 'projection_dims',
                 'projection_dropout', 'head_dropout', 'num_classes', 'image_size', 'channels')


def step_key(config, total_steps):
  """What a run's model, optimizer and compiled steps depend on, as a hashable string.

  The one-cycle schedule of pretraining depends on the run's length; the
  fine-tuning schedule is constant, so fine-tuning and baseline runs of any
  length (and either arm) share one key.
  """
  kind = kinds.model_kind(config)
  fields = {k: v for k, v in json.loads(config.to_json_best_effort()).items()
            if k not in _UNCOMPILED_FIELDS and k not in _UNUSED_BY_KIND[kind]}
  fields['total_steps'] = total_steps if kind == 'simclr' else None
  fields['mode'] = kind
  fields['linear_probe'] = kinds.is_linear_probe(config)
  return json.dumps(fields, sort_keys=True)


def model_key(config):
  """What a run's model and its inference steps depend on: runs of one key share them."""
  kind = kinds.model_kind(config)
  fields = {k: config.get(k) for k in _MODEL_FIELDS if k not in _UNUSED_BY_KIND[kind]}
  fields.update(kind=kind, frozen=kinds.is_linear_probe(config))
  return json.dumps(fields, sort_keys=True, default=list)
