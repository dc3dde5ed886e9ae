r"""Predict mode: classify new images with a trained run and show where it looked.

Classifies an image file, a folder of images (searched recursively) or a glob,
with the best-on-validation checkpoint of a finetune or baseline run, and writes
predictions.csv, one Grad-CAM overlay per image in overlays/, gradcam_grid.png
(the most confident image of each predicted class) and predict_summary.json:
  python main.py --config=configs/predict.py --config.predict.checkpoint_workdir=runs/ft10 \
    --config.predict.inputs=PATH --workdir=out
PATH is an image file, a folder, a quoted glob such as 'scans/*.png', or
`test_split`: the test split of the run's own data set, with its labels (the
summary then has accuracy) and, for synthetic_mri, its class-signal masks. With
--config.cam.evaluate=True the summary and cam_quality.png also hold the
heatmaps' mask energy (masks needed) and deletion faithfulness:
  python main.py --config=configs/predict.py --config.predict.checkpoint_workdir=runs/ft10 \
    --config.predict.inputs=test_split --config.cam.evaluate=True --workdir=out
A runlocal (64 px) run's last stage is only 2 x 2 pixels; `:runlocal` explains
stage3 (4 x 4) instead:
  python main.py --config=configs/predict.py:runlocal \
    --config.predict.checkpoint_workdir=runs/ft10 --config.predict.inputs=PATH --workdir=out
Model and data fields (the model and data sections) are read from
the run's config.json, so this config holds only what predict itself reads.
"""

import ml_collections
from ml_collections import config_dict

from configs import default


def get_config(arg=None):
  """Predict config; arg: 'runlocal' (explain stage3, for 64 px runlocal runs)."""
  args = default.parse_arg(arg, runlocal=False)
  config = default.base_config('predict')

  # ---------------------------------------------------------------- What to classify.
  config.predict = ml_collections.ConfigDict()
  config.predict.checkpoint_workdir = config_dict.placeholder(str)  # --workdir of a finetune/baseline run.
  config.predict.inputs = config_dict.placeholder(str)  # Image file, folder, glob, or test_split.
  config.predict.batch_size = 32  # Images per Grad-CAM batch.

  # ---------------------------------------------------------------- Grad-CAM.
  config.cam = default.cam_section()
  config.cam.evaluate = False  # Heatmap quality: mask energy (inputs with masks) and deletion faithfulness.
  config.cam.deletion_fractions = (0.05, 0.1, 0.2)  # Pixel shares removed by the deletion test.

  if args.runlocal:
    config.cam.layer = 'stage3'
  return config

