r"""Supervised baseline from random initialisation, same recipe as fine-tuning.

Both arms start from the same random encoder (same seed), so they differ only by
pretraining. Reference settings (GPU/TPU), 10 % of the labels:
  python main.py --config=configs/baseline.py:label_fraction=0.1 --workdir=runs/sl10
CPU demo:
  python main.py --config=configs/baseline.py:runlocal,label_fraction=0.1 --workdir=runs/sl10
"""

from configs import default
from configs import finetune


def get_config(arg=None):
  """Baseline config; arg: 'runlocal', 'label_fraction=F'."""
  args = default.parse_arg(arg, runlocal=False, label_fraction=1.0)
  config = finetune.get_config(
      ','.join(['runlocal'] * args.runlocal + [f'label_fraction={args.label_fraction}']))
  config.mode = 'baseline'
  return config
