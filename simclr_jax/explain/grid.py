"""Classify stored images with a trained run and show where it looked (Grad-CAM).

Shared by `predict` (new images) and the sweep's report (a run's test split):
`explain` gives each image's model input, heatmap and class probabilities;
`write_gradcam_grid` draws the reference study's figure, the most confident
image of each predicted class, image above heatmap.
"""

import dataclasses
import os

import numpy as np

from simclr_jax.explain import gradcam
from simclr_jax.data import batches
from simclr_jax import plots
from simclr_jax.metrics import classification

CAM_NAMES = {'gradcam': 'Grad-CAM', 'gradcam++': 'Grad-CAM++', 'hirescam': 'HiResCAM'}


@dataclasses.dataclass
class Explanation:
  inputs: np.ndarray  # float32 [N, S, S, C] model inputs.
  heatmaps: np.ndarray  # float32 [N, S, S] in [0, 1], of each image's predicted class.
  probabilities: np.ndarray  # float64 [N, K].


def explain(model, variables, images_uint8, run_config, method, layer, batch_size=None):
  """Heatmaps and probabilities of a classifier on stored uint8 images [N, H, W, 1].

  Images are preprocessed as the run's evaluation does (size, channels).
  """
  inputs = batches.preprocess(images_uint8, run_config)
  heatmaps, logits = gradcam.cam(model, variables, inputs, method, layer,
                                 batch_size=batch_size)
  return Explanation(inputs, np.asarray(heatmaps), classification.softmax(logits))


def _short(name, length=28):
  name = os.path.basename(str(name))
  return name if len(name) <= length else name[:length - 3] + '...'


def write_gradcam_grid(path, images, explanation, names, class_names, cam_name, title,
                       labels=None):
  """gradcam_grid.png: the most confident image of each predicted class.

  Args:
    path: PNG to write.
    images: uint8 [N, H, W, 1] stored images, drawn under the upsampled heatmaps.
    explanation: their `Explanation`.
    names: [N] file names, shown under each column.
    class_names: names of the classes, indexed by label.
    cam_name: e.g. 'Grad-CAM (stage3)'.
    title: the figure's title.
    labels: optional int [N] true classes, shown beside the prediction.

  Returns:
    The figure as an RGB uint8 array.
  """
  probabilities = explanation.probabilities
  predicted = probabilities.argmax(-1)
  column_images, column_maps, titles = [], [], []
  for k, name in enumerate(class_names):
    members = np.flatnonzero(predicted == k)
    if not len(members):
      column_images.append(None)
      column_maps.append(None)
      titles.append(f'{plots.class_label(name)}:\nno image predicted')
      continue
    i = members[np.argmax(probabilities[members, k])]
    truth = (f', true {plots.class_label(class_names[labels[i]])}'
             if labels is not None else '')
    column_images.append(images[i, ..., 0])
    column_maps.append(explanation.heatmaps[i])
    titles.append(f'{plots.class_label(name)}\np = {probabilities[i, k]:.2f}{truth}\n'
                  f'{_short(names[i])}')
  return plots.plot_cam_grid(column_images, column_maps, titles, path, title=title,
                             cam_name=cam_name)
