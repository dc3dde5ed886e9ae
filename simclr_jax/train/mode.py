"""The training modes (pretrain, finetune, baseline): their checks and their entry.

`run.py`'s registry maps the three modes here. The loop itself is
`trainer.train_and_evaluate`, which the sweep also runs for each of its runs.
"""

from simclr_jax import checks
from simclr_jax.train import kinds
from simclr_jax.train import trainer
from simclr_jax.train import workdirs


def check_config(config):
  """A pretrain, finetune or baseline config; for finetune, its pretraining run too."""
  checks.check_mode(config, kinds.TRAIN_MODES)
  checks.check_training_fields(config)
  if config.mode == 'finetune':
    workdirs.pretrained_config(config)  # The pretrain run exists and has the same architecture.


def main(config, workdir):
  """The mode's entry for run.py: trains and returns the test metrics."""
  return trainer.train_and_evaluate(config, workdir)
