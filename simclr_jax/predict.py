"""Predict mode: classify new images with a trained run and show where it looked.

  python main.py --config=configs/predict.py --config.predict.checkpoint_workdir=runs/ft10 \
    --config.predict.inputs=PATH --workdir=out

PATH is an image file, a folder (searched recursively for image files), a glob,
or `test_split`, the test split of the run's own data set with its labels and,
for synthetic_mri, its class-signal masks. Images are read like the training
data: gray, at the data set's stored size (128 x 128) by the image_folder data
set's reader, then `input_pipeline.preprocess` with the run's config. The
workdir receives:

- predictions.csv: file, predicted class, its probability, the probability of
  every class, the true class where known (test_split, or files in folders
  named after the classes such as the Kaggle Dataset/<class>/), and the
  overlay's name;
- overlays/<name>.png: the image, its heatmap and the class probabilities;
- gradcam_grid.png: the most confident image of each predicted class, side by
  side, image above heatmap (the reference study's figure);
- predict_summary.json: counts, unreadable files, metrics where the true
  classes are known and, with evaluate_cam, the heatmaps' mask energy and
  deletion faithfulness (also drawn in cam_quality.png).
"""

import csv
import glob
import io
import os
import re

from absl import logging
import numpy as np
import PIL.Image

from simclr_jax import checks
from simclr_jax import config_fields as fields
from simclr_jax.data import arrays as arrays_lib
from simclr_jax import errors
from simclr_jax.explain import grid as cam_grid
from simclr_jax.explain import gradcam
from simclr_jax import plots
from simclr_jax.train import workdirs
from simclr_jax.data import splits as splits_lib
from simclr_jax.data.datasets import alzheimer_mri
from simclr_jax.data.datasets import image_folder
from simclr_jax.data.datasets import nifti_folder
from simclr_jax.metrics import classification

TEST_SPLIT = 'test_split'  # inputs: classify the run's own test split.
CLASSIFIER_MODES = ('finetune', 'baseline')
# Overlays drawn per volume: its slices most confident of the volume's predicted class.
NUM_VOLUME_OVERLAYS = 4
# Heatmaps coarser than this many cells a side say little about where the model looked.
MIN_USEFUL_LAYER_SIZE = 4


# ----------------------------------------------------------------------------- checks


def check_run(checkpoint_workdir):
  """Returns the config of a run that can classify, or raises a one-sentence error."""
  if not checkpoint_workdir:
    raise errors.UserError('predict needs a trained classifier; set --config.predict.checkpoint_workdir '
                           'to the --workdir of a finetune or baseline run.')
  if not workdirs.has_config(checkpoint_workdir):
    raise errors.UserError(f'No run found in {checkpoint_workdir} (it has no config.json); set '
                           '--config.predict.checkpoint_workdir to the --workdir of a finetune or '
                           'baseline run.')
  run_config = workdirs.load_config(checkpoint_workdir)
  if run_config.mode not in CLASSIFIER_MODES:
    raise errors.UserError(
        f'{checkpoint_workdir} holds a {run_config.mode} run, whose model has no '
        'classifier head; fine-tune it first (configs/finetune.py) and point '
        '--config.predict.checkpoint_workdir at the finetune or baseline run.')
  if (workdirs.latest_step(checkpoint_workdir, 'best') is None
      and workdirs.latest_step(checkpoint_workdir, 'latest') is None):
    raise errors.UserError(f'The run in {checkpoint_workdir} has no checkpoint yet; let it '
                           'train until its first evaluation, or point '
                           '--config.predict.checkpoint_workdir at a finished run.')
  return run_config


