r"""Fine-tuning of a pretrain run's encoder on a fraction of the labels (AdamW).

Reference settings (GPU/TPU), 10 % of the labels:
  python main.py --config=configs/finetune.py:label_fraction=0.1 \
    --config.finetune.pretrained_workdir=runs/pretrain --workdir=runs/ft10
CPU demo after `configs/pretrain.py:runlocal`:
  python main.py --config=configs/finetune.py:runlocal,label_fraction=0.1 \
    --config.finetune.pretrained_workdir=runs/pretrain --workdir=runs/ft10
"""

from configs import default
from configs import pretrain


def get_config(arg=None):
  """Fine-tuning config; arg: 'runlocal', 'label_fraction=F', 'linear_probe'."""
  args = default.parse_arg(arg, runlocal=False, label_fraction=1.0, linear_probe=False)
  config = default.get_config()
  config.mode = 'finetune'
  config.labels.fraction = args.label_fraction
  config.finetune.linear_probe = args.linear_probe
  if args.runlocal:
    config = pretrain.runlocal(config)
    config.train.num_epochs = 4
  return config
