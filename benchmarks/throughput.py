r"""Throughput of the jitted train steps: images/s, step time, compile time, memory, FLOP/s.

Builds the real TrainState and steps with `steps.make_train_steps` (the function
training runs: the row gather, the augmentation of uint8 images, the loss and the
optimizer, `--steps_per_dispatch` steps per call), puts a random uint8 data set
of two batches on the devices, compiles, runs warm-up dispatches, then times
windows of `--window` dispatches each with one `block_until_ready` at the end of
every window (no other host synchronisation). Times are per step.
Reports the median step time and its spread (min, max, interquartile range),
images/s of the median, the compile time, the peak memory, and the achieved
FLOP/s from XLA's cost analysis of the compiled step as a fraction of
`--peak_flops`. The last line printed is JSON.

Defaults are the reference's settings (SimCLR + ASAM, ResNet-50, batch 32,
3 x 128 x 128, float32) on this machine's measured matrix-multiply peak:

  python benchmarks/throughput.py                                   # SimCLR + ASAM ResNet-50
  python benchmarks/throughput.py --mode=baseline                   # AdamW supervised ResNet-50
  python benchmarks/throughput.py --model=resnet18                  # SimCLR + ASAM ResNet-18
  python benchmarks/throughput.py --no-joint_views                  # the reference's two calls
  python benchmarks/throughput.py --dtype=bfloat16
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python benchmarks/throughput.py --num_devices=2               # data parallel on 2 CPU devices
  python benchmarks/throughput.py --dtype=bfloat16 --peak_flops=989e12 \
      --warmup_steps=3 --steps=20 --window=5                        # on an H100 (dense bf16 peak)

XLA options are read from the XLA_FLAGS environment variable, as everywhere in
JAX; the JSON records them. See docs/performance.md for measured numbers.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.model import heads  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.model import resnet  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import kinds  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import optimizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# This 2-core machine's measured float32 matrix-multiply peak (see docs/performance.md).
CPU_PEAK_FLOPS = 188e9
_BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def parse_args(argv, description=__doc__):
  parser = argparse.ArgumentParser(
      description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--mode', default='pretrain', choices=kinds.TRAIN_MODES,
                      help='pretrain: SimCLR (two views); finetune/baseline: supervised.')
  parser.add_argument('--model', default='resnet50', choices=sorted(resnet.STAGE_SIZES))
  parser.add_argument('--width', type=float, default=1.0, help='ResNet width multiplier.')
  parser.add_argument('--encoder_output', default='flatten', choices=heads.ENCODER_OUTPUTS)
  parser.add_argument('--batch_size', type=int, default=32,
                      help='Global batch (images, not views).')
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='Compute dtype; parameters and BatchNorm statistics stay float32.')
  parser.add_argument('--num_devices', type=int, default=0,
                      help='Use the first k devices (0: all).')
  parser.add_argument('--joint_views', default=True, action=argparse.BooleanOptionalAction,
                      help='pretrain: both views in one forward pass (BatchNorm over 2N).')
  parser.add_argument('--sam', default=None, choices=('none', 'sam', 'asam'),
                      help='SAM variant (default: the reference, asam for pretrain and '
                      'none for finetune/baseline).')
  parser.add_argument('--steps_per_dispatch', type=int, default=1,
                      help='k: train steps per dispatch (lax.scan when k > 1).')
  parser.add_argument('--warmup_steps', type=int, default=2,
                      help='Untimed steps after compilation.')
  parser.add_argument('--steps', type=int, default=7, help='Timed dispatches.')
  parser.add_argument('--window', type=int, default=1,
                      help='Dispatches per timed window (one block_until_ready per window); '
                      'must divide --steps.')
  parser.add_argument('--peak_flops', type=float, default=CPU_PEAK_FLOPS,
                      help='Peak FLOP/s that the achieved FLOP/s is a fraction of.')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.window < 1 or args.steps % args.window:
    parser.error(f'--window {args.window} must divide --steps {args.steps} (both >= 1).')
  return args


def benchmark_config(args):
  """The default (reference) config with the command line's overrides."""
  config = default.get_config()
  config.mode = args.mode
  config.model.name = args.model
  config.model.width = args.width
  config.model.encoder_output = args.encoder_output
  config.train.batch_size = args.batch_size
  config.data.image_size = args.image_size
  config.data.channels = args.channels
  config.model.dtype = args.dtype
  config.pretrain.joint_views = args.joint_views
  if args.sam is not None:
    if args.mode == 'pretrain':
      config.pretrain.sam = args.sam
    else:
      config.supervised.sam = args.sam
  return config


