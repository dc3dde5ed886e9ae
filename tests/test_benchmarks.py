"""Every script under benchmarks/ runs at a tiny size (smoke tests, seconds each)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from simclr_jax.model import resnet
from tests.conftest import REPO


def _load_throughput():
  path = os.path.join(REPO, 'benchmarks', 'throughput.py')
  spec = importlib.util.spec_from_file_location('throughput', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TINY = ['--mode=baseline', '--model=resnet18', '--width=0.125', '--image_size=16',
        '--channels=1', '--batch_size=4', '--encoder_output=avgpool', '--warmup_steps=1',
        '--steps=2', '--window=2', '--num_devices=1']


def test_throughput_prints_json_with_every_figure(capsys, monkeypatch):
  throughput = _load_throughput()
  # Two one-block stages: XLA CPU's compile time grows with the number of layers.
  monkeypatch.setitem(resnet.STAGE_SIZES, 'resnet18', (1, 1))
  result = throughput.main(TINY)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == json.loads(json.dumps(result))
  for key in ('images_per_s', 'step_s_median', 'step_s_min', 'step_s_max', 'step_s_iqr',
              'compile_s', 'peak_memory_bytes', 'flops_per_step', 'achieved_flops',
              'peak_fraction', 'loadavg_start', 'loadavg_end', 'compiles_while_stepping',
              'xla_flags', 'num_devices'):
    assert key in printed, key
  assert printed['mode'] == 'baseline' and printed['sam'] == 'none'
  assert printed['num_devices'] == 1 and len(printed['step_s_windows']) == 1
  assert printed['images_per_s'] == pytest.approx(4 / printed['step_s_median'])
  assert printed['step_s_min'] <= printed['step_s_median'] <= printed['step_s_max']
  assert printed['flops_per_step'] > 0 and printed['peak_memory_bytes'] > 0
  assert printed['peak_fraction'] == pytest.approx(
      printed['achieved_flops'] / throughput.CPU_PEAK_FLOPS)
  assert printed['compiles_while_stepping'] == 0  # The step never recompiles.


def test_throughput_rejects_a_window_that_does_not_divide_the_steps():
  throughput = _load_throughput()
  with pytest.raises(SystemExit):
    throughput.parse_args(['--steps=5', '--window=2'])


def _load(name):
  """A script of benchmarks/ as a module, its folder on the path as when it runs."""
  folder = os.path.join(REPO, 'benchmarks')
  if folder not in sys.path:
    sys.path.insert(0, folder)
  path = os.path.join(folder, f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('script', sorted(
    name for name in os.listdir(os.path.join(REPO, 'benchmarks')) if name.endswith('.py')))
def test_every_benchmark_script_starts(script):
  """`--help` of each script: its imports and flags are alive (no script rots unseen)."""
  result = subprocess.run([sys.executable, os.path.join('benchmarks', script), '--help'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  # argparse exits 0 after its help; absl's app (augmentation.py) exits 1.
  assert result.returncode == 0 or 'Try --helpfull' in result.stdout, result.stderr[-2000:]
  assert 'usage' in result.stdout.lower() or 'flags' in result.stdout.lower(), result.stdout


def test_throughput_times_scanned_dispatches_per_step(capsys, monkeypatch):
  throughput = _load_throughput()
  monkeypatch.setitem(resnet.STAGE_SIZES, 'resnet18', (1, 1))
  result = throughput.main(TINY + ['--steps_per_dispatch=3'])
  assert result['steps_per_dispatch'] == 3 and result['compiles_while_stepping'] == 0
  # Per-step figures: a dispatch of 3 steps is 3 steps of 4 images.
  assert result['images_per_s'] == pytest.approx(4 / result['step_s_median'])


def test_op_profile_puts_every_traced_operation_of_a_tiny_step_in_a_category(capsys,
                                                                              monkeypatch):
  op_profile = _load('op_profile')
  monkeypatch.setitem(resnet.STAGE_SIZES, 'resnet18', (1, 1))
  result = op_profile.main(TINY)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == json.loads(json.dumps(result))
  categories = result['categories']
  assert set(categories) == set(op_profile.CATEGORIES)
  assert result['thunks_per_step'] > 0 and result['thunks_named_outside_hlo'] == 0
  assert sum(c['busy_ms_per_step'] for c in categories.values()) == pytest.approx(
      result['busy_ms_per_step'])
  assert sum(c['share_of_busy'] for c in categories.values()) == pytest.approx(1.0)
  # The stem's convolution (1 input channel) stays XLA's; the blocks' are products.
  assert categories['conv']['thunks_per_step'] >= 1 and categories['dot']['thunks_per_step'] > 1
  assert result['slowest'] and result['slowest'][0]['ms_per_step'] > 0


def test_op_profile_reads_categories_from_compiled_hlo():
  op_profile = _load('op_profile')
  hlo = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation.1 (param_0: f32[4], /*index=1*/param_1: f32[4]) -> f32[] {
  %param_0 = f32[4]{0} parameter(0)
  %reduce.1 = f32[] reduce(%param_0, %c), dimensions={0}, to_apply=%add
}

%fused_computation.2 (param_0.1: f32[4]) -> f32[4] {
  %param_0.1 = f32[4]{0} parameter(0)
  ROOT %multiply.3 = f32[4]{0} multiply(%param_0.1, %param_0.1)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %reduce_fusion = f32[] fusion(%a), kind=kLoop, calls=%fused_computation.1
  %multiply_fusion = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation.2
  %copy.4 = f32[4]{0} copy(%a)
  %convolution.5 = f32[1,2,2,4]{3,2,1,0} convolution(%x, %k), window={size=3x3}
  ROOT %dot.6 = f32[4]{0} dot(%a, %a), lhs_contracting_dims={0}
}
"""
  categories = op_profile.parse_hlo(hlo)
  assert categories['reduce_fusion'] == 'reduce'
  assert categories['multiply_fusion'] == 'elementwise'
  assert categories['copy.4'] == 'copy'
  assert categories['convolution.5'] == 'conv' and categories['dot.6'] == 'dot'


