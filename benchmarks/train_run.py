r"""Whole-run throughput: a real `train_and_evaluate` run against its own train steps alone.

Trains the `cpu` sweep preset's model (ResNet-18 at width 0.25, 64 px, 1 channel,
batch 32; `--preset=full`: the reference's ResNet-50) for about `--steps` steps (or
`--epochs` epochs) through `trainer.train_and_evaluate` (evaluation, checkpoints and
summaries at the preset's cadence), then times the same compiled train steps alone
on the same data. Prints end-to-end images/s, step-only images/s,
the XLA compile seconds of the run, and the share of the run that is not training
steps; the last line is JSON.

  python benchmarks/train_run.py                                  # synthetic data, baseline
  python benchmarks/train_run.py --mode=pretrain --steps=300      # SimCLR + ASAM
  python benchmarks/train_run.py --dataset_path=../shared/data/alzheimer-mri-dataset.zip
  python benchmarks/train_run.py --preset=full --mode=pretrain --epochs=1 \
      --dataset_path=/data/alzheimer-mri-dataset.zip                # on a GPU
"""

import argparse
import math
import os
import pathlib
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import sweep as sweep_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.data import arrays as arrays_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.data import batches  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax import run  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.parallel import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import optimizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.study import plan as plan_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import compile_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import recipes  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position
import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position  # benchmarks/, beside this file



def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--mode', default='baseline', choices=('baseline', 'pretrain'))
  parser.add_argument('--preset', default='cpu', choices=('cpu', 'full'),
                      help="The sweep preset whose model and recipe are trained.")
  parser.add_argument('--steps', type=int, default=600, help='About this many train steps.')
  parser.add_argument('--epochs', type=int, default=None,
                      help='Train this many epochs instead of about --steps steps.')
  parser.add_argument('--dataset_path', default=None,
                      help='The Kaggle zip; the embedded synthetic data when unset.')
  parser.add_argument('--data_dir', default=None, help='TFDS data dir.')
  parser.add_argument('--synthetic', default='synthetic_mri', help='The data without --dataset_path.')
  parser.add_argument('--steps_per_dispatch', type=int, default=0,
                      help='Steps per dispatch (0: the platform default).')
  parser.add_argument('--timed_dispatches', type=int, default=10,
                      help='Dispatches of the step-only timing.')
  parser.add_argument('--workdir', default=None, help='Run directory (default: a temporary one).')
  return parser.parse_args(argv)


def benchmark_config(args):
  """The preset's run config for the mode, sized to `args.epochs` or about `args.steps` steps."""
  preset = sweep_config.get_config(f'preset={args.preset}')
  if args.dataset_path:
    preset.data.path = args.dataset_path
  else:
    preset.data.name = args.synthetic
  preset.data.dir = args.data_dir
  preset.train.steps_per_dispatch = args.steps_per_dispatch
  arrays = arrays_lib.load_arrays(preset)
  splits = plan_lib.protocol_splits(preset, 'honest', arrays)
  num_images = (len(splits['train']) + len(splits['val']) if args.mode == 'pretrain'
                else len(splits['train']))
  config = plan_lib.run_config(preset, 'honest', args.mode, seed=0,
                                 num_classes=len(arrays.class_names),
                                 num_labeled=num_images)  # All the train slices labeled.
  per_epoch = batches.steps_per_epoch(num_images, config.train.batch_size)
  config.train.num_epochs = args.epochs or max(1, math.ceil(args.steps / per_epoch))
  config.eval.every_epochs = max(1, config.train.num_epochs // (preset.sweep.evals_per_run or 1))
  return config


def time_steps(config, num_dispatches):
  """Seconds per train step of the run's own compiled steps, on its own batches."""
  mesh = sharding.create_mesh()
  cache = compile_cache.CompileCache()
  recipe = recipes.create_recipe(config, mesh, cache)
  per_epoch = recipe.rows.steps_per_epoch
  tx = optimizers.create_optimizer(config)
  state = state_lib.create_train_state(config, recipe.model, jax.random.key(0), tx, mesh)
  p_train_steps = steps_lib.make_train_steps(config, recipe.objective, mesh)
  k = steps_lib.steps_per_dispatch(config)
  rngs = sharding.replicate_tree({'dropout': jax.random.key(1),
                                  'augment': batches.augment_key(0)}, mesh)
  values = sharding.replicate_tree(steps_lib.step_values(
      k, per_epoch, recipe.class_weights,
      optimizers.schedule_values(config, per_epoch * config.train.num_epochs)), mesh)
  inputs = [trainer.dispatch_inputs(recipe, i * k, k, k) for i in range(num_dispatches + 1)]
  metrics = sharding.replicate_tree(steps_lib.TrainMetrics.empty(), mesh)
  state, metrics = p_train_steps(state, metrics, inputs[0], recipe.device_data.arrays, rngs,
                                 values)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for batch in inputs[1:]:
    state, metrics = p_train_steps(state, metrics, batch, recipe.device_data.arrays, rngs,
                                   values)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / (num_dispatches * k), recipe.rows.batch_size


def run_benchmark(args):
  run.setup_runtime()
  config = benchmark_config(args)
  workdir = args.workdir or tempfile.mkdtemp(prefix='train_run_')
  load_start = os.getloadavg()
  with throughput.CompileCounter() as compiles:
    start, start_cpu = time.perf_counter(), time.process_time()
    result = trainer.train_and_evaluate(config, workdir)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
  steps = result['total_steps']
  step_seconds, batch_size = time_steps(config, args.timed_dispatches)
  return {
      'benchmark': 'train_run',
      'mode': config.mode,
      'dataset': config.data.name,
      'model': config.model.name, 'width': config.model.width, 'image_size': config.data.image_size,
      'channels': config.data.channels, 'batch_size': batch_size,
      'steps_per_dispatch': steps_lib.steps_per_dispatch(config),
      'num_devices': jax.device_count(), 'platform': jax.default_backend(),
      'cpu_count': os.cpu_count(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'total_steps': steps, 'wall_s': wall, 'cpu_s': cpu,
      'compile_s': compiles.seconds,
      'end_to_end_images_per_s': steps * batch_size / wall,
      'step_only_images_per_s': batch_size / step_seconds,
      'step_s': step_seconds,
      'end_to_end_fraction_of_step_rate': steps * step_seconds / wall,
      'non_step_share': 1.0 - steps * step_seconds / wall,
      'test_balanced_accuracy': result.get('balanced_accuracy'),
      'loadavg_start': list(load_start), 'loadavg_end': list(os.getloadavg()),
  }


def main(argv=None):
  result = run_benchmark(parse_args(argv))
  print(f"{result['mode']} {result['model']} x{result['width']} {result['image_size']} px, "
        f"{result['total_steps']} steps of {result['batch_size']} on {result['num_devices']} "
        f"{result['platform']} device(s), {result['steps_per_dispatch']} steps per dispatch")
  print(f"  end to end {result['end_to_end_images_per_s']:.0f} images/s "
        f"({result['wall_s']:.1f} s, compile {result['compile_s']:.1f} s); step only "
        f"{result['step_only_images_per_s']:.0f} images/s; non-step share "
        f"{100 * result['non_step_share']:.0f} %")
  return throughput.report(result)


if __name__ == '__main__':
  main()