def peak_memory_bytes(devices):
  """Peak memory in use: the devices' allocator statistics, else the process's max RSS."""
  stats = [d.memory_stats() for d in devices]
  if all(s and 'peak_bytes_in_use' in s for s in stats):
    return sum(s['peak_bytes_in_use'] for s in stats), 'device peak_bytes_in_use'
  # CPU devices keep no statistics; ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process max RSS'


class CompileCounter:
  """Counts XLA backend compilations and their seconds (jax.monitoring events)."""

  def __init__(self):
    self.count, self.seconds = 0, 0.0

  def __call__(self, event, duration_secs, **kwargs):
    del kwargs
    if event == _BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += duration_secs

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def time_windows(p_train_steps, state, arguments, num_windows, window, steps_per_dispatch):
  """Wall and process-CPU seconds per step of each window of `window` dispatches.

  The host waits once, at each window's end. CPU seconds (all threads) tell how
  much work a step was, when other processes share the cores.
  """
  metrics, rest = arguments[0], arguments[1:]
  seconds, cpu_seconds = [], []
  for _ in range(num_windows):
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(window):
      state, metrics = p_train_steps(state, metrics, *rest)
    jax.block_until_ready((state, metrics))
    steps = window * steps_per_dispatch
    seconds.append((time.perf_counter() - start) / steps)
    cpu_seconds.append((time.process_time() - start_cpu) / steps)
  return state, (metrics, *rest), seconds, cpu_seconds


def build_step(args):
  """(config, devices, state, example arguments, jitted train steps) of `args`: the
  real TrainState and `steps.make_train_steps` on a `data` mesh of the devices."""
  config = benchmark_config(args)
  if args.num_devices > len(jax.devices()):
    raise ValueError(
        f'--num_devices={args.num_devices} but only {len(jax.devices())} devices exist; on '
        'CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N.')
  devices = jax.devices()[:args.num_devices or None]
  if config.train.batch_size % len(devices):
    raise ValueError(f'--batch_size={config.train.batch_size} is not divisible by the '
                     f'{len(devices)} devices; pick a multiple.')
  mesh = Mesh(np.asarray(devices), ('data',))

  model = state_lib.create_model(config)
  tx = optimizers.create_optimizer(config)
  state = state_lib.create_train_state(config, model, jax.random.key(config.seed), tx, mesh)
  arguments = steps_lib.example_arguments(config, mesh, args.steps_per_dispatch)
  p_train_steps = steps_lib.make_train_steps(config, steps_lib.objective(config, model), mesh)
  return config, devices, state, arguments, p_train_steps


