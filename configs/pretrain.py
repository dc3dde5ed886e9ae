r"""SimCLR pretraining with ASAM (the reference's recipe).

Reference settings on the Kaggle data (GPU/TPU work):
  python main.py --config=configs/pretrain.py --workdir=runs/pretrain
A one-minute CPU demo on the embedded synthetic data:
  python main.py --config=configs/pretrain.py:runlocal --workdir=runs/pretrain
"""

from configs import default


def runlocal(config):
  """Shrinks a config to a CPU demo: synthetic data, tiny ResNet-18, small images."""
  config.data.name = 'synthetic_mri'
  config.data.image_size = 64
  config.data.channels = 1
  config.model.name = 'resnet18'
  config.model.width = 0.25
  config.model.encoder_output = 'avgpool'
  config.pretrain.projection_dims = (64, 32)
  config.pretrain.projection_dropout = 0.0
  config.supervised.head_dropout = 0.0
  config.train.batch_size = 32
  config.eval.batch_size = 128
  config.train.num_epochs = 3
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 50
  config.eval.knn_k = (1, 10, 50)
  # Short runs: recompute BatchNorm statistics before each evaluation (train/evaluators.py).
  config.eval.precise_bn_batches = 8
  return config


def get_config(arg=None):
  """Pretraining config; arg: 'runlocal' (a one-minute CPU demo)."""
  args = default.parse_arg(arg, runlocal=False)
  config = default.get_config()
  config.mode = 'pretrain'
  if args.runlocal:
    config = runlocal(config)
  return config
