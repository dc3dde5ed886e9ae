"""TFDS builder of a user's MRI volumes: a folder of class subfolders.

Layouts as image_folder's: root/<class>/<volume> or
root/{train,val,test}/<class>/<volume> (merged into the one `train` split),
class names being the subfolder names, sorted. Volumes are NIfTI (`.nii`,
`.nii.gz`) or Analyze 7.5 pairs (`.hdr` + `.img`, as OASIS-1; read through the
`.hdr`), read with nibabel; other files are ignored. Each volume is one
subject unless `root/subjects.csv` (header `file,subject_id[,label]`, `file`
relative to root) names the subject, and optionally a new class, of a file:
several scans of one person then share a subject id. `subject_id` is the
index of the subject's name among the sorted unique names (a file without a
subjects.csv row is its own subject, named by its relative path).

Each volume is
  * reoriented to the closest canonical RAS (`nibabel.as_closest_canonical`),
    so axial slices are `volume[:, :, k]`, k from inferior to superior. Analyze
    headers hold no reliable orientation: nibabel assumes the usual
    radiological (LAS) storage and ignores the `orient` field;
  * normalised per volume: the 0.5th and 99.5th percentiles of its nonzero
    voxels map to 0 and 255, clipped, so a few hot voxels and the zero
    background do not set the contrast;
  * masked: brain (head) voxels are those above 10 % of that range;
  * cut into axial slices chosen by `slice_selection`:
      'central': num_slices neighbouring slices centred between the first and
        the last slice holding mask voxels (all slices if there are fewer),
        as the Kaggle set's 32 slices per subject;
      'every': every slice_step-th slice from the first to the last slice
        holding mask voxels;
      'mask': every slice whose mask area is at least min_mask_fraction of
        the largest slice's;
  * shown in the radiological display convention: anterior up, the patient's
    right on the image's left;
  * padded with black to a square of the slice's physical field of view
    (voxel sizes are honoured, so the aspect ratio is kept) and resized to
    image_size x image_size.

`slice_index` is the axial index k in the canonical volume, `file_name`
'<relative path>#<k>'. Each folder and setting gets its own BuilderConfig,
named after the folder, image_size, the slice setting and a hash of the path
and of every file's path, size and modification time, as image_folder's.

  builder = NiftiFolder(folder='path/to/root', image_size=128, data_dir=...)
  builder.download_and_prepare()
"""

import csv
import os
import posixpath

from absl import logging
import nibabel
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from simclr_jax import errors
from simclr_jax.data.datasets import features
from simclr_jax.data.datasets import image_folder

# Hidden files and folders are skipped as image_folder skips them.
_is_hidden = image_folder._is_hidden  # pylint: disable=protected-access
_subfolders = image_folder._subfolders  # pylint: disable=protected-access

SLICE_SELECTIONS = ('central', 'every', 'mask')
SUBJECTS_FILE = 'subjects.csv'
VOLUME_EXTENSIONS = ('.nii', '.nii.gz', '.hdr', '.img')
# Robust intensity range of a volume's nonzero voxels, in percent.
PERCENTILES = (0.5, 99.5)
# Brain mask: normalised intensity above this share of the 0..255 range.
MASK_THRESHOLD = 0.1


class VolumeError(features.UnreadableSource):
  """A file that is not a usable 3D volume; says which and how to fix it."""

  def __init__(self, path, problem, fix):
    super().__init__(f'{path} {problem}; {fix}.')
    self.path, self.problem, self.fix = path, problem, fix


def check_slice_settings(slice_selection, num_slices, slice_step,
                         min_mask_fraction):
  """Raises ValueError, naming the config field, for a bad slice setting."""
  if slice_selection not in SLICE_SELECTIONS:
    raise errors.UserError(
        f'Unknown slice selection {slice_selection!r}; set --config.data.nifti.'
        f'slice_selection to one of {", ".join(SLICE_SELECTIONS)}.')
  if int(num_slices) < 1 or int(slice_step) < 1:
    raise errors.UserError(
        f'num_slices ({num_slices}) and slice_step ({slice_step}) must be at '
        'least 1; fix --config.data.nifti.num_slices or --config.data.nifti.slice_step.')
  if not 0.0 < float(min_mask_fraction) <= 1.0:
    raise errors.UserError(f'min_mask_fraction {min_mask_fraction} is not in (0, 1]; '
                           'fix --config.data.nifti.min_mask_fraction.')


