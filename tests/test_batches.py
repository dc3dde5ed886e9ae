"""Tests of the training rows, the device data and the model inputs on tiny fake data."""

import functools

import jax
import numpy as np
import pytest

from simclr_jax import errors
from simclr_jax import run
from simclr_jax.train import compile_cache
from simclr_jax.train import evaluators
from simclr_jax.train import optimizers
from simclr_jax.train import recipes
from simclr_jax.train import state as state_lib
from simclr_jax.train import steps as steps_lib
from simclr_jax.train import trainer
from simclr_jax.data import batches
from simclr_jax.parallel import sharding
from tests import conftest
from tests import fake_data


def test_epochs_are_permutations_and_no_batch_holds_an_image_twice():
  for num_examples, batch_size in ((5, 4), (12, 4), (27, 8), (32, 32)):
    per_epoch = batches.steps_per_epoch(num_examples, batch_size)
    for epoch in range(3):
      epoch_batches = [batches.batch_positions(num_examples, batch_size, 0, step)
                       for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
      for batch in epoch_batches:
        assert len(batch) == batch_size and len(set(batch)) == batch_size
        assert batch.min() >= 0 and batch.max() < num_examples
      # Every image is seen in every epoch; only the last batch's filler repeats.
      seen = np.concatenate(epoch_batches)
      assert set(seen) == set(range(num_examples))
      assert len(seen) - num_examples == per_epoch * batch_size - num_examples
  epochs = [np.concatenate([batches.batch_positions(12, 4, 0, s) for s in range(e, e + 3)])
            for e in (0, 3)]
  assert not np.array_equal(epochs[0], epochs[1])  # Each epoch its own order.
  assert batches.steps_per_epoch(10, 4) == 3


def test_train_batch_size_is_every_image_when_there_are_fewer():
  assert batches.train_batch_size(100, 32) == 32
  assert batches.train_batch_size(17, 32) == 17
  assert batches.train_batch_size(17, 32, num_devices=2) == 16
  assert batches.train_batch_size(1, 32, num_devices=2) == 2


def _pretrain_views(arrays, inputs, config, on_device=True):
  mesh = sharding.create_mesh()
  data = batches.DeviceDataset(arrays, mesh, on_device)

  @jax.jit
  def views(data_arrays, step_inputs, key):
    images, _ = batches.DeviceDataset.images(data_arrays, step_inputs)
    return batches.pretrain_batch(images, step_inputs['position'], key, config)

  return sharding.to_host(views(data.arrays, data.inputs(inputs),
                                batches.augment_key(config.seed)))


def test_batches_resume_at_any_step_and_views_follow_seed_step_and_example():
  arrays, config = fake_data.fake_arrays(), fake_data.config(batch_size=4)
  rows = batches.TrainingRows(np.arange(0, len(arrays), 7), 4, seed=1)
  continued = [rows.step_inputs(step) for step in range(8)]  # Step 6 crosses an epoch.
  resumed = batches.TrainingRows(np.arange(0, len(arrays), 7), 4, seed=1)
  for step in (5, 6, 7):
    for key in ('row', 'position'):
      np.testing.assert_array_equal(resumed.step_inputs(step)[key], continued[step][key])
  batch = _pretrain_views(arrays, continued[0], config)
  assert set(batch) == {'image1', 'image2'}
  assert batch['image1'].shape == (4, fake_data.IMAGE_SIZE, fake_data.IMAGE_SIZE, 3)
  assert batch['image1'].dtype == np.float32
  assert 0.0 <= batch['image1'].min() and batch['image1'].max() <= 1.0
  # Gray repeated to three channels; the two views differ; so do the steps and seeds.
  np.testing.assert_array_equal(batch['image1'][..., 0], batch['image1'][..., 2])
  assert not np.array_equal(batch['image1'], batch['image2'])
  assert not np.array_equal(batch['image1'], _pretrain_views(arrays, continued[1],
                                                             config)['image1'])
  other_seed = fake_data.config(batch_size=4, seed=2)
  assert not np.array_equal(batch['image1'],
                            _pretrain_views(arrays, continued[0], other_seed)['image1'])
  # The same views whether the data set lives on the devices or on the host.
  on_host = _pretrain_views(arrays, continued[0], config, on_device=False)
  for key in batch:
    np.testing.assert_array_equal(on_host[key], batch[key])


def test_process_rows_concatenate_to_the_global_batch(monkeypatch):
  rows = batches.TrainingRows(np.arange(30), 8, seed=0)
  global_inputs = {k: np.stack([rows.step_inputs(s)[k] for s in (3, 4)])
                   for k in ('row', 'position')}
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  parts = []
  for p in range(2):
    monkeypatch.setattr(jax, 'process_index', functools.partial(lambda p: p, p))
    parts.append(sharding.local_rows(global_inputs, batch_axis=1))
  for key, value in global_inputs.items():
    assert parts[0][key].shape == (2, 4)
    np.testing.assert_array_equal(np.concatenate([part[key] for part in parts], axis=1),
                                  value)


def test_supervised_batches_pair_images_with_their_labels():
  arrays = fake_data.fake_arrays()
  config = fake_data.config(batch_size=6, image_size=16, channels=1, train_augment=False)
  rows = batches.TrainingRows(np.arange(3, 60, 5), 6, seed=0)
  mesh = sharding.create_mesh()
  data = batches.DeviceDataset(arrays, mesh)

  @jax.jit
  def batch_of(data_arrays, step_inputs, key):
    images, labels = batches.DeviceDataset.images(data_arrays, step_inputs)
    return batches.supervised_image(images, step_inputs['position'], key,
                                           config), labels

  expected = batches.preprocess(arrays.images[rows.rows], config)
  seen = set()
  for step in range(2):  # One epoch of 12.
    images, labels = sharding.to_host(batch_of(data.arrays, data.inputs(rows.step_inputs(step)),
                                               batches.augment_key(0)))
    assert labels.dtype == np.int32
    for image, label in zip(images, labels):
      (match,) = np.flatnonzero(np.all(expected == image, axis=(1, 2, 3)))
      assert label == arrays.labels[rows.rows[match]]
      seen.add(match)
  assert seen == set(range(len(rows.rows)))


def test_evaluation_pads_the_last_batch_and_returns_the_rows_in_order():
  rows, count = batches.eval_rows(np.arange(10, 20), 4)
  assert count == 10 and len(rows) == 12
  np.testing.assert_array_equal(rows[:10], np.arange(10, 20))
  np.testing.assert_array_equal(rows[10:], [10, 10])
  arrays = fake_data.fake_arrays()
  data = batches.DeviceDataset(arrays, sharding.create_mesh())

  @jax.jit
  def labels_of(state, data_arrays, inputs):
    del state
    return batches.DeviceDataset.images(data_arrays, inputs)[1]

  idx = np.array([40, 3, 17, 99, 5, 61, 8])
  np.testing.assert_array_equal(evaluators.infer_rows(labels_of, None, data, idx, batch_size=4),
                                arrays.labels[idx])


def test_preprocess_resizes_and_repeats_channels():
  arrays = fake_data.fake_arrays()
  images = batches.preprocess(
      arrays.images[:3], fake_data.config(image_size=8, channels=3))
  assert images.shape == (3, 8, 8, 3) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  same_size = batches.preprocess(
      arrays.images[:3], fake_data.config(image_size=16, channels=1))
  np.testing.assert_allclose(same_size, arrays.images[:3] / 255.0, atol=1e-6)
  with pytest.raises(ValueError, match='channels'):
    batches.preprocess(arrays.images[:3], fake_data.config(channels=2))


# ----------------------------------------------------------------------------- MICLe partners


def _subject_rows(arrays, max_distance, seed=1, batch_size=8):
  """Training rows of all but a few slices: row 0's subject keeps row 0 only."""
  dropped = ((arrays.subject_ids == arrays.subject_ids[0]) & (np.arange(len(arrays)) != 0)
             | np.isin(np.arange(len(arrays)), [9, 22]))
  rows = np.flatnonzero(~dropped)
  partners = batches.SubjectPartners(arrays.subject_ids, arrays.slice_index, rows,
                                     max_distance)
  return batches.TrainingRows(rows, batch_size, seed, partners=partners)


def test_partners_are_nearby_slices_of_the_same_subject_in_the_run():
  arrays = fake_data.shuffled(fake_data.fake_arrays(), seed=3)
  for distance in (1, 2):
    rows = _subject_rows(arrays, distance)
    for position, row in enumerate(rows.rows):  # The candidates, by brute force.
      expected = rows.rows[(arrays.subject_ids[rows.rows] == arrays.subject_ids[row]) & (
          np.abs(arrays.slice_index[rows.rows] - arrays.slice_index[row]) <= distance)]
      assert row in expected
      np.testing.assert_array_equal(np.sort(rows.partners.candidates(position)),
                                    np.sort(expected))
    drawn = [rows.step_inputs(step) for step in range(3 * rows.steps_per_epoch)]
    row, partner = (np.concatenate([d[k] for d in drawn]) for k in ('row', 'partner'))
    assert partner.dtype == np.int32 and np.isin(partner, rows.rows).all()
    np.testing.assert_array_equal(arrays.subject_ids[partner], arrays.subject_ids[row])
    gaps = np.abs(arrays.slice_index[partner] - arrays.slice_index[row])
    assert gaps.max() == distance and (partner != row).mean() > 0.4
  # A subject with one slice in the run pairs with itself.
  (alone,) = np.flatnonzero(rows.rows == 0)
  np.testing.assert_array_equal(rows.partners.candidates(alone), [0])


def test_partners_replay_for_a_resumed_run_and_follow_the_seed():
  arrays = fake_data.fake_arrays()
  continued = [_subject_rows(arrays, 2).step_inputs(step) for step in range(12)]
  resumed = _subject_rows(arrays, 2)
  for step in (11, 5, 6):
    for key in ('row', 'position', 'partner'):
      np.testing.assert_array_equal(resumed.step_inputs(step)[key], continued[step][key])
  other_seed = _subject_rows(arrays, 2, seed=2)
  assert not np.array_equal(other_seed.step_inputs(0)['partner'], continued[0]['partner'])
  # The rows themselves are those of positive_pairs=image.
  image_rows = batches.TrainingRows(resumed.rows, 8, seed=1)
  for step in (0, 7):
    assert set(image_rows.step_inputs(step)) == {'row', 'position'}
    np.testing.assert_array_equal(image_rows.step_inputs(step)['row'], continued[step]['row'])


@pytest.mark.parametrize('on_device', [True, False])
def test_distance_zero_gives_exactly_the_simclr_batches(on_device):
  arrays, config = fake_data.fake_arrays(), fake_data.config(batch_size=8)
  rows = _subject_rows(arrays, 0)
  image_rows = batches.TrainingRows(rows.rows, 8, seed=1)
  for step in (0, 9):
    inputs, image_inputs = rows.step_inputs(step), image_rows.step_inputs(step)
    np.testing.assert_array_equal(inputs['partner'], inputs['row'])
    for key in image_inputs:
      np.testing.assert_array_equal(inputs[key], image_inputs[key])
  views = _pretrain_views(arrays, rows.step_inputs(0), config, on_device)
  simclr = _pretrain_views(arrays, image_rows.step_inputs(0), config, on_device)
  for key in simclr:
    np.testing.assert_array_equal(views[key], simclr[key])


def check_partner_views(num_devices):
  """View 1 is the row's SimCLR view, view 2 the partner's, on and off the devices."""
  assert jax.device_count() == num_devices
  arrays, config = fake_data.fake_arrays(), fake_data.config(batch_size=8)
  inputs = _subject_rows(arrays, 2).step_inputs(4)
  assert (inputs['partner'] != inputs['row']).any()
  simclr = jax.jit(lambda images, positions: batches.pretrain_batch(
      images, positions, batches.augment_key(config.seed), config))
  expected = {'image1': simclr(arrays.images[inputs['row']], inputs['position'])['image1'],
              'image2': simclr(arrays.images[inputs['partner']], inputs['position'])['image2']}
  for on_device in (True, False):
    views = _pretrain_views(arrays, inputs, config, on_device)
    for name, value in expected.items():  # A batch split over devices: float round-off.
      np.testing.assert_allclose(views[name], np.asarray(value), atol=1e-6, err_msg=name)


def test_subject_pairs_make_view_two_from_the_partner():
  check_partner_views(1)


def test_subject_pairs_on_eight_host_devices():
  code = ('from tests.test_batches import check_partner_views; check_partner_views(8); '
          'print("partner views on 8 devices")')
  assert 'partner views on 8 devices' in conftest.run_on_host_devices(code, timeout=600)


def test_subject_pairs_without_ids_or_positions_are_one_line_errors():
  arrays = fake_data.fake_arrays()
  arrays.slice_index[5] = -1
  with pytest.raises(errors.UserError) as error:
    batches.SubjectPartners(arrays.subject_ids, arrays.slice_index, np.arange(len(arrays)), 2)
  assert str(error.value) == (
      '--config.pretrain.positive_pairs=subject needs subject ids and slice positions, which 1 '
      f'of the {len(arrays)} training images lack; set --config.pretrain.positive_pairs=image.')
  # The rows a run does not train on do not matter.
  batches.SubjectPartners(arrays.subject_ids, arrays.slice_index, np.arange(6, 20), 2)
  subject = {'pretrain.positive_pairs': 'subject'}
  run.check_config(conftest.tiny_config(None, **subject))  # Stored ids: fine.
  for overrides, needle in [
      ({'pretrain.positive_pairs': 'patient'}, r'^Unknown pretrain\.positive_pairs .*subject'),
      ({'pretrain.positive_max_slice_distance': -1},
       r'^--config\.pretrain\.positive_max_slice_distance=-1 must be a whole number >= 0'),
      (subject | {'data.subject_ids': 'recovered'},
       r'^--config\.pretrain\.positive_pairs=subject needs subject ids and slice positions, '
       r'but synthetic_mri/small\'s subjects are recovered'),
      (subject | {'data.name': 'image_folder', 'data.path': conftest.REPO},
       r'image_folder\'s subjects are recovered .*--config\.data\.subject_ids=dataset')]:
    with pytest.raises(errors.UserError, match=needle) as error:
      run.check_config(conftest.tiny_config(None, **overrides))
    assert '\n' not in str(error.value)
  # A fine-tuning run does not pair: its recovered subjects are fine.
  run.check_config(conftest.tiny_config(None, 'baseline', **subject,
                                        **{'data.subject_ids': 'recovered'}))


def test_pretrain_steps_with_subject_pairs_scanned_off_the_devices(data_dir):
  """Two scanned steps of the tiny config, partner images sent by the host: a finite loss.

  (On the devices the step gathers the partners itself: the views are the same,
  `check_partner_views`.)
  """
  config = conftest.tiny_config(data_dir, **{
      'pretrain.positive_pairs': 'subject', 'data.on_device': 'False',  # As flags set it.
      'train.steps_per_dispatch': 2, 'pretrain.sam': 'none'})
  run.check_config(config)
  mesh, cache = sharding.create_mesh(), compile_cache.CompileCache()
  recipe = recipes.create_recipe(config, mesh, cache)
  assert not recipe.device_data.on_device
  arrays, inputs = recipe.rows_of.arrays, recipe.rows.step_inputs(1)
  assert (inputs['partner'] != inputs['row']).any()
  np.testing.assert_array_equal(arrays.subject_ids[inputs['partner']],
                                arrays.subject_ids[inputs['row']])
  assert np.abs(arrays.slice_index[inputs['partner']]
                - arrays.slice_index[inputs['row']]).max() <= 2
  dispatch = trainer.dispatch_inputs(recipe, 0, 2, 2)
  assert dispatch['partner_image'].shape == dispatch['image'].shape
  assert dispatch['partner_image'].shape[:2] == (2, recipe.rows.batch_size)
  state = state_lib.create_train_state(recipe.config, recipe.model, jax.random.key(0),
                                       optimizers.create_optimizer(recipe.config), mesh)
  rngs = sharding.replicate_tree({'dropout': jax.random.key(1),
                                  'augment': batches.augment_key(config.seed)}, mesh)
  values = sharding.replicate_tree(steps_lib.step_values(
      2, recipe.rows.steps_per_epoch, recipe.class_weights,
      optimizers.schedule_values(recipe.config, 10)), mesh)
  run_steps = steps_lib.make_train_steps(recipe.config, recipe.objective, mesh, cache,
                                         recipe.key)
  state, metrics = run_steps(state, sharding.replicate_tree(steps_lib.TrainMetrics.empty(), mesh),
                             dispatch, recipe.device_data.arrays, rngs, values)
  assert int(state.step) == 2 and int(metrics.loss.count) == 2
  assert np.isfinite(float(metrics.compute()['loss']))
