"""Tests of the nifti_folder builder and of synthetic_mri's volume writer.

Every volume is a small array written with nibabel into tmp_path.
"""

import logging
import pathlib

import nibabel
import numpy as np
import pytest
import tensorflow_datasets as tfds

from simclr_jax.data import datasets
from simclr_jax.data.datasets import nifti_folder
from simclr_jax.data.datasets import synthetic_mri


def _save(path, data, affine=None):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  nibabel.save(nibabel.Nifti1Image(np.asarray(data), np.eye(4) if affine is None
                                   else affine), path)
  return path


def _squares(hot_voxel=False):
  """24 x 24 x 12: background 1, squares of area 16..100 in slices 2..9."""
  data = np.ones((24, 24, 12), np.float32)
  for k, half in zip(range(2, 10), (2, 3, 4, 5, 5, 4, 3, 2)):
    data[12 - half:12 + half, 12 - half:12 + half, k] = 100.0
  if hot_voxel:
    data[12, 12, 5] = 1e4
  return data


def _load(builder):
  builder.download_and_prepare()
  return tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))


# ---------------------------------------------------------------- one volume


def test_orientation_is_canonical_and_shown_anterior_up_right_on_left(
    tmp_path):
  data = np.random.default_rng(0).integers(1, 200, (24, 20, 12)).astype(
      np.int16)
  data[-3:, -3:, :] = 1000  # Anterior right: the top left of the image.
  affine = np.diag([1.0, 1.0, 1.0, 1.0])
  plain = _save(tmp_path / 'ras.nii.gz', data, affine)
  flipped_affine = affine.copy()
  flipped_affine[:, 0] *= -1
  flipped_affine[:3, 3] += affine[:3, 0] * (data.shape[0] - 1)
  flipped = _save(tmp_path / 'las.nii.gz', data[::-1], flipped_affine)
  # Stored sagittal-first (S, R, A): the columns of the affine permute too.
  permuted = _save(tmp_path / 'sra.nii', data.transpose(2, 0, 1),
                   affine[:, [2, 0, 1, 3]])
  slices, indices = nifti_folder.read_volume_slices(plain, 24, 'every')
  np.testing.assert_array_equal(indices, np.arange(12))
  for other in (flipped, permuted):
    other_slices, other_indices = nifti_folder.read_volume_slices(
        other, 24, 'every')
    np.testing.assert_array_equal(other_slices, slices)
    np.testing.assert_array_equal(other_indices, indices)
  assert slices.shape == (12, 24, 24, 1) and slices.dtype == np.uint8
  # 24 (R) x 20 (A) voxels: padded with two black rows above and below.
  np.testing.assert_array_equal(slices[:, [0, 1, 22, 23]], 0)
  assert (slices[:, 2:5, :3] == 255).all()
  assert slices[:, 2:5, -3:].max() < 255 and slices[:, -5:-2, :3].max() < 255


def test_anisotropic_voxels_keep_the_physical_aspect(tmp_path):
  data = np.random.default_rng(0).integers(1, 200, (24, 12, 4)).astype(np.int16)
  path = _save(tmp_path / 'v.nii', data, np.diag([1.0, 2.0, 1.0, 1.0]))
  slices, _ = nifti_folder.read_volume_slices(path, 24, 'every')
  # 24 mm x 24 mm: stretched to fill the square, no padding.
  assert slices[:, [0, -1]].max() > 0 and slices[:, :, [0, -1]].max() > 0


def test_percentiles_ignore_a_hot_voxel_and_the_zero_background(tmp_path):
  path = _save(tmp_path / 'v.nii.gz', _squares(hot_voxel=True))
  slices, indices = nifti_folder.read_volume_slices(path, 24, 'central', 1)
  assert indices.tolist() == [5]
  assert slices[0, 8, 8, 0] == 255 and slices[0, 0, 0, 0] == 0


