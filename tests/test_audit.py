"""Tests of the leakage audit: tiny in-memory data sets, and the Kaggle zip."""

import importlib.util
import json
import os

from absl import flags
from matplotlib import image as mpimg
from ml_collections import config_flags
import numpy as np
import pytest

from simclr_jax import audit
from simclr_jax.data import arrays as arrays_lib
from simclr_jax import run
from tests.conftest import with_fields
from tests.test_neighbours import make_subjects

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT_CONFIG = os.path.join(REPO, 'configs', 'audit.py')
KAGGLE_ZIP = os.path.join(os.path.dirname(REPO), 'shared', 'data',
                          'alzheimer-mri-dataset.zip')
CLASS_NAMES = ['Mild_Demented', 'Moderate_Demented', 'Non_Demented',
               'Very_Mild_Demented']


def audit_config(arg=None, **overrides):
  """configs/audit.py, loaded by path, with fields overridden."""
  spec = importlib.util.spec_from_file_location('audit_config', AUDIT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return with_fields(module.get_config(arg), **overrides)


def tiny_config(**overrides):
  """Settings that take a second on 128 images of 32 px."""
  return audit_config(**dict(dict(audit_image_size=16, audit_chunk_size=50,
                                  audit_num_pairs_shown=3), **overrides))


def fake_arrays(with_ids=True, num_subjects=16, slices_per_subject=8):
  data = make_subjects(num_subjects, slices_per_subject, size=32, seed=0)
  subject_ids = data['subject_ids'] if with_ids else np.full(
      len(data['labels']), -1, np.int64)
  return arrays_lib.DatasetArrays(
      images=data['images'], labels=data['labels'], subject_ids=subject_ids,
      slice_index=data['slice_index'], file_names=data['file_names'],
      class_names=CLASS_NAMES)


def test_audit_with_subject_ids(tmp_path, monkeypatch):
  arrays = fake_arrays()
  monkeypatch.setattr(arrays_lib, 'load_arrays', lambda config: arrays)
  report = run.run(tiny_config(), str(tmp_path))

  with open(tmp_path / 'audit.json') as f:
    assert json.load(f) == json.loads(json.dumps(report))
  figure = mpimg.imread(tmp_path / 'audit_pairs.png')
  assert figure.ndim == 3 and figure.shape[0] > 300

  assert report['subject_ids'] == 'given'
  threshold = report['threshold']
  assert threshold['source'] == 'calibrated'
  assert -1 < threshold['value'] <= 1 and threshold['balanced_accuracy'] > 0.9
  assert report['nearest_neighbour_shares_subject']['overall'] == 1.0
  assert set(report['nearest_neighbour_shares_subject']['per_class']) == set(
      CLASS_NAMES)
  grouping = report['grouping']
  assert grouping['agreement_with_subject_ids']['adjusted_rand_index'] > 0.9
  assert set(report['schemes']) == {'slice', 'subject', 'recovered_group'}

  # Split by slice: every test slice has a near-twin of its subject in train,
  # so a lookup scores perfectly. Split by subject: no twins.
  leaky = report['schemes']['slice']
  assert leaky['test_with_near_twin_fraction'] > 0.9
  assert leaky['one_nn_accuracy'] == 1.0
  assert leaky['nearest_train_shares_subject'] == 1.0
  assert set(leaky['per_class']) == set(CLASS_NAMES)
  assert leaky['per_class']['Mild_Demented']['one_nn_recall'] == 1.0
  assert leaky['near_duplicate_pairs_by_split']['test-train'] > 0
  assert len(leaky['closest_pairs']) == 3
  assert set(leaky['closest_pairs'][0]) == {'test_file', 'train_file',
                                            'similarity'}
  honest = report['schemes']['subject']
  assert honest['test_with_near_twin'] == 0
  assert honest['nearest_train_shares_subject'] == 0.0
  assert 'test-train' not in honest['near_duplicate_pairs_by_split']
  for key in ('one_nn_accuracy', 'one_nn_balanced_accuracy',
              'majority_class_accuracy', 'one_nn_confusion_matrix'):
    assert key in honest


def test_audit_without_ids_splits_by_recovered_groups(tmp_path, monkeypatch):
  arrays = fake_arrays(with_ids=False)
  monkeypatch.setattr(arrays_lib, 'load_arrays', lambda config: arrays)
  report = run.run(tiny_config(audit_default_threshold=0.95),
                           str(tmp_path))

  assert report['subject_ids'] == 'recovered'
  assert report['threshold'] == dict(value=0.95, source='default')
  grouping = report['grouping']
  assert 'agreement_with_subject_ids' not in grouping
  assert grouping['num_groups'] == 16
  assert grouping['groups_of_size'] == {8: 16}
  assert set(report['schemes']) == {'slice', 'subject'}
  assert report['schemes']['subject']['test_with_near_twin'] == 0
  assert report['schemes']['slice']['test_with_near_twin_fraction'] > 0.9
  assert 'nearest_train_shares_subject' not in report['schemes']['slice']
  assert os.path.exists(tmp_path / 'audit_pairs.png')


def test_configured_threshold_and_features_spilled_to_disk(tmp_path,
                                                          monkeypatch):
  arrays = fake_arrays(num_subjects=8, slices_per_subject=4)
  monkeypatch.setattr(arrays_lib, 'load_arrays', lambda config: arrays)
  config = tiny_config(audit_threshold=0.999, audit_num_pairs_shown=0,
                       audit_chunk_size=7)
  in_memory = run.run(config, str(tmp_path / 'in_memory'))
  monkeypatch.setattr(audit, 'FEATURES_IN_MEMORY_BYTES', 0)
  on_disk = run.run(config, str(tmp_path / 'on_disk'))
  assert in_memory['threshold'] == dict(value=0.999, source='config')
  assert in_memory['schemes']['slice']['test_with_near_twin'] == 0
  in_memory.pop('seconds'), on_disk.pop('seconds')
  assert on_disk == in_memory
  assert sorted(os.listdir(tmp_path / 'on_disk')) == ['audit.json',
                                                      'audit_pairs.png']


@pytest.mark.parametrize('field,value', [
    ('audit_threshold', 1.5), ('audit_threshold', -1.0),
    ('audit_default_threshold', 2.0), ('grouping_threshold', -3.0)])
def test_threshold_outside_range_fails_before_loading(field, value, tmp_path,
                                                      monkeypatch):
  def load_arrays(config):
    raise AssertionError('The data set was loaded before the config check.')
  monkeypatch.setattr(arrays_lib, 'load_arrays', load_arrays)
  with pytest.raises(ValueError, match=r'outside \(-1, 1\]'):
    run.run(tiny_config(**{field: value}), str(tmp_path))


def test_fewer_than_two_images_is_an_error(tmp_path, monkeypatch):
  arrays = fake_arrays()
  one = arrays_lib.DatasetArrays(
      images=arrays.images[:1], labels=arrays.labels[:1],
      subject_ids=arrays.subject_ids[:1], slice_index=arrays.slice_index[:1],
      file_names=arrays.file_names[:1], class_names=CLASS_NAMES)
  monkeypatch.setattr(arrays_lib, 'load_arrays', lambda config: one)
  with pytest.raises(ValueError, match='at least 2 images'):
    run.run(tiny_config(), str(tmp_path))
  assert not os.path.exists(tmp_path / 'audit.json')


def test_calibrate_threshold_separates_positives_from_negatives():
  threshold, balanced_accuracy = audit.calibrate_threshold(
      [0.99, 0.98, 0.97, 0.96], [0.90, 0.91, 0.93, 0.97])
  assert 0.93 < threshold <= 0.96 and balanced_accuracy == 1.0 - 0.125


def test_config_file_loads_through_config_flags():
  argv = ['main.py', f'--config={AUDIT_CONFIG}:runlocal',
          '--config.audit.threshold=0.97']
  flag_values = flags.FlagValues()
  # As main.py defines it; override flags are read from argv at definition.
  config_flags.DEFINE_config_file('config', None, 'Config file.',
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert config.mode == 'audit'
  assert config.data.name == 'synthetic_mri/small'
  assert config.audit.threshold == 0.97 and config.audit.grouping_threshold is None


@pytest.mark.skipif(not os.path.exists(KAGGLE_ZIP),
                    reason=f'The Kaggle zip is not at {KAGGLE_ZIP}.')
def test_audit_of_the_kaggle_data(tmp_path, data_dir):
  config = audit_config(dataset='alzheimer_mri', dataset_path=KAGGLE_ZIP,
                        data_dir=data_dir, audit_image_size=32,
                        audit_num_pairs_shown=2)
  report = run.run(config, str(tmp_path))
  assert report['num_images'] == 6400
  assert report['nearest_neighbour_shares_subject']['overall'] > 0.9
  assert report['schemes']['slice']['one_nn_accuracy'] > 0.98
  assert report['schemes']['subject']['one_nn_accuracy'] < 0.7
  # Every recovered group is one person's 32 slices.
  assert report['grouping']['groups_of_size'] == {32: 200}
