r"""SimCLR pretraining with ASAM (the reference's recipe).

Reference settings on the Kaggle data (GPU/TPU work):
  python main.py --config=configs/pretrain.py --workdir=runs/pretrain
A one-minute CPU demo on the embedded synthetic data:
  python main.py --config=configs/pretrain.py:runlocal --workdir=runs/pretrain
"""

from configs import default


def runlocal(config):
  """Shrinks a config to a CPU demo: synthetic data, tiny ResNet-18, small images."""
  config.dataset = 'synthetic_mri'
  config.image_size = 64
  config.channels = 1
  config.model = 'resnet18'
  config.width = 0.25
  config.encoder_output = 'avgpool'
  config.projection_dims = (64, 32)
  config.projection_dropout = 0.0
  config.head_dropout = 0.0
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 3
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50
  config.knn_k = (1, 10, 50)
  # Short runs: recompute BatchNorm statistics before each evaluation (train.py).
  config.precise_bn_batches = 8
  return config


def get_config(arg=None):
  """Pretraining config; arg: 'runlocal' (a one-minute CPU demo)."""
  args = default.parse_arg(arg, runlocal=False)
  config = default.get_config()
  config.mode = 'pretrain'
  if args.runlocal:
    config = runlocal(config)
  return config