@pytest.mark.parametrize('selection, kwargs, expected', [
    ('central', dict(num_slices=4), [4, 5, 6, 7]),
    ('central', dict(num_slices=20), list(range(12))),  # All there is.
    ('every', dict(slice_step=3), [2, 5, 8]),
    ('every', dict(slice_step=1), list(range(2, 10))),
    ('mask', dict(min_mask_fraction=0.5), [4, 5, 6, 7]),
    ('mask', dict(min_mask_fraction=0.3), [3, 4, 5, 6, 7, 8]),
])
def test_slice_selection(tmp_path, selection, kwargs, expected):
  path = _save(tmp_path / 'v.nii.gz', _squares())
  slices, indices = nifti_folder.read_volume_slices(
      path, 16, selection, **kwargs)
  assert indices.tolist() == expected
  assert slices.shape == (len(expected), 16, 16, 1)


def test_bad_slice_settings_name_the_config_field(tmp_path):
  path = _save(tmp_path / 'v.nii.gz', _squares())
  with pytest.raises(ValueError, match=r'data\.nifti\.slice_selection'):
    nifti_folder.read_volume_slices(path, 16, 'middle')
  with pytest.raises(ValueError, match=r'data\.nifti\.min_mask_fraction'):
    nifti_folder.read_volume_slices(path, 16, 'mask', min_mask_fraction=0)


def _write_bad_volumes(root):
  """Four bad volumes and a good one-frame 4D volume; returns the bad names."""
  _save(root / 'AD' / 'flat.nii.gz', np.ones((24, 24)))
  _save(root / 'AD' / 'series.nii.gz', np.ones((24, 24, 12, 3)))
  (root / 'CN').mkdir(parents=True, exist_ok=True)
  (root / 'CN' / 'broken.nii.gz').write_bytes(b'this is not a volume')
  _save(root / 'CN' / 'blank.nii', np.zeros((24, 24, 12), np.float32))
  _save(root / 'CN' / 'one_frame.nii.gz', _squares()[..., None])
  return {'AD/flat.nii.gz': 'is not a 3D volume',
          'AD/series.nii.gz': 'is a series of volumes',
          'CN/broken.nii.gz': 'is not a readable volume',
          'CN/blank.nii': 'is empty after masking'}


def test_bad_volumes_are_one_sentence_errors_naming_file_and_fix(tmp_path):
  for name, problem in _write_bad_volumes(tmp_path).items():
    with pytest.raises(nifti_folder.VolumeError) as error:
      nifti_folder.read_volume_slices(tmp_path / name, 16)
    message = str(error.value)
    assert message.startswith(str(tmp_path / name)) and problem in message
    assert message.endswith('.') and message.count('; ') == 1
    assert isinstance(error.value, ValueError)
  slices, _ = nifti_folder.read_volume_slices(
      tmp_path / 'CN' / 'one_frame.nii.gz', 16, 'mask')
  assert len(slices) == 4


def test_analyze_pair_reads_as_the_same_nifti(tmp_path):
  slices = synthetic_mri.generate(8, 6, 32)['image'][:6]
  synthetic_mri.write_volume(tmp_path / 'a.nii.gz', slices)
  synthetic_mri.write_volume(tmp_path / 'b.hdr', slices)
  assert (tmp_path / 'b.img').exists()
  from_nifti = nifti_folder.read_volume_slices(tmp_path / 'a.nii.gz', 32,
                                               'every')
  for path in ('b.hdr', 'b.img'):
    from_analyze = nifti_folder.read_volume_slices(tmp_path / path, 32,
                                                   'every')
    np.testing.assert_array_equal(from_analyze[0], from_nifti[0])
    np.testing.assert_array_equal(from_analyze[1], from_nifti[1])


# ---------------------------------------------------------------- the folder


