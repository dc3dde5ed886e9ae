"""The optimizer of each model kind, SAM/ASAM included, and its learning-rate schedule.

The SimCLR model trains with SGD + momentum inside SAM/ASAM and a one-cycle cosine
schedule (the reference), the classifier with AdamW at a constant learning rate.
"""

import optax

from simclr_jax.model import sam
from simclr_jax.train import kinds


def create_learning_rate_fn(config, total_steps):
  """One-cycle cosine for pretraining (the reference); constant for fine-tuning."""
  if kinds.model_kind(config) == 'simclr':
    opt = config.pretrain.optimizer
    return optax.cosine_onecycle_schedule(
        transition_steps=max(total_steps, 2), peak_value=opt.learning_rate,
        pct_start=opt.warmup_fraction)
  return optax.constant_schedule(config.supervised.optimizer.learning_rate)


def create_optimizer(config, learning_rate_fn):
  """The mode's optimizer as one optax transformation, SAM/ASAM included.

  SGD + momentum (pretrain) or AdamW (finetune, baseline), wrapped in the SAM
  or ASAM transform of `sam.py` when `config.pretrain.sam` (pretrain) or
  `config.supervised.sam` asks for it. Every transformation takes the extra
  `grad_fn` argument that SAM needs (the others ignore it). A linear probe's
  frozen encoder gets no updates (not even weight decay).
  """
  if kinds.model_kind(config) == 'simclr':
    section = config.pretrain
    tx = optax.chain(optax.add_decayed_weights(section.optimizer.weight_decay),
                     optax.sgd(learning_rate_fn, momentum=section.optimizer.momentum))
  else:
    section = config.supervised
    tx = optax.adamw(learning_rate_fn, weight_decay=section.optimizer.weight_decay)
  frozen = kinds.frozen_subtrees(config)
  if frozen:
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        lambda params: {k: 'frozen' if k in frozen else 'train' for k in params})
  # SAM outermost: its perturbed pass sees every parameter (the frozen ones get a
  # zero gradient, hence no perturbation: see steps.train_step).
  tx = sam.wrap(tx, section.sam, section.sam_rho, eta=section.sam_eta)
  return optax.with_extra_args_support(tx)