def find_inputs(inputs):
  """Image paths named by an image file, a folder (recursive) or a glob, sorted.

  Files in a folder count if a PIL format claims their extension or they are MRI
  volumes (`is_volume`; hidden files and __MACOSX are skipped); a file named
  directly or matched by a glob counts whatever its extension (an unreadable one
  is reported when read).

  Raises:
    errors.UserError: if `inputs` is empty or matches no file.
  """
  if not inputs:
    raise errors.UserError('Set --config.predict.inputs to an image file, a folder of images, a quoted '
                           f"glob such as 'scans/*.png', or {TEST_SPLIT}.")
  path = os.path.expanduser(inputs)
  if os.path.isdir(path):
    extensions = set(PIL.Image.registered_extensions())
    files = []
    for root, folders, names in os.walk(path):
      folders[:] = [f for f in folders if not f.startswith('.') and f != '__MACOSX']
      files += [os.path.join(root, name) for name in names
                if not name.startswith('.') and (
                    os.path.splitext(name)[1].lower() in extensions or is_volume(name))]
  elif os.path.isfile(path):
    files = [path]
  else:
    files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
  if not files:
    raise errors.UserError(f'--config.predict.inputs={inputs!r} matches no image file; give an image '
                           f"file, a folder of images, a quoted glob such as 'scans/*.png', or "
                           f'{TEST_SPLIT}.')
  # The .img half of an Analyze pair is read through its .hdr.
  headers = {f[:-4] for f in files if f.lower().endswith('.hdr')}
  return sorted(f for f in files if not (f.lower().endswith('.img') and f[:-4] in headers))


def is_volume(name):
  """Whether a file name is an MRI volume (NIfTI .nii / .nii.gz, Analyze .hdr / .img)."""
  return name.lower().endswith(nifti_folder.VOLUME_EXTENSIONS)


def check_config(config):
  """Rejects predict settings, inputs or runs that cannot work, before any work is done."""
  checks.check_mode(config, ('predict',))
  fields.seeds(config, 'seed')
  checks.check_cam_fields(config)
  fields.integer(config, 'predict.batch_size', example=32)
  fields.boolean(config, 'cam.evaluate')
  fractions = fields.get(config, 'cam.deletion_fractions')
  if fractions is not fields.MISSING and not (
      isinstance(fractions, (tuple, list)) and fractions
      and all(fields.is_real(f) and 0.0 < f < 1.0 for f in fractions)):
    fields.fail('cam.deletion_fractions', fractions, 'must be a non-empty tuple of shares in (0, 1)',
                (0.05, 0.1, 0.2))
  inputs = fields.get(config, 'predict.inputs')
  if inputs != TEST_SPLIT:
    find_inputs(None if inputs is fields.MISSING else inputs)
  workdir = fields.get(config, 'predict.checkpoint_workdir')
  check_run(None if workdir is fields.MISSING else workdir)


# ----------------------------------------------------------------------------- inputs


def stored_size(run_config):
  """Height and width at which the run's data set stores its images."""
  if run_config.data.name in ('image_folder', 'nifti_folder'):
    return int(run_config.data.image_size)
  return alzheimer_mri.IMAGE_SIZE  # alzheimer_mri and synthetic_mri: 128 x 128.


def read_image(path, size):
  """Reads any image PIL can open as gray uint8 [size, size, 1], as image_folder does.

  `image_folder.load_grayscale` is the project's one reader of arbitrary images:
  gray by luminance, 16-bit and float images stretched from their own range,
  alpha composited over black, resized to size x size (aspect not kept).
  """
  return np.asarray(image_folder.load_grayscale(path, size), np.uint8)[..., None]


