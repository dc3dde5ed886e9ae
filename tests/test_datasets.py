"""Tests of the TFDS builders in simclr_jax.data.datasets.

The Kaggle tests read `<repo>/../shared/data/alzheimer-mri-dataset.zip` and
skip when it is absent; everything else uses generated files in tmp dirs.
"""

import io
import pathlib
import zipfile

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from simclr_jax.data import datasets
from simclr_jax.data.datasets import alzheimer_mri
from simclr_jax.data.datasets import image_folder
from simclr_jax.data.datasets import synthetic_mri

KAGGLE_ZIP = (pathlib.Path(__file__).resolve().parents[1].parent
              / 'shared' / 'data' / 'alzheimer-mri-dataset.zip')
needs_kaggle_zip = pytest.mark.skipif(
    not KAGGLE_ZIP.exists(),
    reason=f'the Kaggle data is not at {KAGGLE_ZIP} (see its README.md)')


def _load(builder):
  """Prepares a builder and returns its whole train split as numpy arrays."""
  builder.download_and_prepare()
  return tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))


# ---------------------------------------------------------------- synthetic_mri


def test_subjects_per_class_follows_kaggle_proportions_with_two_minimum():
  np.testing.assert_array_equal(synthetic_mri.subjects_per_class(100),
                                [14, 2, 49, 35])
  small = synthetic_mri.subjects_per_class(24)
  assert small.sum() == 24 and small.min() >= 2
  assert small[2] > small[3] > small[0]  # Non > Very mild > Mild.
  with pytest.raises(ValueError, match='at least 8 subjects'):
    synthetic_mri.subjects_per_class(7)


def test_generate_is_deterministic_with_documented_shapes():
  first = synthetic_mri.generate(10, 3, 32, seed=1)
  second = synthetic_mri.generate(10, 3, 32, seed=1)
  other = synthetic_mri.generate(10, 3, 32, seed=2)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name])
  assert not np.array_equal(first['image'], other['image'])
  assert first['image'].shape == first['mask'].shape == (30, 32, 32, 1)
  assert first['image'].dtype == first['mask'].dtype == np.uint8
  assert set(np.unique(first['mask'])) == {0, 1}
  assert first['label'].dtype == np.int32
  assert first['subject_id'].dtype == np.int64
  np.testing.assert_array_equal(np.bincount(first['subject_id']), [3] * 10)
  np.testing.assert_array_equal(first['slice_index'][:3], [0, 1, 2])
  # Every subject has one class, in the proportions of subjects_per_class.
  subject_labels = first['label'][::3]
  np.testing.assert_array_equal(
      np.bincount(subject_labels, minlength=4),
      synthetic_mri.subjects_per_class(10))
  for subject in range(10):
    assert len(set(first['label'][first['subject_id'] == subject])) == 1
  assert len(set(first['file_name'])) == 30


def test_generate_severity_shows_as_more_csf_and_neighbours_look_alike():
  data = synthetic_mri.generate(40, 4, 64, seed=0)
  severity = np.asarray(synthetic_mri.SEVERITY)[data['label']]
  images = data['image'][..., 0].astype(np.float32)
  brain = images > 20
  dark_share = ((images < 0.3 * 255) & brain).sum((1, 2)) / brain.sum((1, 2))
  means = [dark_share[severity == level].mean() for level in range(4)]
  assert means[0] < means[1] < means[2]
  assert np.corrcoef(dark_share, severity)[0, 1] > 0.5
  # Like the real data: the nearest other image is mostly the same subject's.
  flat = images.reshape(len(images), -1)
  flat -= flat.mean(1, keepdims=True)
  flat /= np.linalg.norm(flat, axis=1, keepdims=True)
  similarity = flat @ flat.T
  np.fill_diagonal(similarity, -np.inf)
  nearest = similarity.argmax(1)
  assert (data['subject_id'][nearest] == data['subject_id']).mean() > 0.8


def test_mask_is_where_severity_changes_the_image():
  # What is drawn from the rng does not depend on severity, so one seed gives
  # one subject at every severity; only the class signal differs.
  renders = [
      synthetic_mri._render_subject(np.random.default_rng(3), level, 4, 48)
      for level in range(4)]
  healthy_images, mask = renders[0]
  assert mask.any(axis=(1, 2)).all()  # Never empty.
  assert mask.mean() < 0.5
  for images, level_mask in renders[1:]:
    np.testing.assert_array_equal(level_mask, mask)
    change = np.abs(images - healthy_images)
    assert change.sum() > 1.0
    assert change[~mask].sum() < 1e-3 * change.sum()