def test_augmentation_benchmark_prints_json(capsys):
  augmentation = _load('augmentation')
  with pytest.raises(SystemExit):  # absl's app.run exits after main.
    augmentation.app.run(augmentation.main, argv=[
        'augmentation', '--num_images=16', '--image_size=16', '--batch_size=4',
        '--warmup_batches=1', '--window_batches=2', '--num_windows=2'])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed['benchmark'] == 'batches.simclr_batch' and printed['batches_per_s'] > 0
  assert printed['views_per_s'] == pytest.approx(2 * printed['images_per_s'], rel=1e-3)


def test_collectives_counts_the_reductions_of_a_tiny_step(monkeypatch):
  collectives = _load('collectives')
  monkeypatch.setitem(resnet.STAGE_SIZES, 'resnet18', (1, 1))
  result = collectives.main(['--mode=baseline', '--model=resnet18', '--image_size=32',
                             '--channels=1', '--batch_size=4', '--num_devices=1'])
  assert result['devices'] == 1 and result['batchnorm_layers'] > 0
  assert result['parameters'] > 0 and isinstance(result['collectives'], dict)


def test_train_run_and_accuracy_curve_on_a_tiny_run(tmp_path, data_dir, capsys):
  """A whole run through train_and_evaluate, then its curve read from its events."""
  train_run = _load('train_run')
  result = train_run.main(['--steps=6', '--timed_dispatches=2', f'--data_dir={data_dir}',
                           '--synthetic=synthetic_mri/small',
                           f'--workdir={tmp_path / "run"}'])
  assert result['total_steps'] >= 6 and result['end_to_end_images_per_s'] > 0
  assert result['step_only_images_per_s'] > 0
  accuracy_curve = _load('accuracy_curve')
  out = tmp_path / 'curve.png'
  accuracy_curve.main([str(tmp_path / 'run'), '--tag=val/balanced_accuracy', f'--out={out}'])
  assert out.exists() and (tmp_path / 'curve.csv').exists()
  with open(tmp_path / 'curve.csv') as f:
    assert len(f.read().splitlines()) >= 2  # A header and a point per evaluation.


def test_pretrain_length_reads_validation_only_on_a_tiny_fold(tmp_path, data_dir, capsys):
  """A tiny pretraining, fine-tuned and probed; a baseline beside; validation only."""
  pretrain_length = _load('pretrain_length')
  overrides = ['data.name=synthetic_mri/small', f'data.dir={data_dir}', 'model.width=0.125',
               'pretrain.projection_dims=(32, 16)', 'train.batch_size=16',
               'sweep.max_steps_per_run=6', 'eval.knn_k=(1, 5)', 'sweep.evals_per_run=2']
  out = tmp_path / 'length'
  pretrain_length.main(['--preset=runlocal', '--epochs=1', '--subjects=4',
                        f'--workdir={tmp_path / "runs"}', f'--out={out}'] +
                       [f'--override={o}' for o in overrides])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  arms = [(row['pretrain_epochs'], row['arm']) for row in printed['rows']]
  assert arms == [(0, 'baseline'), (1, 'finetune'), (1, 'linear_probe')]
  for row in printed['rows']:
    assert 0.0 <= row['val_balanced_accuracy'] <= 1.0
  assert all(0.0 <= row['val_probe_balanced_accuracy'] <= 1.0 for row in printed['rows'][1:])
  assert out.with_suffix('.png').exists()
  with open(out.with_suffix('.csv')) as f:
    assert 'test' not in f.readline()  # Validation only.