def read_images(files, size, run_config=None):
  """Reads images and volumes: (names, uint8 [n, size, size, 1], unreadable, volume of each).

  A volume contributes its axial slices, named '<file>#<slice index>' as the
  nifti_folder data set names them, cut as the run's config says (its nifti_*
  fields, or the nifti_folder defaults); `volume of each` is the volume file of
  each slice (None for a plain image). Unreadable files are warned about and
  listed.
  """
  run_config = run_config or {}
  names, images, unreadable, volumes = [], [], [], []
  for path in files:
    try:
      if is_volume(path):
        slices, indices = nifti_folder.read_volume_slices(
            path, size, run_config.data.nifti.slice_selection,
            run_config.data.nifti.num_slices, run_config.data.nifti.slice_step,
            run_config.data.nifti.min_mask_fraction)
        images += list(slices)
        names += [f'{path}#{k:03d}' for k in indices]
        volumes += [path] * len(slices)
      else:
        images.append(read_image(path, size))
        names.append(path)
        volumes.append(None)
    except Exception as error:  # pylint: disable=broad-except
      # PIL and nibabel raise many kinds of errors for malformed files; each means unreadable.
      logging.warning('Skipping %s: not a readable image or volume (%s).', path, error)
      unreadable.append(path)
  stacked = np.stack(images) if images else np.zeros((0, size, size, 1), np.uint8)
  return names, stacked, unreadable, volumes


def test_split_inputs(run_config):
  """The test split of the run's data set: (names, uint8 images, labels, masks or None)."""
  arrays = arrays_lib.load_arrays(run_config)
  idx = splits_lib.load_splits(run_config, arrays)['test']
  masks = arrays.masks[idx] if arrays.masks is not None else None
  return list(arrays.file_names[idx]), arrays.images[idx], arrays.labels[idx], masks


def class_names_of_run(checkpoint_workdir, run_config):
  """Class names saved by the run (metrics.json), else those of its data set."""
  if workdirs.is_finished(checkpoint_workdir):
    names = workdirs.read_metrics(checkpoint_workdir).get('class_names')
    if names:
      return list(names)
  if run_config.data.name.startswith(('alzheimer_mri', 'synthetic_mri')):
    return list(alzheimer_mri.CLASS_NAMES)
  logging.warning('The run in %s has no metrics.json with class names yet; classes are '
                  'shown by index.', checkpoint_workdir)
  return [f'class_{k}' for k in range(run_config.model.num_classes)]


def folder_labels(files, class_names):
  """Labels from the files' folder names when every folder is a class (Dataset/<class>/)."""
  folders = [os.path.basename(os.path.dirname(os.path.abspath(f))) for f in files]
  if not folders or any(folder not in class_names for folder in folders):
    return None
  return np.array([class_names.index(folder) for folder in folders], np.int32)


def overlay_names(files):
  """Unique PNG names for the overlays: each file's path below the inputs' common folder."""
  paths = [os.path.abspath(str(f)) for f in files]
  root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ''
  names, used = [], set()
  for path in paths:
    relative = os.path.relpath(path, root)
    base = re.sub(r'[^A-Za-z0-9._-]+', '_',
                  os.path.splitext(relative)[0].replace(os.sep, '__'))
    name, k = base, 1
    while name in used:
      k += 1
      name = f'{base}_{k}'
    used.add(name)
    names.append(f'{name}.png')
  return names


# ----------------------------------------------------------------------------- outputs


def predictions_csv(files, probabilities, class_names, overlays, labels=None):
  """predictions.csv: one row per image."""
  with io.StringIO() as f:
    writer = csv.writer(f)
    header = ['file', 'predicted_class', 'probability']
    header += [f'p_{name}' for name in class_names]
    header += (['true_class'] if labels is not None else []) + ['overlay']
    writer.writerow(header)
    for i, (name, probs) in enumerate(zip(files, probabilities)):
      predicted = int(np.argmax(probs))
      row = [name, class_names[predicted], f'{probs[predicted]:.4f}']
      row += [f'{p:.4f}' for p in probs]
      row += ([class_names[labels[i]]] if labels is not None else [])
      row += [os.path.join('overlays', overlays[i]) if overlays[i] else '']
      writer.writerow(row)
    return f.getvalue()


# ----------------------------------------------------------------------------- mode