def test_synthetic_builder_small_config_matches_generate(tmp_path):
  builder = datasets.get_builder('synthetic_mri/small', data_dir=tmp_path)
  assert builder.builder_config.name == 'small'
  data = _load(builder)
  assert (tmp_path / 'synthetic_mri' / 'small' / '1.0.0').is_dir()
  expected = synthetic_mri.generate(24, 8, 128, seed=0)
  assert len(data['label']) == 24 * 8
  assert builder.info.features['label'].names == list(alzheimer_mri.CLASS_NAMES)
  position = {name: i for i, name in enumerate(expected['file_name'])}
  order = [position[name.decode()] for name in data['file_name']]
  for name in ('image', 'mask', 'label', 'subject_id', 'slice_index'):
    np.testing.assert_array_equal(data[name], expected[name][order])


# ---------------------------------------------------------------- image_folder


def _save(path, image, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **kwargs)


@pytest.fixture
def mixed_folder(tmp_path):
  """train/ and test/ levels, five images of mixed formats, sizes and modes."""
  rng = np.random.default_rng(0)
  root = tmp_path / 'my scans'
  _save(root / 'train' / 'AD' / 'a1.png',
        PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8), 'RGB'))
  _save(root / 'train' / 'AD' / 'a2.jpg',
        PIL.Image.fromarray(rng.integers(0, 255, (200, 200), np.uint8), 'L'))
  _save(root / 'train' / 'CN' / 'c1.bmp',
        PIL.Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8), 'RGB'))
  _save(root / 'test' / 'CN' / 'deeper' / 'c2.tif',
        PIL.Image.fromarray(rng.integers(0, 60000, (30, 30)).astype(np.uint16)))
  _save(root / 'test' / 'AD' / 'a3.gif',
        PIL.Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8), 'L'))
  (root / 'train' / 'AD' / 'notes.txt').write_text('not an image')
  return root


def test_image_folder_merges_splits_and_converts_every_format(
    mixed_folder, tmp_path):
  builder = datasets.get_builder(
      'image_folder', data_dir=tmp_path / 'tfds', dataset_path=mixed_folder,
      image_size=32)
  data = _load(builder)
  names = sorted(name.decode() for name in data['file_name'])
  assert names == ['test/AD/a3.gif', 'test/CN/deeper/c2.tif', 'train/AD/a1.png',
                   'train/AD/a2.jpg', 'train/CN/c1.bmp']
  assert builder.info.features['label'].names == ['AD', 'CN']
  assert data['image'].shape == (5, 32, 32, 1)
  labels = dict(zip((n.decode() for n in data['file_name']), data['label']))
  assert labels['train/AD/a2.jpg'] == 0 and labels['test/CN/deeper/c2.tif'] == 1
  np.testing.assert_array_equal(data['subject_id'], -1)
  np.testing.assert_array_equal(data['slice_index'], -1)
  # 16-bit images are stretched to the 8-bit range, not clipped to white.
  tif = data['image'][[n.decode() for n in data['file_name']].index(
      'test/CN/deeper/c2.tif')]
  assert 0 < tif.mean() < 255


def test_image_folder_config_is_distinct_per_folder_and_content(
    mixed_folder, tmp_path):
  first = image_folder.ImageFolder(folder=mixed_folder, data_dir=tmp_path)
  again = image_folder.ImageFolder(folder=mixed_folder, data_dir=tmp_path)
  other_size = image_folder.ImageFolder(
      folder=mixed_folder, image_size=64, data_dir=tmp_path)
  assert first.builder_config.name == again.builder_config.name
  assert first.builder_config.name.startswith('my_scans_128px_')
  assert other_size.builder_config.name != first.builder_config.name
  PIL.Image.new('L', (8, 8)).save(mixed_folder / 'train' / 'CN' / 'c3.png')
  changed = image_folder.ImageFolder(folder=mixed_folder, data_dir=tmp_path)
  assert changed.builder_config.name != first.builder_config.name
  assert changed.data_dir != first.data_dir


def test_image_folder_unreadable_file_fails_or_is_skipped(
    mixed_folder, tmp_path):
  broken = mixed_folder / 'train' / 'CN' / 'broken.png'
  broken.write_bytes(b'this is not a png')
  failing = datasets.get_builder(
      'image_folder', data_dir=tmp_path / 'tfds', dataset_path=mixed_folder,
      image_size=32)
  with pytest.raises(ValueError, match='broken.png is not a readable image'):
    failing.download_and_prepare()
  assert not pathlib.Path(failing.data_dir).exists()
  skipping = datasets.get_builder(
      'image_folder', data_dir=tmp_path / 'tfds', dataset_path=mixed_folder,
      image_size=32, skip_unreadable=True)
  data = _load(skipping)
  assert len(data['label']) == 5
  assert b'train/CN/broken.png' not in list(data['file_name'])


