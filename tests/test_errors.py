"""A user's mistake is one line on stderr and exit status 2, before any work; bugs keep tracebacks.

Most cases run `python main.py ...` as a subprocess: a mistake in a flag or a
config value is reported before TensorFlow loads or any data set is built, in
about two seconds. `test_every_check_family_rejects_its_bad_values` covers every
field check in-process.
"""

import errno
import importlib
import os
import re
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import PIL.Image
import pytest

from configs import audit as audit_config
from configs import predict as predict_config
from configs import sweep as sweep_config
from simclr_jax import errors
from simclr_jax import run
from simclr_jax.train import workdirs
from simclr_jax import predict
from tests.conftest import REPO, tiny_config, with_fields

MAIN = os.path.join(REPO, 'main.py')
TINY = ('--config.data.name=synthetic_mri/small', '--config.data.image_size=32',
        '--config.data.channels=1', '--config.model.name=resnet18', '--config.model.width=0.125',
        '--config.model.encoder_output=avgpool', '--config.train.batch_size=16',
        '--config.eval.batch_size=32', '--config.train.num_epochs=1',
        '--config.labels.fraction=0.5', '--config.train.num_summary_images=0')
# What TensorFlow, TFDS and JAX printed at every start before these were silenced.
NOISE = ('oneDNN custom operations', 'absl::InitializeLog', 'cpu_feature_guard',
         "Unable to initialize backend 'tpu'", '\x1b[A', '\r')


def _config(name):
  return '--config=' + os.path.join(REPO, 'configs', name)


def _main(workdir, *args, config='baseline.py', data_dir=None, tiny=True, env=None):
  """Runs main.py on `config` (tiny settings unless told otherwise); returns the result."""
  command = [sys.executable, MAIN, _config(config), f'--workdir={workdir}']
  if tiny:
    command += list(TINY)
  if data_dir:
    command.append(f'--config.data.dir={data_dir}')
  return subprocess.run(command + list(args), cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=env or dict(os.environ))


def assert_user_error(result, *words):
  """Exit status 2, no traceback, and stderr's last line the one `error: ` line."""
  output = result.stdout + result.stderr
  assert result.returncode == errors.EXIT_STATUS, output
  assert 'Traceback' not in output, output
  error_lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(error_lines) == 1, result.stderr
  assert result.stderr.endswith(error_lines[0] + '\n'), result.stderr
  for word in words:
    assert word in error_lines[0], (word, error_lines[0])
  return error_lines[0]


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize('args,words', [
    # The list.
    (['--config.labels.fraction=1.5'], ['--config.labels.fraction=1.5', '(0, 1]']),
    (['--config.mode=finetun'], ['Unknown mode', '--config.mode', 'finetune']),
    (['--config.train.num_epochs=-1'], ['--config.train.num_epochs=-1', 'positive']),
    (['--config.train.batch_size=0'], ['--config.train.batch_size=0', 'positive multiple of the',
                                 'device(s)', 'set e.g. --config.train.batch_size=']),
    (['--config.data.image_size=7'], ['--config.data.image_size=7', 'downsample 32x', '>= 32']),
    (['--config.labels.fractoin=0.1'], ['--config.labels.fractoin', 'did you mean',
                                        '--config.labels.fraction']),
    (['--config.label_fraction=0.1'], ['--config.label_fraction is now',
                                       '--config.labels.fraction']),
    (['--config.augment.crop_scal=(0.5,1.0)'], ['did you mean --config.augment.crop_scale']),
    (['--config.train.batch_size=abc'], ['--config.train.batch_size=abc', 'int()']),
    (['--config.data.path=/nonexistent/x.zip'], ['--config.data.path=/nonexistent/x.zip',
                                                    'does not exist']),
    (['--config.data.name=cifar10'], ['Unknown data set', 'synthetic_mri']),
    (['unexpected'], ['Unexpected arguments', '--config.section.field=value']),
    (['--no_such_flag'], ['no_such_flag', '--helpshort']),
    # One per config check family.
    (['--config.pretrain.sam=samm'], ['Unknown pretrain.sam', 'asam']),
    (['--config.augment.crop_scale=(0.5,1.5)'], ['--config.augment.crop_scale', 'low <= high']),
    (['--config.pretrain.optimizer.momentum=1.0'], ['momentum=1.0', '[0, 1)']),
    (['--config.train.log_every_steps=0'], ['--config.train.log_every_steps=0', 'positive whole number']),
    (['--config.eval.knn_k=(0,5)'], ['--config.eval.knn_k', 'tuple of positive whole numbers']),
    (['--config.eval.batch_size=0'], ['--config.eval.batch_size=0', 'device(s)']),
    (['--config.data.channels=2'], ['--config.data.channels=2', '1 (gray) or 3']),
    (['--config.split.test_fraction=1.0'], ['--config.split.test_fraction=1.0', '[0, 1)']),
    (['--config.labels.subjects=4'], ['--config.labels.subjects=4', '--config.labels.unit=subject']),
])
def test_bad_training_flags_are_one_line(tmp_path, args, words):
  assert_user_error(_main(tmp_path / 'run', *args), *words)
  assert not os.path.exists(tmp_path / 'run')  # Refused before any work.