def run_benchmark(args):
  """Builds, compiles and times the step of `args`; returns the result dictionary."""
  load_start = os.getloadavg()
  config, devices, state, arguments, p_train_steps = build_step(args)
  k = args.steps_per_dispatch

  # Trace, lower and compile once; the jitted steps then reuse this executable.
  with CompileCounter() as compiles:
    start, start_cpu = time.perf_counter(), time.process_time()
    compiled = p_train_steps.lower(state, *arguments).compile()
    compile_seconds = time.perf_counter() - start
    # CPU seconds of this process: less sensitive than wall time to other work.
    compile_cpu_seconds = time.process_time() - start_cpu
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # The compiled module is one device's program; the devices together execute n
  # times its FLOPs (replicated work, such as the optimizer update, counted n times).
  # A dispatch holds k steps.
  flops_per_step = float(cost.get('flops', float('nan'))) * len(devices) / k
  memory_analysis = compiled.memory_analysis()

  with CompileCounter() as recompiles:
    state, arguments, _, _ = time_windows(p_train_steps, state, arguments,
                                          args.warmup_steps, 1, k)
    state, arguments, step_seconds, step_cpu_seconds = time_windows(
        p_train_steps, state, arguments, args.steps // args.window, args.window, k)
  memory_bytes, memory_source = peak_memory_bytes(devices)

  median = statistics.median(step_seconds)
  quartiles = (statistics.quantiles(step_seconds, n=4, method='inclusive')
               if len(step_seconds) > 1 else [median] * 3)
  achieved_flops = flops_per_step / median
  return {
      'benchmark': 'train_step',
      'mode': config.mode,
      'model': config.model.name,
      'width': config.model.width,
      'encoder_output': config.model.encoder_output,
      'batch_size': config.train.batch_size,
      'image_size': config.data.image_size,
      'channels': config.data.channels,
      'dtype': config.model.dtype,
      'joint_views': bool(config.pretrain.joint_views) if config.mode == 'pretrain' else None,
      'sam': config.pretrain.sam if config.mode == 'pretrain' else config.supervised.sam,
      'num_devices': len(devices),
      'device_kind': devices[0].device_kind,
      'platform': devices[0].platform,
      'cpu_count': os.cpu_count(),
      'machine': platform.machine(),
      'jax_version': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'steps_per_dispatch': k,
      'warmup_steps': args.warmup_steps,
      'timed_steps': args.steps,
      'window': args.window,
      'images_per_s': config.train.batch_size / median,
      'step_s_median': median,
      'step_s_min': min(step_seconds),
      'step_s_max': max(step_seconds),
      'step_s_iqr': quartiles[2] - quartiles[0],
      'step_s_windows': step_seconds,
      'step_cpu_s_median': statistics.median(step_cpu_seconds),
      # Work per CPU-second (all threads): comparable across different loads.
      'flops_per_cpu_s': flops_per_step / statistics.median(step_cpu_seconds),
      'compile_s': compile_seconds,
      'compile_cpu_s': compile_cpu_seconds,
      'backend_compile_s': compiles.seconds,
      'compiles_while_stepping': recompiles.count,
      'peak_memory_bytes': memory_bytes,
      'peak_memory_source': memory_source,
      'xla_temp_bytes': getattr(memory_analysis, 'temp_size_in_bytes', None),
      'flops_per_step': flops_per_step,
      'flops_per_image': flops_per_step / config.train.batch_size,
      'achieved_flops': achieved_flops,
      'peak_flops': args.peak_flops,
      'peak_fraction': achieved_flops / args.peak_flops,
      'loadavg_start': list(load_start),
      'loadavg_end': list(os.getloadavg()),
  }


def main(argv=None):
  args = parse_args(argv)
  result = run_benchmark(args)
  for i, seconds in enumerate(result['step_s_windows']):
    print(f'window {i}: {seconds:.3f} s/step')
  print(f"{result['mode']} {result['model']} x{result['width']} {result['dtype']}, "
        f"batch {result['batch_size']} x {result['channels']} x {result['image_size']}^2, "
        f"sam {result['sam']}, joint_views {result['joint_views']}, "
        f"{result['num_devices']} {result['platform']} device(s)")
  print(f"  {result['images_per_s']:.2f} images/s; step {result['step_s_median']:.3f} s "
        f"(min {result['step_s_min']:.3f}, max {result['step_s_max']:.3f}, "
        f"IQR {result['step_s_iqr']:.3f}); compile {result['compile_s']:.1f} s; "
        f"recompilations {result['compiles_while_stepping']}")
  print(f"  peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB "
        f"({result['peak_memory_source']}); "
        f"{result['flops_per_image'] / 1e9:.1f} GFLOP/image; "
        f"{result['achieved_flops'] / 1e9:.1f} GFLOP/s = "
        f"{100 * result['peak_fraction']:.1f} % of {result['peak_flops'] / 1e9:.0f} GFLOP/s; "
        f"load {result['loadavg_start'][0]:.1f} -> {result['loadavg_end'][0]:.1f}")
  return report(result)


def report(result):
  """Prints the result as one JSON line, the line scripts parse, and returns it."""
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
