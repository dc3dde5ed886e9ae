r"""Runs grouped in one vmapped program against the same runs one after another: images/s.

Builds R runs of one step key (the `cpu` sweep preset's model by default, or the
tests' tiny one, or the reference's ResNet-50), each with its own seed (its own
initial state, rows and keys) over one random uint8 data set on the devices, and
times, in alternating windows of `--rounds` rounds each:
- one after another: each round dispatches every run's own compiled steps
  (`steps.make_train_steps`, what a sweep runs today), R dispatches;
- grouped: each round is one dispatch of `groups.make_group_steps` (the same
  steps under `jax.vmap` over a leading run axis), every run advancing together.
A round is k steps (`--steps_per_dispatch`) of every run. Prints the total
images/s of both (median over the windows), their ratio, the compile seconds of
each program and the load average (on a shared machine the figures are noisy:
compare the two within one call); the last line is JSON.

  python benchmarks/group_throughput.py                           # cpu preset, baseline, 3 runs
  python benchmarks/group_throughput.py --runs=5 --mode=pretrain
  python benchmarks/group_throughput.py --preset=tiny --runs=2    # the tests' model, seconds
  python benchmarks/group_throughput.py --preset=full --steps_per_dispatch=16  # on a GPU
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import sweep as sweep_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.parallel import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import compile_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import groups  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import optimizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position  # benchmarks/, beside this file


SUMMARY = ('{runs} {mode} runs, {model} x{width} {image_size} px, batch {batch_size}, '
           'k={steps_per_dispatch}, {num_devices} {platform} device(s)\n'
           '  one after another {sequential_images_per_s:.1f} images/s; grouped '
           '{grouped_images_per_s:.1f} images/s ({grouped_speedup:.2f}x); compile '
           '{sequential_compile_s:.1f} s vs {grouped_compile_s:.1f} s; load {load:.1f} -> '
           '{load_end:.1f}')


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--runs', type=int, default=3, help='R: runs trained together.')
  parser.add_argument('--mode', default='baseline', choices=('baseline', 'pretrain'))
  parser.add_argument('--preset', default='cpu', choices=('tiny', 'cpu', 'full'),
                      help="tiny: the tests' ResNet-18 at 1/8 width, 32 px; cpu, full: the "
                      'sweep presets (configs/sweep.py).')
  for name, value, text in (
      ('num_classes', 2, 'Classes of the classifier head.'),
      ('steps_per_dispatch', 0, 'k (0: the platform default, 1 on CPU).'),
      ('rows', 0, 'Rows of the random data set (0: two batches).'),
      ('rounds', 5, 'Rounds per timed window.'),
      ('windows', 3, 'Timed windows of each way, alternating.')):
    parser.add_argument(f'--{name}', type=int, default=value, help=text)
  args = parser.parse_args(argv)
  if min(args.runs, args.rounds, args.windows) < 1:
    parser.error('--runs, --rounds and --windows must be at least 1.')
  return args


def benchmark_config(args):
  """A run config of the preset's model, optimizer, augmentation and batch."""
  if args.preset == 'tiny':  # As tests/conftest.tiny_config.
    config = default.get_config()
    config.data.update(image_size=32, channels=1)
    config.model.update(name='resnet18', width=0.125, encoder_output='avgpool')
    config.pretrain.projection_dims = (32, 16)
    config.train.batch_size = 16
  else:
    preset = sweep_config.get_config(f'preset={args.preset}').to_dict()
    config = ml_collections.ConfigDict({k: v for k, v in preset.items()
                                        if k not in ('sweep', 'cam')})
  config.mode = args.mode
  config.model.num_classes = args.num_classes
  config.train.steps_per_dispatch = args.steps_per_dispatch
  return config


def _stack(trees, sharding_=None):
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return stacked if sharding_ is None else jax.device_put(stacked, sharding_)


