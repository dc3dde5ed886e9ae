"""End-to-end tests of predict mode on a tiny baseline run trained once per module."""

import csv
import importlib
import json
import logging
import os
import shutil

import numpy as np
import PIL.Image
import pytest

from simclr_jax import predict
from simclr_jax.train import trainer
from simclr_jax.data.datasets import synthetic_mri
from simclr_jax import run
from tests.conftest import with_fields
from tests.conftest import tiny_config

BATCH_SIZE = 8  # One compiled Grad-CAM shape serves every test.


@pytest.fixture(scope='module')
def run_dir(data_dir, tmp_path_factory):
  """A baseline run of one epoch on synthetic_mri/small at 32 px."""
  workdir = str(tmp_path_factory.mktemp('baseline_run'))
  trainer.train_and_evaluate(tiny_config(data_dir, 'baseline', num_epochs=1), workdir)
  return workdir


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """Synthetic slices in several formats and modes, one corrupt file, one text file."""
  folder = tmp_path_factory.mktemp('scans')
  os.makedirs(folder / 'more')
  images = synthetic_mri.generate(num_subjects=8, slices_per_subject=2, image_size=128,
                                  seed=7)['image'][..., 0]
  PIL.Image.fromarray(images[0]).save(folder / 'gray.png')
  PIL.Image.fromarray(images[3]).convert('RGB').save(folder / 'colour.jpg', quality=95)
  PIL.Image.fromarray(images[5]).convert('RGBA').save(folder / 'alpha.png')
  PIL.Image.fromarray(images[7]).resize((100, 140)).save(folder / 'more' / 'tall.bmp')
  PIL.Image.fromarray(images[9].astype(np.uint16) * 257).save(folder / 'more' / 'deep.tif')
  (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n this is not an image')
  (folder / 'notes.txt').write_text('not an image, and not named like one')
  return str(folder)


def _config(run_dir, inputs, **overrides):
  config = importlib.import_module('configs.predict').get_config()
  config.predict.checkpoint_workdir = run_dir
  config.predict.inputs = inputs
  config.cam.layer = 'stage2'  # 4 x 4 cells at 32 px (stage4 is 1 x 1 there).
  config.predict.batch_size = BATCH_SIZE
  return with_fields(config, **overrides)


def _rows(workdir):
  with open(os.path.join(workdir, 'predictions.csv')) as f:
    return list(csv.DictReader(f))


def test_folder_of_mixed_formats_with_a_corrupt_file(run_dir, image_folder, tmp_path,
                                                     caplog):
  workdir = str(tmp_path / 'out')
  with caplog.at_level(logging.WARNING):
    summary = run.run(_config(run_dir, image_folder), workdir)
  rows = _rows(workdir)
  good = ['alpha.png', 'colour.jpg', 'gray.png', 'more/deep.tif', 'more/tall.bmp']
  assert [os.path.relpath(row['file'], image_folder) for row in rows] == good
  class_names = synthetic_mri.CLASS_NAMES
  for row in rows:
    probabilities = [float(row[f'p_{name}']) for name in class_names]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
    assert row['predicted_class'] == class_names[int(np.argmax(probabilities))]
    assert float(row['probability']) == pytest.approx(max(probabilities), abs=1e-4)
    overlay = os.path.join(workdir, row['overlay'])
    assert PIL.Image.open(overlay).size[0] > 300  # A real figure, not a stub.
  assert len(os.listdir(os.path.join(workdir, 'overlays'))) == len(good)
  assert os.path.exists(os.path.join(workdir, 'gradcam_grid.png'))
  # The corrupt file is reported by name and counted; the text file is not an input.
  assert summary['num_inputs'] == 6 and summary['num_predicted'] == 5
  assert summary['num_unreadable'] == 1
  assert summary['unreadable'] == [os.path.join(image_folder, 'broken.png')]
  assert any('broken.png' in record.getMessage() for record in caplog.records)
  with open(os.path.join(workdir, 'predict_summary.json')) as f:
    assert json.load(f)['predicted_counts'] == summary['predicted_counts']
  assert sum(summary['predicted_counts'].values()) == 5


def test_single_file_and_glob(run_dir, image_folder, tmp_path):
  summary = run.run(_config(run_dir, os.path.join(image_folder, 'gray.png')),
                            str(tmp_path / 'one'))
  assert summary['num_predicted'] == 1
  pattern = os.path.join(image_folder, '**', '*.t*')  # deep.tif, and notes.txt (unreadable).
  summary = run.run(_config(run_dir, pattern), str(tmp_path / 'glob'))
  assert [os.path.basename(row['file']) for row in _rows(str(tmp_path / 'glob'))] == [
      'deep.tif']
  assert summary['num_unreadable'] == 1
  # Files in folders named after the classes (the Kaggle layout) carry their labels.
  kaggle_like = tmp_path / 'Dataset' / 'Mild_Demented'
  os.makedirs(kaggle_like)
  shutil.copy(os.path.join(image_folder, 'gray.png'), kaggle_like / 'mild_1.png')
  summary = run.run(_config(run_dir, str(tmp_path / 'Dataset')),
                            str(tmp_path / 'labelled'))
  assert _rows(str(tmp_path / 'labelled'))[0]['true_class'] == 'Mild_Demented'
  assert summary['labels_from'] == 'class folder names'
  assert summary['metrics']['num_examples'] == 1


def test_images_are_read_like_the_training_data(tmp_path):
  images = synthetic_mri.generate(num_subjects=8, slices_per_subject=1, image_size=128,
                                  seed=3)['image']
  PIL.Image.fromarray(images[0, ..., 0]).save(tmp_path / 'a.png')
  PIL.Image.fromarray(images[0, ..., 0]).convert('RGB').save(tmp_path / 'a_rgb.png')
  np.testing.assert_array_equal(predict.read_image(tmp_path / 'a.png', 128), images[0])
  np.testing.assert_array_equal(predict.read_image(tmp_path / 'a_rgb.png', 128), images[0])
  # 16-bit images are stretched from their own range, as the image_folder data set does.
  deep = (1000 + images[0, ..., 0].astype(np.uint16) * 8)
  PIL.Image.fromarray(deep).save(tmp_path / 'deep.png')
  read = predict.read_image(tmp_path / 'deep.png', 128)
  assert read.shape == (128, 128, 1) and read.min() == 0 and read.max() == 255
  assert predict.read_image(tmp_path / 'a.png', 32).shape == (32, 32, 1)


def test_test_split_with_cam_quality(run_dir, tmp_path):
  workdir = str(tmp_path / 'split')
  summary = run.run(
      _config(run_dir, predict.TEST_SPLIT, evaluate_cam=True, deletion_fractions=(0.1,)),
      workdir)
  num_images = summary['num_predicted']
  assert num_images == len(_rows(workdir)) > 0
  assert 'true_class' in _rows(workdir)[0]
  assert summary['metrics']['num_examples'] == num_images
  assert summary['labels_from'] == 'test split'
  energy = summary['cam_quality']['mask_energy']
  assert 0.0 < energy['uniform'] < 1.0 and 0.0 <= energy['cam'] <= 1.0
  assert summary['cam_quality']['deletion'][0]['fraction'] == 0.1
  assert os.path.exists(os.path.join(workdir, 'cam_quality.png'))


def test_bad_runs_and_inputs_fail_before_any_work(run_dir, image_folder, tmp_path):
  workdir = str(tmp_path / 'never_written')

  def fails(config, match):
    with pytest.raises(ValueError, match=match):
      run.run(config, workdir)
    assert not os.path.exists(workdir)

  fails(_config(None, image_folder), 'set --config.predict.checkpoint_workdir')
  fails(_config(str(tmp_path / 'missing'), image_folder), 'No run found')
  pretrain_dir = tmp_path / 'pretrain'
  os.makedirs(pretrain_dir)
  with open(os.path.join(run_dir, 'config.json')) as f:
    run_config = json.load(f)
  with open(pretrain_dir / 'config.json', 'w') as f:
    json.dump(dict(run_config, mode='pretrain'), f)
  fails(_config(str(pretrain_dir), image_folder), 'pretrain run.*no classifier head')
  untrained_dir = tmp_path / 'untrained'
  os.makedirs(untrained_dir)
  shutil.copy(os.path.join(run_dir, 'config.json'), untrained_dir)
  fails(_config(str(untrained_dir), image_folder), 'no checkpoint yet')
  fails(_config(run_dir, os.path.join(image_folder, '*.dcm')), 'matches no image file')
  fails(_config(run_dir, None), 'Set --config.predict.inputs')
  fails(_config(run_dir, image_folder, cam_method='scorecam'), r'Unknown cam\.method')
  fails(_config(run_dir, image_folder, cam_layer='stage5'), r'Unknown cam\.layer')


def test_config_file():
  config = importlib.import_module('configs.predict').get_config()
  assert config.mode == 'predict' and config.cam.layer == 'stage4'
  assert config.cam.method == 'gradcam' and not config.cam.evaluate
  assert importlib.import_module('configs.predict').get_config('runlocal').cam.layer == (
      'stage3')


def test_volumes_give_slice_and_volume_predictions_and_overlays_of_informative_slices(
    run_dir, tmp_path):
  """A folder of NIfTI volumes: every slice classified, one prediction per volume."""
  folder = tmp_path / 'volumes'
  written = synthetic_mri.write_nifti_volumes(str(folder), num_subjects=8,
                                              slices_per_subject=12, image_size=64, seed=3)
  # One volume as an Analyze .hdr/.img pair: its .img is not a second input.
  # Its content is a textured disc: a volume of one intensity is rejected as blank.
  yy, xx = np.mgrid[:64, :64]
  disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 24 ** 2
  texture = np.random.default_rng(0).integers(40, 200, (12, 64, 64))
  synthetic_mri.write_volume(str(folder / 'pair.hdr'), (texture * disc).astype(np.uint8))
  workdir = str(tmp_path / 'out')
  summary = run.run(_config(run_dir, str(folder)), workdir)
  volumes = summary['volumes']
  assert len(volumes) == len(written) + 1
  rows = _rows(workdir)
  for entry in volumes:
    slices = [r for r in rows if r['file'].startswith(entry['volume'] + '#')]
    assert len(slices) == entry['num_slices'] > 0
    # The volume's prediction is the mean of its slices' probabilities.
    for name, p in entry['probabilities'].items():
      assert p == pytest.approx(np.mean([float(r[f'p_{name}']) for r in slices]), abs=1e-3)
    assert entry['predicted_class'] == max(entry['probabilities'], key=entry['probabilities'].get)
    drawn = [r for r in slices if r['overlay']]
    assert len(drawn) == min(predict.NUM_VOLUME_OVERLAYS, len(slices))
    confidence = lambda r: float(r[f'p_{entry["predicted_class"]}'])
    assert min(map(confidence, drawn)) >= max(
        [confidence(r) for r in slices if not r['overlay']] or [0.0])
  assert len(os.listdir(os.path.join(workdir, 'overlays'))) == sum(
      min(predict.NUM_VOLUME_OVERLAYS, v['num_slices']) for v in volumes)
  with open(os.path.join(workdir, 'volume_predictions.csv')) as f:
    assert len(list(csv.DictReader(f))) == len(volumes)
  # pair.hdr lies outside the class folders, so no input's truth is claimed.
  assert 'labels_from' not in summary