@pytest.mark.parametrize('config,args,words', [
    ('nonexistent.py', [], ['Cannot load the config file', 'No such file']),
    ('baseline.py:runlocl', [], ['Unknown config argument', "'runlocl'"]),
    ('sweep.py:preset=gpu', [], ['Unknown preset', 'runlocal']),
    ('finetune.py:runlocal', [], ['finetune needs a pretrain run',
                                  '--config.finetune.pretrained_workdir']),
    ('finetune.py:runlocal', ['--config.finetune.pretrained_workdir=/nonexistent'],
     ['No pretrain checkpoint found in /nonexistent']),
    ('sweep.py', ['--config.sweep.fractions=(0.0,0.5)'], ['fractions', '(0, 1]']),
    ('sweep.py', ['--config.sweep.protocols=(\'leaky\',)'], ['Unknown protocols', 'honest']),
    ('predict.py', ['--config.predict.inputs=/nonexistent/*.png'], ['matches no image file']),
    ('predict.py', ['--config.predict.inputs=test_split'], ['--config.predict.checkpoint_workdir']),
    ('predict.py', ['--config.cam.layer=stage5'], ['Unknown cam.layer', 'stage4']),
    ('audit.py:runlocal', ['--config.audit.threshold=1.5'], ['audit.threshold=1.5',
                                                             '(-1, 1]']),
    ('audit.py:runlocal', ['--config.split.scheme=person'], ['Unknown split.scheme',
                                                             'subject']),
])
def test_bad_configs_of_every_mode_are_one_line(tmp_path, config, args, words):
  assert_user_error(_main(tmp_path / 'run', *args, config=config, tiny=False), *words)