def _compile(fn, *arguments):
  start = time.perf_counter()
  fn.lower(*arguments).compile()
  return time.perf_counter() - start


def run_benchmark(args):
  load_start = os.getloadavg()
  config = benchmark_config(args)
  mesh = sharding.create_mesh()
  model = state_lib.create_model(config)
  tx = optimizers.create_optimizer(config)
  objective = steps_lib.objective(config, model)
  k = steps_lib.steps_per_dispatch(config)
  runs = range(args.runs)
  # Each run its own seed (state, rows, keys); one data set, run 0's.
  per_run = [steps_lib.example_arguments(config, mesh, k, num_rows=args.rows or None, seed=r)
             for r in runs]
  data = per_run[0][2]
  lone_states = [state_lib.create_train_state(config, model, jax.random.key(r), tx, mesh)
                 for r in runs]
  repl = sharding.replicated_sharding(mesh)
  group_state = _stack(lone_states, repl)  # A copy: the lone steps donate theirs.
  group_args = (_stack([a[0] for a in per_run], repl),
                _stack([a[1] for a in per_run], sharding.data_sharding(mesh, batch_axis=2)),
                data, _stack([a[3] for a in per_run], repl),
                _stack([a[4] for a in per_run], repl))
  lone = steps_lib.make_train_steps(config, objective, mesh)
  group = groups.make_group_steps(config, objective, mesh, compile_cache.CompileCache(), 'b')
  lone_compile_s = _compile(lone, lone_states[0], *per_run[0])
  group_compile_s = _compile(group, group_state, *group_args)

  lone_carry = [(s, a[0]) for s, a in zip(lone_states, per_run)]
  group_carry = (group_state, group_args[0])

  def lone_round():
    for r in runs:
      state, metrics = lone_carry[r]
      lone_carry[r] = lone(state, metrics, *per_run[r][1:])
    return lone_carry

  def group_round():
    nonlocal group_carry
    group_carry = group(*group_carry, *group_args[1:])
    return group_carry

  def window(round_fn, rounds):
    start = time.perf_counter()
    for _ in range(rounds):
      out = round_fn()
    jax.block_until_ready(out)
    return time.perf_counter() - start

  window(lone_round, 1)  # Warm-up.
  window(group_round, 1)
  lone_s, group_s = [], []
  for _ in range(args.windows):  # Alternating: both see the same drift of the load.
    lone_s.append(window(lone_round, args.rounds))
    group_s.append(window(group_round, args.rounds))
  images = args.runs * args.rounds * k * per_run[0][1]['row'].shape[1]
  lone_ips = images / statistics.median(lone_s)
  group_ips = images / statistics.median(group_s)
  return {
      'benchmark': 'group_throughput', 'preset': args.preset, 'mode': config.mode,
      'runs': args.runs, 'model': config.model.name, 'width': config.model.width,
      'image_size': config.data.image_size, 'channels': config.data.channels,
      'batch_size': config.train.batch_size, 'steps_per_dispatch': k,
      'sam': config.pretrain.sam if config.mode == 'pretrain' else config.supervised.sam,
      'platform': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
      'num_devices': jax.device_count(), 'cpu_count': os.cpu_count(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'rounds_per_window': args.rounds, 'windows': args.windows,
      'sequential_images_per_s': lone_ips, 'grouped_images_per_s': group_ips,
      'grouped_speedup': group_ips / lone_ips,
      'sequential_window_s': lone_s, 'grouped_window_s': group_s,
      'sequential_compile_s': lone_compile_s, 'grouped_compile_s': group_compile_s,
      'loadavg_start': list(load_start), 'loadavg_end': list(os.getloadavg()),
  }


def main(argv=None):
  result = run_benchmark(parse_args(argv))
  print(SUMMARY.format(load=result['loadavg_start'][0], load_end=result['loadavg_end'][0],
                       **result))
  return throughput.report(result)


if __name__ == '__main__':
  main()