def test_image_folder_without_class_folders_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    image_folder.ImageFolder(folder=tmp_path / 'missing', data_dir=tmp_path)
  (tmp_path / 'flat').mkdir()
  PIL.Image.new('L', (8, 8)).save(tmp_path / 'flat' / 'x.png')
  with pytest.raises(ValueError, match='has no class subfolders'):
    image_folder.ImageFolder(folder=tmp_path / 'flat', data_dir=tmp_path)
  (tmp_path / 'flat' / 'empty_class').mkdir()
  with pytest.raises(ValueError, match='empty_class holds no images'):
    image_folder.ImageFolder(folder=tmp_path / 'flat', data_dir=tmp_path)


# ---------------------------------------------------------------- get_builder


def test_get_builder_names(tmp_path):
  assert isinstance(datasets.get_builder('synthetic_mri', data_dir=tmp_path),
                    synthetic_mri.SyntheticMri)
  with pytest.raises(ValueError, match="Unknown data set 'cifar10'"):
    datasets.get_builder('cifar10')
  with pytest.raises(ValueError, match="Unknown data set 'synthetic_mri/huge'"):
    datasets.get_builder('synthetic_mri/huge')
  with pytest.raises(ValueError, match='needs dataset_path'):
    datasets.get_builder('image_folder')


# ---------------------------------------------------------------- alzheimer_mri


def test_infer_subject_numbering():
  assert alzheimer_mri.infer_subject('Mild_Demented', 1) == (0, 0)
  assert alzheimer_mri.infer_subject('Mild_Demented', 29) == (0, 1)
  assert alzheimer_mri.infer_subject('Moderate_Demented', 64) == (29, 31)
  assert alzheimer_mri.infer_subject('Non_Demented', 2445) == (74, 24)
  assert alzheimer_mri.infer_subject('Very_Mild_Demented', 2240) == (199, 31)


def _jpeg(size=128):
  buffer = io.BytesIO()
  PIL.Image.new('L', (size, size), 90).save(buffer, format='JPEG')
  return buffer.getvalue()


_PREFIXES = {'Mild_Demented': 'mild', 'Moderate_Demented': 'moderate',
             'Non_Demented': 'non', 'Very_Mild_Demented': 'verymild'}


def _fake_kaggle_zip(path, replace=None, counts=None):
  """Writes a zip laid out as the Kaggle one, every image the same gray JPG.

  Args:
    path: where to write it.
    replace: {member: bytes} to put in place of some images.
    counts: images per class (default: the Kaggle counts).
  """
  image = _jpeg()
  counts = counts or alzheimer_mri.IMAGES_PER_CLASS
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    for class_name, count in counts.items():
      for number in range(1, count + 1):
        member = f'Dataset/{class_name}/{_PREFIXES[class_name]}_{number}.jpg'
        archive.writestr(member, (replace or {}).get(member, image))
  return path


@pytest.mark.parametrize('content, message', [
    (b'not a jpeg', 'non_1.jpg in .* is not a readable image'),
    (_jpeg(64), 'non_1.jpg in .* is 64 x 64 pixels'),
])
def test_alzheimer_bad_image_fails_and_leaves_nothing(
    tmp_path, content, message):
  # Sorted members put Non_Demented after the 960 Mild and Moderate images, so
  # the build fails with examples already written.
  source = _fake_kaggle_zip(tmp_path / 'archive.zip',
                            replace={'Dataset/Non_Demented/non_1.jpg': content})
  builder = datasets.get_builder('alzheimer_mri', data_dir=tmp_path / 'tfds',
                                 dataset_path=source)
  with pytest.raises(ValueError, match=message):
    builder.download_and_prepare()
  prepared = tmp_path / 'tfds' / 'alzheimer_mri'
  assert not (prepared / '1.0.0').exists()
  assert not list(prepared.glob('*incomplete*'))


def test_alzheimer_wrong_count_found_in_manual_dir(tmp_path):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  counts = dict(alzheimer_mri.IMAGES_PER_CLASS, Mild_Demented=5)
  _fake_kaggle_zip(manual_dir / 'archive.zip', counts=counts)
  builder = alzheimer_mri.AlzheimerMri(data_dir=tmp_path / 'tfds')
  with pytest.raises(ValueError, match=(
      r'Dataset/Mild_Demented in .*archive.zip holds 5 files but the Kaggle '
      'data set has 896')):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  assert not (tmp_path / 'tfds' / 'alzheimer_mri' / '1.0.0').exists()


