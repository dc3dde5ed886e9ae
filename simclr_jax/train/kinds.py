"""Which model a training mode trains, and which of its parameters it freezes.

Modes map to a model kind: pretrain trains the SimCLR model, finetune and baseline
the classifier; a finetune run with `linear_probe` trains only the head.
"""

MODEL_KINDS = {'pretrain': 'simclr', 'finetune': 'classifier', 'baseline': 'classifier'}
TRAIN_MODES = tuple(MODEL_KINDS)
# Fields that fix the encoder's parameter shapes: a fine-tuning run must match its
# pretraining run on these.
ARCHITECTURE_FIELDS = ('model.name', 'model.width', 'model.encoder_output', 'data.channels',
                       'data.image_size')


def model_kind(config):
  return MODEL_KINDS[config.mode]


def is_linear_probe(config):
  """A finetune run that trains only the head on a frozen encoder."""
  return config.mode == 'finetune' and bool(config.finetune.linear_probe)


def frozen_subtrees(config):
  """Top-level parameter subtrees that a run neither trains nor back-propagates into."""
  return ('encoder',) if is_linear_probe(config) else ()