def main(config, workdir):
  """Classifies `config.predict.inputs` with `config.predict.checkpoint_workdir`'s best checkpoint.

  Args:
    config: the predict config (configs/predict.py).
    workdir: where predictions.csv, overlays/, gradcam_grid.png,
      predict_summary.json (and cam_quality.png) are written.

  Returns:
    The summary written to predict_summary.json.

  Raises:
    errors.UserError: before any work, for a missing run, a run without a classifier
      (pretrain), inputs that match no file, or unknown CAM settings; after
      reading, if no input image could be read.
  """
  run_dir = config.predict.checkpoint_workdir
  use_test_split = config.predict.inputs == TEST_SPLIT
  files = None if use_test_split else find_inputs(config.predict.inputs)

  run_config, model, variables = workdirs.restore_for_inference(run_dir)
  class_names = class_names_of_run(run_dir, run_config)
  labels = masks = None
  unreadable = []
  if use_test_split:
    names, stored, labels, masks = test_split_inputs(run_config)
    volumes = [None] * len(names)
  else:
    names, stored, unreadable, volumes = read_images(files, stored_size(run_config),
                                                     run_config)
    if not names:
      raise errors.UserError(f'None of the {len(files)} files of --config.predict.inputs='
                             f'{config.predict.inputs!r} is a readable image.')
    labels = folder_labels(names, class_names)
  input_shape = (run_config.data.image_size, run_config.data.image_size, run_config.data.channels)
  layer_size = gradcam.layer_shape(model, variables, input_shape, config.cam.layer)[:2]
  if min(layer_size) < MIN_USEFUL_LAYER_SIZE:
    # Each earlier stage doubles the resolution.
    finer = int(config.cam.layer[-1]) - int(np.ceil(np.log2(
        MIN_USEFUL_LAYER_SIZE / min(layer_size))))
    logging.warning(
        'The %s activations of this run are only %d x %d cells, too coarse to show '
        'where the model looked; --config.cam.layer=stage%d gives %d x %d.',
        config.cam.layer, layer_size[0], layer_size[1], max(1, finer),
        *(np.asarray(layer_size) * 2**(int(config.cam.layer[-1]) - max(1, finer))))
  logging.info('Explaining %d images with %s at %s (%d x %d cells).', len(names),
               config.cam.method, config.cam.layer, *layer_size)
  explanation = cam_grid.explain(model, variables, stored, run_config, config.cam.method,
                                config.cam.layer, batch_size=config.predict.batch_size)
  probabilities = explanation.probabilities
  predicted = probabilities.argmax(-1)

  volume_summary, shown = volume_predictions(volumes, probabilities, class_names)
  overlays = [name if show else '' for name, show in zip(overlay_names(names), shown)]
  workdirs.write_text(workdirs.output_path(workdir, 'predictions.csv'),
                  predictions_csv(names, probabilities, class_names, overlays, labels))
  cam_name = f'{cam_grid.CAM_NAMES[config.cam.method]} ({config.cam.layer})'
  for i, name in enumerate(names):
    if not overlays[i]:
      continue
    truth = f'  (true class: {plots.class_label(class_names[labels[i]])})' \
        if labels is not None else ''
    plots.plot_cam_overlay(stored[i, ..., 0], explanation.heatmaps[i], probabilities[i],
                           class_names, workdirs.output_path(workdir, f'overlays/{overlays[i]}'),
                           title=f'{name}{truth}', cam_name=cam_name)
  cam_grid.write_gradcam_grid(
      workdirs.output_path(workdir, 'gradcam_grid.png'), stored, explanation, names,
      class_names, cam_name,
      f'{cam_name} of {os.path.basename(os.path.normpath(run_dir))} ({run_config.mode}): '
      'the most confident image of each predicted class', labels)

  summary = {
      'checkpoint_workdir': workdirs.workdir_path(run_dir),
      'run_mode': run_config.mode,
      'inputs': config.predict.inputs,
      'class_names': class_names,
      'cam_method': config.cam.method,
      'cam_layer': config.cam.layer,
      'cam_cells': list(layer_size),
      'num_inputs': len(names) + len(unreadable),
      'num_predicted': len(names),
      'num_unreadable': len(unreadable),
      'unreadable': unreadable,
      'predicted_counts': {name: int(np.sum(predicted == k))
                           for k, name in enumerate(class_names)},
  }
  if volume_summary:
    summary['volumes'] = volume_summary
    workdirs.write_text(workdirs.output_path(workdir, 'volume_predictions.csv'),
                    volumes_csv(volume_summary, class_names))
  if labels is not None:
    summary['labels_from'] = 'test split' if use_test_split else 'class folder names'
    summary['metrics'] = classification.classification_metrics(labels, predicted,
                                                              len(class_names))
  if config.cam.evaluate:
    if masks is None:
      logging.warning('No class-signal masks come with these inputs (only '
                      'inputs=%s of a synthetic_mri run has them): the heatmap quality '
                      'has deletion faithfulness but no mask energy.', TEST_SPLIT)
    quality = gradcam.evaluate_heatmaps(
        model, variables, explanation.inputs, explanation.heatmaps, masks, method=config.cam.method,
        layer=config.cam.layer, fractions=tuple(config.cam.deletion_fractions),
        seed=config.seed, batch_size=config.predict.batch_size)
    summary['cam_quality'] = quality
    plots.plot_cam_quality(quality, workdirs.output_path(workdir, 'cam_quality.png'),
                           title=cam_name)
    _log_quality(quality)
  workdirs.write_json(workdirs.output_path(workdir, 'predict_summary.json'), summary)
  logging.info('Predicted %d images (%d unreadable) into %s: %s.', len(names),
               len(unreadable), workdir, summary['predicted_counts'])
  return summary


