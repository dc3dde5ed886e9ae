r"""Predict mode: classify new images with a trained run and show where it looked.

Classifies an image file, a folder of images (searched recursively) or a glob,
with the best-on-validation checkpoint of a finetune or baseline run, and writes
predictions.csv, one Grad-CAM overlay per image in overlays/, gradcam_grid.png
(the most confident image of each predicted class) and predict_summary.json:
  python main.py --config=configs/predict.py --config.checkpoint_workdir=runs/ft10 \
    --config.inputs=PATH --workdir=out
PATH is an image file, a folder, a quoted glob such as 'scans/*.png', or
`test_split`: the test split of the run's own data set, with its labels (the
summary then has accuracy) and, for synthetic_mri, its class-signal masks. With
--config.evaluate_cam=True the summary and cam_quality.png also hold the
heatmaps' mask energy (masks needed) and deletion faithfulness:
  python main.py --config=configs/predict.py --config.checkpoint_workdir=runs/ft10 \
    --config.inputs=test_split --config.evaluate_cam=True --workdir=out
A runlocal (64 px) run's last stage is only 2 x 2 pixels; `:runlocal` explains
stage3 (4 x 4) instead:
  python main.py --config=configs/predict.py:runlocal \
    --config.checkpoint_workdir=runs/ft10 --config.inputs=PATH --workdir=out
Model and data fields (model, image_size, channels, dataset, ...) are read from
the run's config.json, so this config holds only what predict itself reads.
"""

from ml_collections import config_dict

from configs import default


def get_config(arg=None):
  """Predict config; arg: 'runlocal' (explain stage3, for 64 px runlocal runs)."""
  args = default.parse_arg(arg, runlocal=False)
  config = default.base_config('predict')

  # ---------------------------------------------------------------- What to classify.
  config.checkpoint_workdir = config_dict.placeholder(str)  # --workdir of a finetune/baseline run.
  config.inputs = config_dict.placeholder(str)  # Image file, folder, glob, or test_split.

  # ---------------------------------------------------------------- Grad-CAM.
  config.cam_method = 'gradcam'  # gradcam | gradcam++ | hirescam.
  config.cam_layer = 'stage4'  # Explained stage: stage4 (the last convolutional one) .. stage1.
  config.batch_size = 32  # Images per Grad-CAM batch.

  # ---------------------------------------------------------------- Heatmap quality.
  config.evaluate_cam = False  # Mask energy (inputs with masks) and deletion faithfulness.
  config.deletion_fractions = (0.05, 0.1, 0.2)  # Pixel shares removed by the deletion test.

  if args.runlocal:
    config.cam_layer = 'stage3'
  return config