def test_alzheimer_missing_data_gives_download_instructions(tmp_path):
  builder = alzheimer_mri.AlzheimerMri(data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match='kaggle.com/datasets'):
    builder.download_and_prepare()
  with pytest.raises(FileNotFoundError, match='does not exist'):
    alzheimer_mri.list_examples(str(tmp_path / 'nowhere.zip'))


def test_alzheimer_folder_problems_are_named(tmp_path):
  root = tmp_path / 'Dataset'
  for class_name in alzheimer_mri.CLASS_NAMES:
    (root / class_name).mkdir(parents=True)
  (root / 'Other_Demented').mkdir()
  with pytest.raises(ValueError,
                     match='Unexpected folder Dataset/Other_Demented'):
    alzheimer_mri.list_examples(str(tmp_path))
  (root / 'Other_Demented').rmdir()
  with pytest.raises(ValueError,
                     match='Class folder Dataset/Mild_Demented .* is empty'):
    alzheimer_mri.list_examples(str(tmp_path))
  (root / 'Mild_Demented' / 'mild_1.jpg').write_bytes(b'')
  (root / 'Mild_Demented' / 'Moderate_Demented').mkdir()
  with pytest.raises(ValueError, match='Class folders found in several places'):
    alzheimer_mri.list_examples(str(tmp_path))


@pytest.fixture(scope='module')
def kaggle_from_zip(tmp_path_factory):
  """The real data set built once from the zip (about 20 s)."""
  builder = datasets.get_builder(
      'alzheimer_mri', data_dir=tmp_path_factory.mktemp('tfds'),
      dataset_path=KAGGLE_ZIP)
  return builder, _load(builder)


@needs_kaggle_zip
def test_alzheimer_from_zip_has_kaggle_counts_and_subjects(kaggle_from_zip):
  builder, data = kaggle_from_zip
  assert builder.info.features['label'].names == list(alzheimer_mri.CLASS_NAMES)
  np.testing.assert_array_equal(np.bincount(data['label']),
                                [896, 64, 3200, 2240])
  assert data['image'].shape == (6400, 128, 128, 1)
  subjects, slices_per_subject = np.unique(
      data['subject_id'], return_counts=True)
  np.testing.assert_array_equal(subjects, np.arange(200))
  np.testing.assert_array_equal(slices_per_subject, 32)
  for subject in (0, 29, 130):
    in_subject = data['subject_id'] == subject
    assert len(set(data['label'][in_subject])) == 1
    np.testing.assert_array_equal(
        np.sort(data['slice_index'][in_subject]), np.arange(32))
  # The stored pixels are the JPG's decoded pixels (PNG is lossless).
  first = data['file_name'][0].decode()
  with zipfile.ZipFile(KAGGLE_ZIP) as archive:
    original = PIL.Image.open(io.BytesIO(archive.read(f'Dataset/{first}')))
    np.testing.assert_array_equal(
        data['image'][0, ..., 0], np.asarray(original))


@needs_kaggle_zip
def test_alzheimer_from_extracted_folder_with_extra_top_folder(
    kaggle_from_zip, tmp_path):
  extracted = tmp_path / 'download'
  with zipfile.ZipFile(KAGGLE_ZIP) as archive:
    archive.extractall(extracted / 'alzheimer-mri-dataset')
  builder = datasets.get_builder('alzheimer_mri', data_dir=tmp_path / 'tfds',
                                 dataset_path=extracted)
  data = _load(builder)
  _, from_zip = kaggle_from_zip
  order_zip = np.argsort(from_zip['file_name'])
  order = np.argsort(data['file_name'])
  for name in ('file_name', 'label', 'subject_id', 'slice_index'):
    np.testing.assert_array_equal(data[name][order], from_zip[name][order_zip])


@needs_kaggle_zip
def test_alzheimer_copy_of_a_few_files_is_a_clear_error(tmp_path):
  with zipfile.ZipFile(KAGGLE_ZIP) as archive:
    for class_name, prefix in _PREFIXES.items():
      for number in (1, 2):
        archive.extract(f'Dataset/{class_name}/{prefix}_{number}.jpg', tmp_path)
  builder = datasets.get_builder('alzheimer_mri', data_dir=tmp_path / 'tfds',
                                 dataset_path=tmp_path / 'Dataset')
  with pytest.raises(ValueError, match=(
      'Class folder Mild_Demented in .* holds 2 files but the Kaggle data set '
      'has 896; use the complete, unmodified download')):
    builder.download_and_prepare()
  assert not (tmp_path / 'tfds' / 'alzheimer_mri' / '1.0.0').exists()