def test_missing_flags_are_one_line(tmp_path):
  result = subprocess.run([sys.executable, MAIN, _config('baseline.py')], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert_user_error(result, '--workdir is required')
  result = subprocess.run([sys.executable, MAIN, f'--workdir={tmp_path}'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert_user_error(result, '--config is required')


def test_verbose_adds_the_traceback(tmp_path):
  result = _main(tmp_path / 'run', '--config.train.num_epochs=0', '--verbose')
  assert result.returncode == errors.EXIT_STATUS
  assert 'Traceback' in result.stderr and 'UserError' in result.stderr
  assert result.stderr.splitlines()[-1].startswith('error: --config.train.num_epochs=0')
  result = _main(tmp_path / 'run', '--config.label_fractoin=0.1', '--verbose')
  assert 'Traceback' in result.stderr
  assert result.stderr.splitlines()[-1].startswith('error: --config.label_fractoin')


def test_a_bug_keeps_its_traceback(tmp_path):
  """A config file that fails with a programming error is not dressed as a user error."""
  (tmp_path / 'buggy.py').write_text('def get_config():\n  return undefined_name\n')
  result = subprocess.run([sys.executable, MAIN, f'--config={tmp_path / "buggy.py"}',
                           f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode not in (0, errors.EXIT_STATUS)
  assert 'Traceback' in result.stderr and 'NameError' in result.stderr
  assert not any(line.startswith('error: ') for line in result.stderr.splitlines())


# ----------------------------------------------------------------------------- data and paths


def test_broken_dataset_zip_is_one_line(tmp_path):
  broken = tmp_path / 'alzheimer-mri-dataset.zip'
  broken.write_bytes(b'PK\x03\x04 only the first bytes of a download')
  assert_user_error(
      _main(tmp_path / 'run', '--config.data.name=alzheimer_mri',
            f'--config.data.path={broken}'),
      'not a readable zip file', str(broken))


def test_wrong_kaggle_zip_is_one_line_after_tensorflow_loads(tmp_path, data_dir):
  """A zip without the Kaggle class folders is refused when read, still in one line."""
  wrong = tmp_path / 'wrong.zip'
  with zipfile.ZipFile(wrong, 'w') as archive:
    archive.writestr('Dataset/cats/1.jpg', b'not an image')
  env = dict(os.environ)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # main.py's own default.
  result = _main(tmp_path / 'run', '--config.data.name=alzheimer_mri',
                 f'--config.data.path={wrong}', data_dir=str(tmp_path / 'tfds'), env=env)
  assert_user_error(result, 'No class folder', 'Mild_Demented', str(wrong))
  for noise in NOISE:
    assert noise not in result.stdout + result.stderr, noise


def test_missing_kaggle_data_is_one_line(tmp_path):
  """The default data set without the zip (a fresh machine) names where to put it."""
  result = _main(tmp_path / 'run', '--config.data.name=alzheimer_mri',
                 data_dir=str(tmp_path / 'tfds'))
  assert_user_error(result, 'Kaggle Alzheimer MRI data was not found', 'dataset_path')


def test_empty_class_folder_is_one_line_and_a_good_folder_logs_cleanly(tmp_path):
  folder = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for name in ('AD', 'CN'):
    os.makedirs(folder / name)
    for i in range(4):
      PIL.Image.fromarray(rng.integers(0, 256, (32, 32), np.uint8)).save(
          folder / name / f'{i}.png')
  os.makedirs(folder / 'MCI')
  args = ['--config.data.name=image_folder', f'--config.data.path={folder}',
          '--config.data.image_size=32', f'--config.data.dir={tmp_path / "tfds"}']
  assert_user_error(_main(tmp_path / 'audit', *args, config='audit.py', tiny=False),
                    'MCI holds no images', 'remove the folder')
  # Without the empty folder the audit builds the data set and runs: progress bars
  # only on a terminal, no start-up notices of TensorFlow or JAX in the log.
  os.rmdir(folder / 'MCI')
  env = dict(os.environ)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  result = _main(tmp_path / 'audit', *args, config='audit.py', tiny=False, env=env)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output
  assert 'Dataset image_folder downloaded and prepared' in output
  assert 'steps/s' in output and 'ETA' in output  # clu's progress is kept.
  for noise in NOISE:
    assert noise not in output, noise


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / 'file').write_text('')
  assert_user_error(_main(tmp_path / 'file'), '--workdir=', 'is a file')


def test_invalid_config_json_is_one_line_naming_the_file(tmp_path, data_dir):
  # A predict run pointed at it: refused before TensorFlow loads.
  broken = tmp_path / 'ft'
  os.makedirs(broken)
  (broken / 'config.json').write_text('{"mode": "finetune", "seed": 0,,}')
  assert_user_error(
      _main(tmp_path / 'predict', f'--config.predict.checkpoint_workdir={broken}',
            '--config.predict.inputs=test_split', config='predict.py', tiny=False),
      str(broken / 'config.json'), 'not valid JSON', 'new --workdir')
  # A training workdir: refused once the data set is loaded, before training.
  assert_user_error(_main(broken, data_dir=data_dir), str(broken / 'config.json'),
                    'not valid JSON')
  # In-process: check_workdir_config and load_config say the same.
  with pytest.raises(errors.UserError, match='config.json is not valid JSON'):
    workdirs.check_workdir_config(tiny_config(data_dir), str(broken))
  (broken / 'config.json').write_text('[1, 2]')
  with pytest.raises(errors.UserError, match='holds no config'):
    workdirs.load_config(str(broken))


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full')
def test_full_disk_is_one_line_naming_the_workdir(tmp_path, data_dir):
  """config.json's temporary file leads to /dev/full: writing it fails with ENOSPC."""
  workdir = tmp_path / 'run'
  os.makedirs(workdir)
  os.symlink('/dev/full', workdir / '.config.json.tmp')
  assert_user_error(_main(workdir, data_dir=data_dir), 'No space left',
                    f'--workdir={workdir}')
  assert not os.path.exists(workdir / 'config.json')


def test_full_disk_message_from_any_layer():
  error = OSError(errno.ENOSPC, 'No space left on device', '/w/checkpoints/latest/8/x')
  message = errors.user_message(RuntimeError('orbax failed'), 'w')
  assert message is None  # A bare RuntimeError is a bug.
  wrapped = RuntimeError('saving failed')
  wrapped.__cause__ = error
  message = errors.user_message(wrapped, '/w')
  assert '--workdir=/w' in message and '/w/checkpoints/latest/8/x' in message
  assert errors.user_message(ValueError('tensorstore: No space left on device'), '/w')


# ----------------------------------------------------------------------------- in-process checks


def _train(data_dir, **overrides):
  return tiny_config(data_dir, 'baseline', **overrides)


def _nested(config, name, value):
  config = ml_collections.ConfigDict(config.to_dict())
  *parents, field = name.split('.')
  holder = config
  for parent in parents:
    holder = holder[parent]
  holder[field] = value
  return config


def _sweep(**overrides):
  return with_fields(sweep_config.get_config('preset=runlocal'), **overrides)


def _predict(tmp_path, **overrides):
  config = predict_config.get_config()
  config.predict.checkpoint_workdir = str(tmp_path)
  config.predict.inputs = predict.TEST_SPLIT
  if 'batch_size' in overrides:  # predict's own batch, not a training run's.
    config.predict.batch_size = overrides.pop('batch_size')
  return with_fields(config, **overrides)


def _audit(**overrides):
  return with_fields(audit_config.get_config('runlocal'), **overrides)


TRAIN_CASES = [
    ('mode', 'pretrian', 'Unknown mode'),
    ('seed', -1, r'--config\.seed=-1 must be a whole number >= 0'),
    ('data.name', 'synthetic_mri/huge', 'Unknown data set'),
    ('data.image_size', 16, 'downsample 32x'),
    ('data.nifti.slice_selection', 'all', r'Unknown data\.nifti\.slice_selection'),
    ('data.nifti.num_slices', 0, r'data\.nifti\.num_slices=0'),
    ('data.nifti.min_mask_fraction', 0.0, r'data\.nifti\.min_mask_fraction=0\.0 must be in \(0, 1\]'),
    ('data.subject_ids', 'some', r'Unknown data\.subject_ids'),
    ('data.grouping.threshold', 1.5, r'\(-1, 1\]'),
    ('data.grouping.k', 0, r'data\.grouping\.k=0'),
    ('data.channels', 4, '1 \\(gray\\) or 3'),
    ('split.scheme', 'random', r'Unknown split\.scheme'),
    ('split.seed', -3, r'split\.seed=-3'),
    ('split.test_fraction', -0.1, r'\[0, 1\)'),
    ('split.val_fraction', 1.0, r'\[0, 1\)'),
    ('split.num_folds', 1, r'split\.num_folds=1 must be a whole number >= 2'),  # Where K-fold is set up.
    ('split.fold', -1, r'split\.fold=-1'),
    ('labels.fraction', 0.0, r'labels\.fraction=0\.0 must be in \(0, 1\]'),
    ('labels.seed', -1, r'labels\.seed=-1'),
    ('labels.unit', 'people', r'Unknown labels\.unit .*subject \(k people'),
    ('labels.subjects', -2, r'labels\.subjects=-2 must be a whole number >= 0'),
    ('labels.subjects', 8, r'labels\.subjects=8 is read only with --config\.labels\.unit=subject'),
    ('labels.task', 'five_class', r'Unknown labels\.task.*three_class'),
    ('augment.crop_scale', (0.0, 1.0), 'low <= high <= 1'),
    ('augment.crop_scale', (0.8, 0.5), 'low <= high <= 1'),
    ('augment.crop_scale', (0.5,), 'pair'),
    ('augment.crop_ratio', (1.2, 0.8), 'low <= high'),
    ('augment.rotation_degrees', -5.0, 'rotation_degrees=-5.0 must be a number >= 0'),
    ('augment.brightness', -0.1, 'brightness'),
    ('augment.contrast', -0.1, 'contrast'),
    ('model.name', 'resnet101', '--config.model.name'),
    ('model.width', 0.0, r'model\.width=0\.0 must be a positive number'),
    ('model.encoder_output', 'max', r'Unknown model\.encoder_output'),
    ('pretrain.projection_dims', (), r'pretrain\.projection_dims'),
    ('pretrain.projection_dims', (64, 0), r'pretrain\.projection_dims'),
    ('pretrain.projection_dropout', 1.0, r'\[0, 1\)'),
    ('supervised.head_dropout', -0.5, r'\[0, 1\)'),
    ('model.dtype', 'float16', r'Unknown model\.dtype'),
    ('train.num_epochs', 0, r'train\.num_epochs=0'),
    ('train.batch_size', 0, 'positive multiple'),
    ('train.batch_size', -16, 'positive multiple'),
    ('eval.batch_size', 0, 'positive multiple'),
    ('pretrain.optimizer.learning_rate', 0.0, 'learning_rate=0.0 must be a positive'),
    ('pretrain.optimizer.learning_rate', float('nan'), 'learning_rate=nan'),
    ('pretrain.optimizer.momentum', -0.1, r'\[0, 1\)'),
    ('pretrain.optimizer.weight_decay', -1.0, '>= 0'),
    ('pretrain.optimizer.warmup_fraction', 1.0, r'\[0, 1\)'),
    ('pretrain.sam', 'adam', r'Unknown pretrain\.sam'),
    ('supervised.sam', 'adam', r'Unknown supervised\.sam'),
    ('pretrain.sam_rho', -1.0, r'pretrain\.sam_rho=-1.0 must be a number >= 0'),
    ('pretrain.sam_eta', -0.01, r'pretrain\.sam_eta'),
    ('supervised.sam_rho', -1.0, r'supervised\.sam_rho=-1.0 must be a number >= 0'),
    ('pretrain.temperature', 0.0, r'pretrain\.temperature=0.0 must be a positive number'),
    ('pretrain.temperature_steps', ((3.0, 0.0),), 'positive temperatures'),
    ('supervised.optimizer.learning_rate', -1e-4, 'learning_rate'),
    ('supervised.optimizer.weight_decay', -1e-8, 'weight_decay'),
    ('eval.selection_metric', 'loss', r'Unknown eval\.selection_metric'),
    ('eval.selection_split', 'train', r'Unknown eval\.selection_split'),
    ('eval.every_epochs', 0, r'eval\.every_epochs=0'),
    ('eval.precise_bn_batches', 0, r'eval\.precise_bn_batches'),
    ('eval.knn_k', (), r'eval\.knn_k'),
    ('eval.knn_k', (1, -5), r'eval\.knn_k'),
    ('train.log_every_steps', 0, r'train\.log_every_steps=0'),
    ('train.checkpoint_every_steps', -1, r'train\.checkpoint_every_steps=-1'),
    ('train.keep_checkpoints', 0, r'train\.keep_checkpoints=0'),
    ('train.num_summary_images', -1, r'train\.num_summary_images=-1'),
]


@pytest.mark.parametrize('field,value,needle', TRAIN_CASES,
                         ids=[f'{f}={v}' for f, v, _ in TRAIN_CASES])
def test_every_check_family_rejects_its_bad_values(data_dir, field, value, needle):
  config = _train(data_dir)
  run.check_config(config)  # The tiny config itself is fine ...
  with pytest.raises(errors.UserError, match=needle):  # ... and each bad value is not.
    run.check_config(_nested(config, field, value))


def test_a_subject_budget_with_a_fraction_is_one_line(data_dir):
  config = _train(data_dir, **{'labels.unit': 'subject', 'labels.subjects': 8})
  run.check_config(config)  # 8 labeled subjects are fine ...
  with pytest.raises(errors.UserError) as error:  # ... a fraction beside them is not.
    run.check_config(_nested(config, 'labels.fraction', 0.5))
  assert str(error.value) == ('--config.labels.fraction=0.5 is read only with '
                              '--config.labels.unit=slice; set --config.labels.unit=slice (or '
                              'leave labels.fraction at 1.0).')


def test_sweep_predict_and_audit_fields(tmp_path):
  for preset in sweep_config.PRESETS:
    run.check_config(sweep_config.get_config(f'preset={preset}'))
  for overrides, needle in [
      (dict(seeds=(0, -1)), 'seeds'), (dict(reference_seeds=()), 'at least one seed'),
      (dict(multi_seed_max_fraction=1.5), r'\[0, 1\]'),
      ({'sweep.label_unit': 'person'}, r'Unknown sweep\.label_unit.*subject'),
      ({'sweep.subject_budgets': (4, -1)}, r'sweep\.subject_budgets=.*whole numbers >= 0'),
      ({'sweep.subject_budgets': ()}, r'sweep\.subject_budgets'),
      ({'sweep.multi_seed_max_subjects': -1}, r'sweep\.multi_seed_max_subjects=-1'),
      (dict(tasks=('binary', 'two_class')), r'Unknown tasks.*three_class'),
      (dict(pretrain_num_epochs=0), 'pretrain_num_epochs'),
      (dict(evals_per_run=0), 'evals_per_run'), (dict(floor_image_size=0), 'floor_image_size'),
      (dict(cam_method='scorecam'), r'Unknown cam\.method'),
      (dict(batch_size=0), 'positive multiple'), (dict(image_size=8), 'downsample 32x')]:
    with pytest.raises(errors.UserError, match=needle):
      run.check_config(_sweep(**overrides))
  for overrides, needle in [
      (dict(cam_method='scorecam'), r'Unknown cam\.method'),
      (dict(cam_layer='conv1'), r'Unknown cam\.layer'), (dict(batch_size=0), 'batch_size=0'),
      (dict(deletion_fractions=(0.1, 1.0)), 'deletion_fractions'),
      (dict(deletion_fractions=()), 'deletion_fractions'),
      (dict(inputs=str(tmp_path / 'none' / '*.png')), 'matches no image file'),
      (dict(inputs=None), 'Set --config.predict.inputs'),
      (dict(checkpoint_workdir=None), 'set --config.predict.checkpoint_workdir'),
      (dict(), 'No run found')]:
    with pytest.raises(errors.UserError, match=needle):
      run.check_config(_predict(tmp_path, **overrides))
  run.check_config(_audit())
  for overrides, needle in [
      (dict(audit_metric='euclidean'), r'Unknown audit\.metric'),
      (dict(grouping_threshold=-1.0), r'\(-1, 1\]'),
      (dict(audit_image_size=0), r'audit\.image_size=0'),
      (dict(audit_num_pairs_shown=-1), r'audit\.num_pairs_shown'),
      (dict(grouping_max_size=1), r'audit\.grouping_max_size'),
      (dict(image_size=0), 'image_size=0'), (dict(val_fraction=1.0), r'\[0, 1\)'),
      (dict(dataset='image_folder'), r'needs data\.path'),
      (dict(dataset='image_folder', dataset_path=str(tmp_path / 'nowhere')),
       'does not exist')]:
    with pytest.raises(errors.UserError, match=needle):
      run.check_config(_audit(**overrides))


def test_dataset_path_must_exist_for_every_data_set(data_dir, tmp_path):
  """A prepared data set is no excuse for a path that does not exist."""
  for dataset in ('synthetic_mri/small', 'alzheimer_mri', 'image_folder', 'nifti_folder'):
    with pytest.raises(errors.MissingPathError, match='does not exist'):
      run.check_config(_train(data_dir, dataset=dataset,
                                 dataset_path=str(tmp_path / 'gone.zip')))
  (tmp_path / 'file.png').write_bytes(b'')
  with pytest.raises(errors.UserError, match='is a file'):
    run.check_config(_train(data_dir, dataset='image_folder',
                               dataset_path=str(tmp_path / 'file.png')))


def test_dispatch_checks_before_work_and_knows_every_mode(data_dir, tmp_path):
  for mode in run.MODES:  # Every registered mode has its checks and its entry point.
    module = importlib.import_module(run.MODES[mode])
    assert callable(module.check_config) and callable(module.main), mode
  setups = []
  with pytest.raises(errors.UserError, match=r'labels\.fraction'):
    run.run(_train(data_dir, label_fraction=2.0), str(tmp_path / 'run'),
            setup=lambda: setups.append(1))
  assert not setups and not os.path.exists(tmp_path / 'run')


def test_user_errors_keep_the_builtin_types_callers_catch():
  assert issubclass(errors.UserError, ValueError)
  assert issubclass(errors.MissingPathError, FileNotFoundError)
  assert issubclass(errors.TrainingDivergedError, FloatingPointError)
  assert errors.one_line('a\n  b\tc ') == 'a b c'
  nested = KeyError('\'label_fractoin\'\nDid you mean "label_fraction" instead of '
                    '"label_fractoin"?')
  message = errors.flag_error_message(AttributeError(nested),
                                      ['main.py', '--config.label_fractoin=0.1'])
  assert re.fullmatch(r'--config\.label_fractoin is not a field.*did you mean '
                      r'--config\.label_fraction\?.*', message)
  # A KeyError no override explains is a bug in a config file: not a user error.
  assert errors.flag_error_message(KeyError('other'), ['main.py']) is None


def test_unwritable_workdir_file_is_one_line():
  error = PermissionError(errno.EACCES, 'Permission denied', '/runs/a/checkpoints/latest')
  message = errors.user_message(error, '/runs/a')
  assert message.startswith('Cannot write /runs/a/checkpoints/latest in --workdir=/runs/a')
  # Elsewhere it is not the workdir's: a bug (or the data set's, told by its own check).
  assert errors.user_message(PermissionError(errno.EACCES, 'denied', '/etc/x'), '/runs/a') is None


def test_diverged_training_is_one_line(tmp_path, data_dir):
  result = _main(tmp_path / 'run', '--config.supervised.optimizer.learning_rate=1e30',
                 '--config.train.num_epochs=3', '--config.train.log_every_steps=4',
                 '--config.train.checkpoint_every_steps=4', data_dir=data_dir)
  assert_user_error(result, 'Training diverged', 'Lower the learning rate')