def test_list_volumes_skips_non_volumes_and_reads_subjects_csv(tmp_path):
  for name in ('train/AD/a.nii.gz', 'train/AD/b.nii', 'test/CN/c.nii.gz',
               'test/CN/deeper/d.nii.gz', 'test/CN/.hidden.nii.gz',
               'test/CN/._c.nii.gz', 'train/__MACOSX/AD/x.nii.gz'):
    _save(tmp_path / name, _squares())
  synthetic_mri.write_volume(tmp_path / 'train/CN/e.hdr',
                             np.ones((2, 4, 4), np.uint8))
  (tmp_path / 'train/AD/notes.txt').write_text('not a volume')
  class_names, examples, _ = nifti_folder.list_volumes(tmp_path)
  assert class_names == ['AD', 'CN']
  assert [path for path, _, _ in examples] == [
      'test/CN/c.nii.gz', 'test/CN/deeper/d.nii.gz', 'train/AD/a.nii.gz',
      'train/AD/b.nii', 'train/CN/e.hdr']
  assert sorted(subject for _, _, subject in examples) == list(range(5))

  # Two scans of one person; one file moved to another class.
  (tmp_path / 'subjects.csv').write_text(
      'file,subject_id,label\n'
      'train/AD/a.nii.gz,OAS1_0001,\n'
      'test/CN/c.nii.gz,OAS1_0001,AD\n'
      'train/CN/e.img,OAS1_0002,\n')
  _, examples, companions = nifti_folder.list_volumes(tmp_path)
  assert companions == ['subjects.csv', 'train/CN/e.img']
  by_path = {path: (label, subject) for path, label, subject in examples}
  assert by_path['train/AD/a.nii.gz'] == by_path['test/CN/c.nii.gz']
  assert by_path['test/CN/c.nii.gz'][0] == 'AD'
  assert len({subject for _, subject in by_path.values()}) == 4
  (tmp_path / 'subjects.csv').write_text('file,subject_id\nAD/a.nii.gz,P1\n')
  with pytest.raises(ValueError, match="line 2 .*'AD/a.nii.gz'.* fix the row"):
    nifti_folder.list_volumes(tmp_path)
  (tmp_path / 'subjects.csv').write_text('path,subject\n')
  with pytest.raises(ValueError, match='needs the header row'):
    nifti_folder.list_volumes(tmp_path)


def test_folder_problems_are_clear_errors_before_work(tmp_path):
  with pytest.raises(FileNotFoundError, match='--config.data.path'):
    nifti_folder.list_volumes(tmp_path / 'missing')
  (tmp_path / 'AD').mkdir()
  (tmp_path / 'AD' / 'slice.png').write_bytes(b'')
  with pytest.raises(ValueError, match='holds no .nii.*image_folder'):
    nifti_folder.list_volumes(tmp_path)
  _save(tmp_path / 'AD' / 'a.nii.gz', _squares())
  with pytest.raises(ValueError, match=r'one class \(AD\).*data\.path'):
    datasets.get_builder('nifti_folder', dataset_path=tmp_path,
                         data_dir=tmp_path / 'tfds')
  (tmp_path / 'CN').mkdir()
  with pytest.raises(ValueError, match='CN holds no volumes'):
    nifti_folder.list_volumes(tmp_path)
  with pytest.raises(ValueError, match='needs dataset_path'):
    datasets.get_builder('nifti_folder')


def test_config_name_is_distinct_per_folder_content_and_settings(tmp_path):
  _save(tmp_path / 'My Scans' / 'AD' / 'a.nii.gz', _squares())
  _save(tmp_path / 'My Scans' / 'CN' / 'c.nii.gz', _squares())
  def name(**kwargs):
    builder = nifti_folder.NiftiFolder(folder=tmp_path / 'My Scans',
                                       data_dir=tmp_path, **kwargs)
    return builder.builder_config.name
  first = name()
  assert first == name() and first.startswith('my_scans_128px_')
  assert first.endswith('_central32')
  others = {name(image_size=64), name(num_slices=8), name(
      slice_selection='every', slice_step=2), name(slice_selection='mask')}
  assert len(others | {first}) == 5
  assert name(slice_selection='mask').endswith('_mask0p5')
  (tmp_path / 'My Scans' / 'subjects.csv').write_text(
      'file,subject_id\nAD/a.nii.gz,P\nCN/c.nii.gz,P\n')
  assert name() != first