def volume_predictions(volumes, probabilities, class_names):
  """Each volume's prediction (the mean of its slices' probabilities) and the overlays drawn.

  Args:
    volumes: the volume file of each slice, None for a plain image.
    probabilities: [n, K] class probabilities of each slice.
    class_names: the run's classes.

  Returns:
    ([{'volume', 'predicted_class', 'probabilities', 'num_slices',
    'informative_slices'}], bool [n]): one entry per volume; and whether each
    input gets an overlay: every plain image, and the NUM_VOLUME_OVERLAYS slices of
    each volume most confident of the volume's class.
  """
  shown = np.array([volume is None for volume in volumes])
  summary = []
  for volume in sorted({v for v in volumes if v is not None}):
    members = np.flatnonzero([v == volume for v in volumes])
    mean = probabilities[members].mean(0)
    k = int(mean.argmax())
    informative = members[np.argsort(-probabilities[members, k], kind='stable')]
    informative = informative[:NUM_VOLUME_OVERLAYS]
    shown[informative] = True
    summary.append({'volume': volume, 'predicted_class': class_names[k],
                    'probabilities': {name: float(p) for name, p in zip(class_names, mean)},
                    'num_slices': int(len(members)),
                    'informative_slices': [int(i) for i in informative]})
  return summary, shown


def volumes_csv(volume_summary, class_names):
  """volume_predictions.csv: one row per volume (the subject-level prediction)."""
  with io.StringIO() as f:
    writer = csv.writer(f)
    writer.writerow(['volume', 'predicted_class', 'num_slices']
                    + [f'p_{name}' for name in class_names])
    for entry in volume_summary:
      writer.writerow([entry['volume'], entry['predicted_class'], entry['num_slices']]
                      + [f'{entry["probabilities"][name]:.4f}' for name in class_names])
    return f.getvalue()


def _log_quality(quality):
  if 'mask_energy' in quality:
    energy = quality['mask_energy']
    logging.info('Mask energy: heatmaps %.3f; uniform map %.3f, random maps %.3f, the '
                 'untrained model %.3f, the mask at this resolution %.3f.', energy['cam'],
                 energy['uniform'], energy['random'], energy['untrained_model'],
                 energy['coarse_mask'])
  for d in quality['deletion']:
    logging.info('Deleting %.0f%% of pixels: confidence drop %.3f (most relevant) vs '
                 '%.3f (random).', 100 * d['fraction'], d['top_drop'], d['random_drop'])
