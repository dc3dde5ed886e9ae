"""The compile cache a run or a sweep owns: equal shapes compile once.

A sweep's runs share their model and optimizer objects, hence the pytree structure
of their states, hence their jitted steps: each shape compiles once. `step_key` and
`model_key` say what a compiled step and a model depend on; `CompileCache` holds
the objects made for each key. It is an object passed down from the run (or the
sweep that runs many), never process-wide state, so two runs that must not share
(a different shape) cannot, and a test can give each run its own.
"""

import json

from simclr_jax import config_fields
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

  def names(self):
    """The (name, key) pairs held, in the order they were made."""
    return list(self._objects)


# The section of each model kind's own settings (head, optimizer, loss).
_KIND_SECTIONS = {'simclr': 'pretrain', 'classifier': 'supervised'}
# Beside the sections, what shapes a compiled step: the model input, the batch,
# where the data set lives, and the steps per dispatch.
_STEP_FIELDS = ('data.image_size', 'data.channels', 'data.on_device', 'train.batch_size',
                'train.steps_per_dispatch')


def _section(config, name):
  return json.loads(config[name].to_json_best_effort())


def model_key(config):
  """What a run's model and its inference steps depend on: runs of one key share them.

  The `model` section, the model kind's own section (its head) and the input shape.
  """
  kind = kinds.model_kind(config)
  fields = {'kind': kind, 'frozen': kinds.is_linear_probe(config),
            'model': _section(config, 'model'), kind: _section(config, _KIND_SECTIONS[kind]),
            'input': [config.data.image_size, config.data.channels]}
  return json.dumps(fields, sort_keys=True)


def step_key(config):
  """What a run's model, optimizer and compiled steps depend on, as a hashable string.

  The model's key, the `augment` section and `_STEP_FIELDS`. Everything else
  (seeds, splits, labels, run length and with it the one-cycle schedule's length,
  evaluation, paths) is data, so runs of any length share one key.
  """
  fields = {'model': model_key(config), 'augment': _section(config, 'augment')}
  fields.update({name: str(config_fields.get(config, name)) for name in _STEP_FIELDS})
  return json.dumps(fields, sort_keys=True)