# ---------------------------------------------------------------- end to end


def test_synthetic_volumes_round_trip_through_the_builder(tmp_path):
  root = tmp_path / 'volumes'
  paths = synthetic_mri.write_nifti_volumes(
      root, num_subjects=8, slices_per_subject=6, image_size=32)
  assert len(paths) == 8 and all(path.endswith('.nii.gz') for path in paths)
  builder = datasets.get_builder(
      'nifti_folder', data_dir=tmp_path / 'tfds', dataset_path=root,
      image_size=32, nifti={'num_slices': 6})
  data = _load(builder)
  assert builder.info.features['label'].names == list(synthetic_mri.CLASS_NAMES)
  assert data['image'].shape == (48, 32, 32, 1)
  order = np.argsort(data['file_name'])
  file_names = [name.decode() for name in data['file_name'][order]]
  expected = synthetic_mri.generate(8, 6, 32)
  by_path = {path: subject for subject, path in enumerate(paths)}
  for i, file_name in enumerate(file_names):
    path, index = file_name.split('#')
    subject = by_path[path]
    assert int(index) == data['slice_index'][order[i]]
    source = subject * 6 + int(index)
    assert data['label'][order[i]] == expected['label'][source]
    stack = expected['image'][subject * 6:(subject + 1) * 6].astype(np.float32)
    low, high = np.percentile(stack[stack != 0], (0.5, 99.5))
    want = np.clip((expected['image'][source] - low) / (high - low), 0, 1) * 255
    assert np.abs(data['image'][order[i]] - want).max() <= 1.0
  subject_of_file = {}
  for file_name, subject in zip(data['file_name'], data['subject_id']):
    subject_of_file.setdefault(file_name.decode().split('#')[0], set()).add(
        int(subject))
  assert all(len(ids) == 1 for ids in subject_of_file.values())
  assert sorted(min(ids) for ids in subject_of_file.values()) == list(range(8))


def test_bad_volumes_fail_the_builder_or_are_skipped(tmp_path, caplog):
  root = tmp_path / 'scans'
  bad = _write_bad_volumes(root)
  _save(root / 'AD' / 'good.nii.gz', _squares())
  failing = datasets.get_builder('nifti_folder', data_dir=tmp_path / 'tfds',
                                 dataset_path=root, image_size=16)
  with pytest.raises(ValueError, match='flat.nii.gz is not a 3D volume.*'
                     'skip_unreadable=True'):
    failing.download_and_prepare()
  assert not pathlib.Path(failing.data_dir).exists()
  skipping = datasets.get_builder(
      'nifti_folder', data_dir=tmp_path / 'tfds', dataset_path=root,
      image_size=16, skip_unreadable=True, nifti={'slice_selection': 'mask'})
  with caplog.at_level(logging.WARNING):
    data = _load(skipping)
  assert f'Skipped {len(bad)} of 6 volumes' in caplog.text
  volumes = {name.decode().split('#')[0] for name in data['file_name']}
  assert volumes == {'AD/good.nii.gz', 'CN/one_frame.nii.gz'}
  assert len(data['label']) == 8


def test_synthetic_volumes_cli_writes_analyze_pairs(tmp_path, capsys):
  synthetic_mri.main([f'--nifti_dir={tmp_path}', '--num_subjects=8',
                      '--slices_per_subject=2', '--image_size=16',
                      '--extension=.hdr'])
  assert 'Wrote 8 volumes' in capsys.readouterr().out
  assert len(list(tmp_path.glob('*/*.hdr'))) == 8
  assert len(list(tmp_path.glob('*/*.img'))) == 8
  class_names, examples, companions = nifti_folder.list_volumes(tmp_path)
  assert class_names == list(synthetic_mri.CLASS_NAMES)
  assert len(examples) == 8 and len(companions) == 8