def _load_canonical(path):
  """Returns (float32 [X, Y, Z] RAS volume, in-plane voxel size (dx, dy))."""
  if path.lower().endswith('.img') and not any(
      os.path.exists(path[:-4] + extension) for extension in ('.hdr', '.HDR')):
    raise VolumeError(path, 'has no Analyze .hdr header beside it',
                      'put its .hdr next to it or remove it')
  try:
    image = nibabel.load(path)
    shape = image.shape
    if (len(shape) == 4 and shape[3] > 1) or len(shape) > 4:
      raise VolumeError(
          path, f'is a series of volumes of shape {shape}',
          'split it into 3D volumes (e.g. with fslsplit) and keep the ones '
          'to use')
    if len(shape) < 3 or min(shape[:3]) < 2:
      raise VolumeError(
          path, f'is not a 3D volume (shape {shape})',
          'use --config.data.name=image_folder for 2D slices, or remove it')
    image = nibabel.as_closest_canonical(image)
    volume = image.get_fdata(dtype=np.float32).reshape(image.shape[:3])
    zooms = [float(z) if z > 0 else 1.0 for z in image.header.get_zooms()[:2]]
  except VolumeError:
    raise
  except Exception as error:  # nibabel, gzip and numpy raise many types.
    raise VolumeError(path, f'is not a readable volume ({error})',
                      'fix or remove it') from error
  return np.nan_to_num(volume, nan=0.0, posinf=0.0, neginf=0.0), zooms


def _normalise(path, volume):
  """Returns (float32 volume in [0, 255], bool brain mask) as documented."""
  nonzero = volume[volume != 0]
  # Python floats keep the arithmetic in float32 (numpy scalars would not).
  low, high = (map(float, np.percentile(nonzero, PERCENTILES)) if nonzero.size
               else (0.0, 0.0))
  if high <= low:
    raise VolumeError(path, 'is empty after masking (blank or of one '
                      'intensity)', 'check the file or remove it')
  scaled = np.clip((volume - low) / (high - low), 0.0, 1.0) * 255.0
  return scaled, scaled > MASK_THRESHOLD * 255.0


