"""The features every slice data set of this package stores, and the folder builders' base.

Each example is one grayscale axial slice with its class, its source file and the
subject and slice index it came from (-1 where the source does not say).
"""

import abc
import sys

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from simclr_jax import errors


def slice_features(image_size, class_names, *, with_mask=False):
  """The FeaturesDict of one slice: image, label, file_name, subject_id, slice_index.

  Args:
    image_size: side of the square uint8 image (stored as PNG).
    class_names: the ClassLabel names, in label order.
    with_mask: also a brain mask image of the same size (the synthetic data set).
  """
  image = lambda: tfds.features.Image(shape=(image_size, image_size, 1),
                                      encoding_format='png')
  features = {
      'image': image(),
      'label': tfds.features.ClassLabel(names=class_names),
      'file_name': tfds.features.Text(),
      'subject_id': np.int64,
      'slice_index': np.int32,
  }
  if with_mask:
    features['mask'] = image()
  return tfds.features.FeaturesDict(features)


class UnreadableSource(ValueError):
  """A source file a folder builder cannot read; the message names it, the problem and the fix."""


class FolderBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder of slices from a user's folder; a subclass lists and reads the files.

  The subclass's __init__ sets `_folder`, `_image_size`, `_class_names`,
  `_examples` (the source entries) and `_skip_unreadable`; its `_read(example)`
  yields the (key, example) pairs of one source or raises UnreadableSource naming
  the file, its problem and the fix; any other exception is a bug and propagates. `KIND` names a source in messages.
  """

  KIND = 'file'

  def _info(self):
    return self.dataset_info_from_configs(
        description=sys.modules[type(self).__module__].__doc__,
        features=slice_features(self._image_size, self._class_names),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    return {'train': self._generate_examples()}

  @abc.abstractmethod
  def _read(self, example):
    """Yields the (key, example) pairs of one source entry."""

  def _generate_examples(self):
    """Every source's pairs; an unreadable source fails the build, or is skipped if asked."""
    skipped, kind = 0, self.KIND
    for source in self._examples:
      try:
        pairs = list(self._read(source))
      except UnreadableSource as error:
        if not self._skip_unreadable:
          raise errors.UserError(
              f'{str(error).rstrip(".")}, or set --config.data.skip_unreadable=True to skip '
              f'such {kind}s.') from error
        logging.warning('Skipping %s: %s', kind, error)
        skipped += 1
        continue
      yield from pairs
    if skipped:
      logging.warning('Skipped %d of %d %ss in %s.', skipped, len(self._examples), kind,
                      self._folder)
    if skipped == len(self._examples):
      raise errors.UserError(f'No {kind} in {self._folder} is readable; check the files.')