def test_tune_supervised_grid_is_one_factor_at_a_time_around_the_preset():
  tune = _load('tune_supervised')
  assert tune.split_values('1e-4, (0.5, 1.0),x') == ['1e-4', '(0.5, 1.0)', 'x']
  assert tune.parse_grid('a.b=1,2; c=x') == [('a.b', ['1', '2']), ('c', ['x'])]
  repeated = tune.parse_args(['--workdir=w', '--out=o', '--grid=a.b=1,2', '--grid=c=x'])
  assert repeated.grid_fields == [('a.b', ['1', '2']), ('c', ['x'])]
  assert tune.parse_args(['--workdir=w', '--out=o']).grid_fields == tune.parse_grid(
      tune.DEFAULT_GRID)
  centre = {'a': 1, 'b': 'x'}
  grid = [('a', [1, 2, 3]), ('b', ['x', 'y'])]
  ofat = tune.grid_points(centre, grid, 'ofat')
  assert ofat == [centre, {'a': 2, 'b': 'x'}, {'a': 3, 'b': 'x'}, {'a': 1, 'b': 'y'}]
  assert len(tune.grid_points(centre, grid, 'product')) == 6
  for bad in ('split.val_fraction=0.2', 'eval.selection_split=test', 'a=1;a=2', 'a'):
    with pytest.raises(SystemExit):  # Fields that change what is scored are refused.
      tune.parse_args(['--workdir=w', '--out=o', f'--grid={bad}'])


def test_tune_supervised_chooses_on_validation_only_on_a_tiny_grid(tmp_path, data_dir, capsys):
  """Two learning rates, two folds, baseline runs of 6 steps; validation columns only."""
  tune = _load('tune_supervised')
  overrides = ['data.name=synthetic_mri/small', f'data.dir={data_dir}', 'model.width=0.125',
               'train.batch_size=16', 'sweep.max_steps_per_run=6', 'sweep.evals_per_run=2']
  out = tmp_path / 'tune'
  argv = ['--preset=runlocal', '--folds=0,1', '--subjects=4',
          '--grid=supervised.optimizer.learning_rate=1e-3,3e-3', f'--workdir={tmp_path / "runs"}',
          f'--out={out}'] + [f'--override={o}' for o in overrides]
  tune.main(argv + ['--dry_run'])  # The plan and its estimate; nothing trains.
  planned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert planned['runs'] == planned['to_train'] == 4 and planned['estimated_seconds'] > 0
  assert not (tmp_path / 'runs').exists()
  tune.main(argv)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed['runs'] == 4 and printed['trained'] == 4
  points = {p['point']: p['score'] for p in printed['points']}
  assert set(points) == {'preset', 'learning_rate=0.003'}  # The preset's 1e-3 and one more.
  assert points[printed['chosen']] == printed['score'] == max(points.values())
  with open(out.with_suffix('.csv')) as f:
    rows = list(csv.DictReader(f))
  assert not any('test' in column for column in rows[0])  # Validation only.
  assert len(rows) == 4 and {r['fold'] for r in rows} == {'0', '1'}
  for row in rows:
    # The recomputed score of the chosen checkpoint is the one the run selected on.
    with open(os.path.join(row['workdir'], 'metrics.json')) as f:
      selected = json.load(f)
    assert float(row['val_balanced_accuracy']) == pytest.approx(
        selected['selection_val_balanced_accuracy'], abs=1e-4)
    assert 0.0 <= float(row['val_subject_balanced_accuracy']) <= 1.0
  for point, score in points.items():
    mine = [float(r['val_subject_balanced_accuracy']) for r in rows if r['point'] == point]
    assert score == pytest.approx(sum(mine) / len(mine))
  markdown = out.with_suffix('.md').read_text()
  assert '| rank |' in markdown and f'Chosen: **{printed["chosen"]}**' in markdown
  assert 'benchmarks/tune_supervised.py --preset=runlocal' in markdown
  assert 'test' not in markdown.split('Command:')[0].replace('Test subjects were not read', '')
  tune.main(argv)  # Resumed: every run is finished, nothing trains, the same choice.
  again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert again['trained'] == 0 and again['chosen'] == printed['chosen']
  with open(out.with_suffix('.csv')) as f:
    assert all(float(row['wall_seconds']) > 0 for row in csv.DictReader(f))  # Kept in the runs.


def test_sweep_cell_cuts_the_sweep_to_one_cell_and_splits_its_time_by_phase():
  sweep_cell = _load('sweep_cell')
  args = sweep_cell.parse_args(['--workdir=/tmp/x', '--data=/d.zip', '--subjects=4',
                                '--override=train.batch_size=8'])
  flags = sweep_cell.command(args, 10, '/tmp/x/w')[2:]
  assert {"--config.sweep.protocols=('honest',)", '--config.sweep.subject_budgets=(4,)',
          '--config.sweep.group_runs=10', '--config.data.path=/d.zip',
          '--config.sweep.pretrain_num_epochs=1', '--config.train.batch_size=8'} <= set(flags)
  log = '\n'.join([
      'I sweep.py:216] Sweep group 1/3 done (2 runs: honest pretrain, folds 0,1) in 1 min 05 s;',
      'I sweep.py:216] Sweep group 2/3 done (1 runs: honest fold 2 pretrain) in 0 min 07 s;',
      'I sweep.py:216] Sweep group 3/3 done (4 runs: honest binary baseline+finetune 4 '
      'subjects seed 0, folds 0,1) in 2 min 00 s; elapsed',
      'I sweep.py:216] Sweep group 4/4 done (2 runs: honest binary probe 4 subjects seed 0, '
      'folds 0,1) in 0 min 30 s; elapsed'])
  assert sweep_cell.phases(log) == {'pretrain': 72, 'supervised': 150}