def _select(areas, slice_selection, num_slices, slice_step,
            min_mask_fraction):
  """Returns the chosen axial indices from the mask area of each slice."""
  occupied = np.flatnonzero(areas)
  first, last = occupied[0], occupied[-1]
  if slice_selection == 'central':
    count = min(int(num_slices), len(areas))
    start = np.clip((first + last + 1 - count) // 2, 0, len(areas) - count)
    return np.arange(start, start + count)
  if slice_selection == 'every':
    return np.arange(first, last + 1, int(slice_step))
  return np.flatnonzero(areas >= min_mask_fraction * areas.max())


def _display_slice(axial, zooms, image_size):
  """Rotates an RAS [X, Y] slice to the display convention, pads, resizes."""
  # Rows run anterior to posterior, columns patient right to left.
  image = np.ascontiguousarray(axial[::-1, ::-1].T)
  height, width = image.shape[0] * zooms[1], image.shape[1] * zooms[0]
  scale = image_size / max(height, width)
  size = (max(1, min(image_size, round(width * scale))),
          max(1, min(image_size, round(height * scale))))
  resized = np.asarray(PIL.Image.fromarray(image).resize(
      size, PIL.Image.Resampling.BILINEAR))
  square = np.zeros((image_size, image_size), np.float32)
  top, left = (image_size - size[1]) // 2, (image_size - size[0]) // 2
  square[top:top + size[1], left:left + size[0]] = resized
  return np.round(np.clip(square, 0.0, 255.0)).astype(np.uint8)


def read_volume_slices(path, image_size=128, slice_selection='central',
                       num_slices=32, slice_step=1, min_mask_fraction=0.5):
  """Reads one volume as display-ready axial slices (see the module doc).

  Args:
    path: a .nii, .nii.gz or Analyze .hdr (or its .img) file.
    image_size: height and width of the slices.
    slice_selection: 'central', 'every' or 'mask'.
    num_slices: 'central': how many slices.
    slice_step: 'every': the step between slices.
    min_mask_fraction: 'mask': smallest mask area kept, as a share of the
      largest slice's.

  Returns:
    (uint8 [n, image_size, image_size, 1] slices, int32 [n] axial indices in
    the canonical RAS volume, increasing).

  Raises:
    VolumeError (a features.UnreadableSource, a ValueError): the file is
      unreadable, not a single 3D volume, or empty after masking.
    ValueError: a slice setting is invalid.
  """
  check_slice_settings(slice_selection, num_slices, slice_step,
                       min_mask_fraction)
  path = os.fspath(path)
  volume, zooms = _load_canonical(path)
  volume, mask = _normalise(path, volume)
  areas = mask.sum(axis=(0, 1))
  indices = _select(areas, slice_selection, num_slices, slice_step,
                    min_mask_fraction)
  if slice_selection == 'central' and len(indices) < num_slices:
    logging.warning('%s has %d axial slices, fewer than num_slices %d; '
                    'taking all.', path, len(indices), num_slices)
  slices = np.stack([_display_slice(volume[:, :, k], zooms, int(image_size))
                     for k in indices])
  return slices[..., None], indices.astype(np.int32)


def _is_volume(filename, filenames):
  lower = filename.lower()
  if lower.endswith('.img'):  # Read through its .hdr when there is one.
    return not {lower[:-4] + '.hdr'} & {name.lower() for name in filenames}
  return lower.endswith(VOLUME_EXTENSIONS)


def _read_subjects(folder, relative_paths):
  """Returns {relative path: (subject name, label or None)} of subjects.csv."""
  path = os.path.join(folder, SUBJECTS_FILE)
  if not os.path.exists(path):
    return {}
  known = set(relative_paths)
  overrides = {}
  with open(path, newline='', encoding='utf-8-sig') as file:
    reader = csv.DictReader(file)
    if not {'file', 'subject_id'} <= set(reader.fieldnames or ()):
      raise errors.UserError(f'{path} needs the header row file,subject_id[,label]; '
                             'fix its first line.')
    for row in reader:
      name = posixpath.normpath((row['file'] or '').strip().replace('\\', '/'))
      if name.lower().endswith('.img') and name[:-4] + '.hdr' in known:
        name = name[:-4] + '.hdr'
      subject = (row['subject_id'] or '').strip()
      if name not in known or not subject or name in overrides:
        raise errors.UserError(
            f'{path} line {reader.line_num} ({name!r}, {subject!r}) does not '
            'name, once, a volume under the folder with a subject; fix the '
            'row (file is relative to the folder).')
      overrides[name] = (subject, (row.get('label') or '').strip() or None)
  return overrides


def list_volumes(folder):
  """Lists the volumes of a folder of class subfolders, without reading them.

  Args:
    folder: the root folder.

  Returns:
    (class_names sorted, list of (relative '/'-separated path, class_name,
    subject_id) sorted by path, relative paths of the other files that the
    data depends on: .img halves and subjects.csv).

  Raises:
    FileNotFoundError: if folder does not exist.
    ValueError: no class subfolders, no volumes, fewer than two classes, or
      a bad subjects.csv.
  """
  if not os.path.isdir(folder):
    raise errors.MissingPathError(
        f'Volume folder {folder} does not exist; set --config.data.path to '
        'a folder of class subfolders of NIfTI or Analyze volumes.')
  top = _subfolders(folder)
  if all(name.lower() in image_folder.SPLIT_FOLDERS for name in top):
    top = [f'{split}/{name}' for split in top
           for name in _subfolders(os.path.join(folder, split))]
  examples, companions, per_class, ignored = [], [], {}, 0
  for class_folder in top:
    class_name = class_folder.split('/')[-1]
    per_class.setdefault(class_folder, 0)
    class_path = os.path.join(folder, class_folder)
    for root, dirnames, filenames in os.walk(class_path):
      dirnames[:] = [name for name in dirnames if not _is_hidden(name)]
      relative_root = os.path.relpath(root, folder).replace(os.sep, '/')
      for filename in filenames:
        relative_path = f'{relative_root}/{filename}'
        if _is_hidden(filename):
          continue
        if _is_volume(filename, filenames):
          examples.append([relative_path, class_name])
          per_class[class_folder] += 1
        elif filename.lower().endswith('.img'):
          companions.append(relative_path)
        else:
          ignored += 1
  if ignored:
    logging.warning('Ignored %d files of %s that are not volumes by their '
                    'extension.', ignored, folder)
  if not examples:
    raise errors.UserError(
        f'Volume folder {folder} holds no .nii, .nii.gz or .hdr/.img volumes '
        'in class subfolders; put each class\'s volumes in root/<class>/, or '
        'use --config.data.name=image_folder for 2D images.')
  empty = [name for name, count in per_class.items() if not count]
  if empty:
    raise errors.UserError(f'Class folder {os.path.join(folder, empty[0])} holds '
                           'no volumes; add volumes or remove the folder.')
  overrides = _read_subjects(folder, [path for path, _ in examples])
  if os.path.exists(os.path.join(folder, SUBJECTS_FILE)):
    companions.append(SUBJECTS_FILE)
  subjects = []
  for example in examples:
    subject, label = overrides.get(example[0], (example[0], None))
    example[1] = label or example[1]
    subjects.append(subject)
  class_names = sorted({class_name for _, class_name in examples})
  if len(class_names) < 2:
    raise errors.UserError(
        f'Volume folder {folder} has one class ({class_names[0]}); point '
        '--config.data.path at a folder with a subfolder per class.')
  subject_ids = {name: i for i, name in enumerate(sorted(set(subjects)))}
  examples = [(path, class_name, subject_ids[subject])
              for (path, class_name), subject in zip(examples, subjects)]
  return class_names, sorted(examples), sorted(companions)


class NiftiFolder(features.FolderBuilder):
  """A user's folder of class subfolders of MRI volumes, as axial slices."""

  KIND = 'volume'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, folder, image_size=128, skip_unreadable=False,
               slice_selection='central', num_slices=32, slice_step=1,
               min_mask_fraction=0.5, data_dir=None, version=None):
    """Scans the folder (not its voxels) and picks the folder's config.

    Args:
      folder: root folder of class subfolders (optionally under train/,
        val/, test/).
      image_size: height and width the slices are stored at.
      skip_unreadable: skip bad volumes with a warning and a count instead
        of failing on the first.
      slice_selection, num_slices, slice_step, min_mask_fraction: which
        axial slices; see `read_volume_slices`.
      data_dir: TFDS data dir (None: TFDS's default).
      version: TFDS version to load (None: VERSION).
    """
    check_slice_settings(slice_selection, num_slices, slice_step,
                         min_mask_fraction)
    self._folder = os.path.abspath(os.fspath(folder))
    self._slice_settings = dict(
        image_size=int(image_size), slice_selection=slice_selection,
        num_slices=int(num_slices), slice_step=int(slice_step),
        min_mask_fraction=float(min_mask_fraction))
    self._image_size = self._slice_settings['image_size']
    self._skip_unreadable = bool(skip_unreadable)
    self._class_names, self._examples, companions = list_volumes(self._folder)
    selection = {'central': f'central{num_slices}',
                 'every': f'every{slice_step}',
                 'mask': f'mask{min_mask_fraction:g}'.replace('.', 'p')}
    name = image_folder.folder_config_name(
        self._folder, self._slice_settings['image_size'],
        [path for path, _, _ in self._examples] + companions)
    config = tfds.core.BuilderConfig(
        name=f'{name}_{selection[slice_selection]}',
        description=f'Axial slices of {self._folder} at {image_size} x '
        f'{image_size} pixels ({selection[slice_selection]}).')
    super().__init__(data_dir=data_dir, config=config, version=version)
    # TFDS re-creates builders from this state when it pickles them.
    self._original_state = dict(
        folder=self._folder, skip_unreadable=self._skip_unreadable,
        data_dir=data_dir, version=version, **self._slice_settings)

  def _read(self, example):
    relative_path, class_name, subject_id = example
    slices, indices = read_volume_slices(os.path.join(self._folder, relative_path),
                                         **self._slice_settings)
    for image, index in zip(slices, indices):
      key = f'{relative_path}#{index:03d}'
      yield key, {
          'image': PIL.Image.fromarray(image[..., 0]),  # PIL encodes fast.
          'label': class_name,
          'file_name': key,
          'subject_id': subject_id,
          'slice_index': index,
      }
