"""TFDS builders of the project's data sets; importing this registers them.

Every builder has one split, `train`, holding the whole data set, with the
features image (H, W, 1) uint8, label, file_name, subject_id (-1 unknown) and
slice_index (-1 unknown); synthetic_mri adds mask. nifti_folder cuts a folder
of MRI volumes into axial slices with known subject ids. `get_builder` maps the
config's input fields to a builder; then

  builder.download_and_prepare()  # Offline: nothing is downloaded.
  builder.as_dataset(split='train')

Records are TFRecords, which `as_dataset` reads; `as_data_source` needs
`download_and_prepare(file_format='array_record')` instead.
"""

from simclr_jax import errors
from simclr_jax.data.datasets import alzheimer_mri
from simclr_jax.data.datasets import image_folder
from simclr_jax.data.datasets import nifti_folder
from simclr_jax.data.datasets import synthetic_mri

DATASET_NAMES = ('alzheimer_mri', 'synthetic_mri', 'synthetic_mri/small',
                 'image_folder', 'nifti_folder')


def get_builder(name, *, data_dir=None, dataset_path=None, image_size=128,
                skip_unreadable=False, nifti=None):
  """Returns the TFDS builder of a data set named in the config.

  Args:
    name: config.data.name: 'alzheimer_mri', 'synthetic_mri' (or
      'synthetic_mri/<config>', e.g. 'synthetic_mri/small'), 'image_folder',
      'nifti_folder'.
    data_dir: TFDS data dir; None uses TFDS's default (~/tensorflow_datasets).
    dataset_path: alzheimer_mri: the Kaggle zip or its extracted Dataset/
      folder (None: TFDS's manual dir); image_folder, nifti_folder: the root
      folder (required); unused by synthetic_mri.
    image_size: image_folder's and nifti_folder's stored height and width;
      alzheimer_mri and synthetic_mri store 128 x 128 (the input pipeline
      resizes).
    skip_unreadable: image_folder, nifti_folder: skip unreadable files with a
      warning instead of failing.
    nifti: nifti_folder: its slice settings (`slice_selection`, `num_slices`,
      `slice_step`, `min_mask_fraction`: the config's `data.nifti` section; see
      `nifti_folder.NiftiFolder`), None for the builder's defaults.

  Returns:
    A `tfds.core.DatasetBuilder`, not yet prepared.
  """
  dataset, _, config = name.partition('/')
  if name == 'alzheimer_mri':
    return alzheimer_mri.AlzheimerMri(data_dir=data_dir,
                                      dataset_path=dataset_path)
  if dataset == 'synthetic_mri' and (
      not config or config in synthetic_mri.SyntheticMri.builder_configs):
    return synthetic_mri.SyntheticMri(data_dir=data_dir, config=config or None)
  if name in ('image_folder', 'nifti_folder') and not dataset_path:
    raise errors.UserError(
        f'The {name} data set needs dataset_path, the folder of class '
        'subfolders; set --config.data.path.')
  if name == 'nifti_folder':
    return nifti_folder.NiftiFolder(
        folder=dataset_path, image_size=image_size, skip_unreadable=skip_unreadable,
        data_dir=data_dir, **dict(nifti or {}))
  if name == 'image_folder':
    return image_folder.ImageFolder(
        folder=dataset_path, image_size=image_size,
        skip_unreadable=skip_unreadable, data_dir=data_dir)
  raise errors.UserError(
      f'Unknown data set {name!r}; choose one of {", ".join(DATASET_NAMES)}.')
