"""TFDS builder of a user's own images: a folder of class subfolders.

Accepted layouts (class names are the subfolder names, sorted):

  root/<class>/<image>                 or
  root/{train,val,test}/<class>/<image>

Images may also sit deeper inside a class folder (root/<class>/<any>/<image>).
With the second layout the split folders are merged into the single `train`
split, because the project computes its own splits by subject; `file_name` is
the image's path relative to root, so it starts with 'train/', 'val/' or
'test/' and says where each image came from.

Any format PIL reads (jpg, png, bmp, tif, gif, webp, ...) at any size and mode
is converted to grayscale and resized to image_size x image_size (aspect ratio
not kept); 16-bit and float images are rescaled from their own range, alpha is
composited over black. Files whose extension no PIL format claims (notes,
spreadsheets) are ignored. `subject_id` and `slice_index` are -1: unknown
(the audit mode recovers subject groups from image similarity).

A folder's content can change, so each folder gets its own BuilderConfig,
named after the folder, image_size and a hash of the absolute path and of
every image's path, size and modification time: two folders, or one folder
before and after an edit, never share prepared data.

  builder = ImageFolder(folder='path/to/root', image_size=128, data_dir=...)
  builder.download_and_prepare()
"""

import hashlib
import os
import re

from absl import logging
import numpy as np
import PIL.Image
import PIL.ImageOps
import tensorflow_datasets as tfds

from simclr_jax import errors
from simclr_jax.data.datasets import features

# Folder names of a train/test level above the class folders.
SPLIT_FOLDERS = ('train', 'val', 'validation', 'test')


def _is_hidden(name):
  return name.startswith('.') or name == '__MACOSX'


def _subfolders(path):
  return sorted(entry.name for entry in os.scandir(path)
                if entry.is_dir() and not _is_hidden(entry.name))


def list_images(folder):
  """Lists the images of a folder of class subfolders, without decoding.

  Args:
    folder: the root folder.

  Returns:
    (class_names sorted, list of (relative '/'-separated path, class_name)
    sorted by path).

  Raises:
    FileNotFoundError: if folder does not exist.
    ValueError: if it has no class subfolders or a class folder has no image.
  """
  if not os.path.isdir(folder):
    raise errors.MissingPathError(
        f'Image folder {folder} does not exist; set dataset_path to a folder '
        'of class subfolders.')
  top = _subfolders(folder)
  if not top:
    raise errors.UserError(
        f'Image folder {folder} has no class subfolders; put the images of '
        'each class in a subfolder named after the class.')
  if all(name.lower() in SPLIT_FOLDERS for name in top):
    class_folders = [f'{split}/{name}' for split in top
                     for name in _subfolders(os.path.join(folder, split))]
    if not class_folders:
      raise errors.UserError(
          f'The split folders {", ".join(top)} of {folder} have no class '
          'subfolders; put the images of each class in <split>/<class>/.')
  else:
    class_folders = top
  image_extensions = set(PIL.Image.registered_extensions())

  examples, ignored = [], 0
  for class_folder in class_folders:
    class_name = class_folder.split('/')[-1]
    found = 0
    class_path = os.path.join(folder, class_folder)
    for root, dirnames, filenames in os.walk(class_path):
      dirnames[:] = [name for name in dirnames if not _is_hidden(name)]
      relative_root = os.path.relpath(root, folder).replace(os.sep, '/')
      for filename in filenames:
        if _is_hidden(filename):
          continue
        if os.path.splitext(filename)[1].lower() not in image_extensions:
          ignored += 1
          continue
        examples.append((f'{relative_root}/{filename}', class_name))
        found += 1
    if not found:
      raise errors.UserError(
          f'Class folder {class_path} holds no images; '
          'add images or remove the folder.')
  if ignored:
    logging.warning('Ignored %d files of %s that are not images by their '
                    'extension.', ignored, folder)
  class_names = sorted({class_name for _, class_name in examples})
  return class_names, sorted(examples)


def load_grayscale(path, image_size):
  """Reads any PIL-readable image as an image_size x image_size 'L' image.

  Raises:
    Whatever PIL raises for a file it cannot read.
  """
  with PIL.Image.open(path) as image:
    image = PIL.ImageOps.exif_transpose(image)  # Also loads the first frame.
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
      # 8 bits cannot hold these; stretch their own range instead of clipping.
      values = np.asarray(image, dtype=np.float32)
      low, high = values.min(), values.max()
      values = (values - low) / max(high - low, 1e-12) * 255.0
      image = PIL.Image.fromarray(np.round(values).astype(np.uint8))
    elif 'A' in image.getbands() or 'transparency' in image.info:
      rgba = image.convert('RGBA')
      image = PIL.Image.alpha_composite(
          PIL.Image.new('RGBA', rgba.size, (0, 0, 0, 255)), rgba)
    image = image.convert('L').resize(
        (image_size, image_size), PIL.Image.Resampling.BILINEAR)
  return image


def folder_config_name(folder, image_size, relative_paths):
  """Returns a BuilderConfig name unique to a folder, its content and size."""
  folder = os.path.abspath(folder)
  digest = hashlib.sha256(f'{folder}\n{image_size}\n'.encode())
  for relative_path in relative_paths:
    stat = os.stat(os.path.join(folder, relative_path))
    digest.update(
        f'{relative_path}\t{stat.st_size}\t{stat.st_mtime_ns}\n'.encode())
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(folder).lower()).strip('_')
  return f'{slug or "root"}_{image_size}px_{digest.hexdigest()[:12]}'


class ImageFolder(features.FolderBuilder):
  """A user's folder of class subfolders as grayscale images."""

  KIND = 'image'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, folder, image_size=128, skip_unreadable=False,
               data_dir=None, version=None):
    """Scans the folder (not its pixels) and picks the folder's config.

    Args:
      folder: root folder of class subfolders (optionally under train/,
        val/, test/).
      image_size: height and width the images are stored at.
      skip_unreadable: skip files PIL cannot read, with a warning and a count,
        instead of failing on the first.
      data_dir: TFDS data dir (None: TFDS's default).
      version: TFDS version to load (None: VERSION).
    """
    self._folder = os.path.abspath(os.fspath(folder))
    self._image_size = int(image_size)
    self._skip_unreadable = bool(skip_unreadable)
    self._class_names, self._examples = list_images(self._folder)
    config = tfds.core.BuilderConfig(
        name=folder_config_name(self._folder, self._image_size,
                                [path for path, _ in self._examples]),
        description=f'{self._folder} at {image_size} x {image_size} pixels.')
    super().__init__(data_dir=data_dir, config=config, version=version)
    # TFDS re-creates builders from this state when it pickles them.
    self._original_state = dict(
        folder=self._folder, image_size=self._image_size,
        skip_unreadable=self._skip_unreadable, data_dir=data_dir,
        version=version)

  def _read(self, example):
    relative_path, class_name = example
    path = os.path.join(self._folder, relative_path)
    try:
      image = load_grayscale(path, self._image_size)
    except Exception as error:  # PIL raises many types for a broken file.
      raise features.UnreadableSource(
          f'{path} is not a readable image ({error}); fix or remove it') from error
    yield relative_path, {
        'image': image,  # TFDS encodes PIL images with PIL: fast.
        'label': class_name,
        'file_name': relative_path,
        'subject_id': -1,
        'slice_index': -1,
    }
