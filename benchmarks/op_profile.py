r"""Where a train step's time goes, per XLA operation: a jax.profiler trace, summarised.

Builds the step exactly as `benchmarks/throughput.py` does (same flags), compiles it,
runs warm-up steps, then traces `--steps` steps with `jax.profiler.trace` and reads
the trace's per-thunk events (on CPU every compiled operation is one thunk: a
convolution, a product, a fusion of elementwise work or reductions, a copy).
Each thunk is put in a category from the compiled HLO (what its fusion computes):

  conv        convolutions (XLA's own, YNNPACK or Eigen)
  dot         matrix products (the custom CPU kernels' 1x1 convolutions and
              kernel gradients, the heads)
  reduce      fusions with a reduction (BatchNorm statistics, norms, sums)
  copy        copies and transposes (layout changes)
  pool        reduce-window (max pooling) and its gradient's pieces
  elementwise other fusions (BatchNorm and ReLU arithmetic, the optimizer update)
  other       anything else (slices, concatenations, collectives, custom calls)

and prints per step: the wall time of the executable, the thunks' summed busy
time, their number, the busy time per category, and the slowest operations.
The busy time can exceed the wall time where thunks ran side by side; the wall
time beyond the busy time is the executor's own time between thunks.
The last line printed is JSON.

  python benchmarks/op_profile.py --model=resnet18 --width=0.25 \
      --encoder_output=avgpool --image_size=64 --channels=1 --mode=baseline

See docs/performance.md for measured numbers.
"""

import collections
import glob
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

CATEGORIES = ('conv', 'dot', 'reduce', 'copy', 'pool', 'elementwise', 'other')
# The executor's events that are not operations.
_NOT_OPS = re.compile(r'^(ThunkExecutor|ThreadpoolListener|end: |\$|Pjit|CommonPjRt|Handle |'
                      r'Parse|Allocate|Wait |PythonRef|TfrtCpu|Execute|Await)')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+(?: \S+)*? ([a-z][\w\-]*)\(')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')


def parse_hlo(text):
  """{instruction name: category} for the compiled module's instructions."""
  bodies, current, calls, opcodes = {}, None, {}, {}
  for line in text.splitlines():
    header = _COMPUTATION.match(line)  # Computations start at column 0.
    if header and not line[:1].isspace():
      current = header.group(1)
      bodies[current] = []
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      name, opcode = match.groups()
      bodies[current].append(opcode)
      opcodes[name] = opcode
      called = _CALLS.search(line)
      if called:
        calls[name] = called.group(1)

  categories = {}
  for name, opcode in opcodes.items():
    inner = set(bodies.get(calls[name], ())) if name in calls else set()
    categories[name] = categorize(opcode, inner)
  return categories


def categorize(opcode, inner=()):
  """The category of an instruction with `opcode` whose fusion holds the opcodes `inner`."""
  ops = {opcode} | set(inner)
  if 'convolution' in ops:
    return 'conv'
  if 'dot' in ops:
    return 'dot'
  if ops & {'reduce-window', 'select-and-scatter'}:
    return 'pool'
  if 'reduce' in ops:
    return 'reduce'
  if opcode in ('copy', 'transpose') or (opcode == 'fusion' and inner and
                                           inner <= {'copy', 'transpose', 'bitcast',
                                                     'parameter', 'reshape'}):
    return 'copy'
  if opcode == 'fusion':
    return 'elementwise'
  if opcode in ('add', 'multiply', 'subtract', 'divide', 'maximum', 'select', 'compare',
                'exponential', 'log', 'sqrt', 'rsqrt', 'negate', 'convert', 'broadcast'):
    return 'elementwise'
  return 'other'


def thunk_events(trace_dir):
  """The trace's complete ('X') events of operations, and the executable's own events."""
  paths = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'jax.profiler wrote no *.trace.json.gz under {trace_dir}.')
  with gzip.open(sorted(paths)[-1]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  complete = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  ops = [e for e in complete if not _NOT_OPS.match(e['name'])]
  executions = [e for e in complete
                if e['name'].startswith('ThunkExecutor::Execute (wait for completion)')]
  return ops, executions


def base_name(event_name):
  """'fusion.12' -> the HLO instruction name as written in the compiled module."""
  return event_name.split(' ')[0].lstrip('%')


def summarize(ops, executions, categories, steps):
  """Per-step figures and the slowest operations, from the trace's events."""
  busy = collections.Counter()
  count = collections.Counter()
  per_op = collections.Counter()
  unknown = 0
  for event in ops:
    name = base_name(event['name'])
    category = categories.get(name)
    if category is None:
      # Names the HLO does not hold (e.g. ynn_fusion thunks): by their stem.
      stem = re.sub(r'[.\d]+$', '', name)
      category = ('conv' if 'conv' in stem else 'dot' if 'dot' in stem else
                  'elementwise' if 'fusion' in stem else 'other')
      unknown += 1
    busy[category] += event['dur']
    count[category] += 1
    per_op[name, category] += event['dur']
  wall_us = sum(e['dur'] for e in executions)
  total_busy = sum(busy.values())
  return {
      'steps': steps,
      'executable_wall_ms_per_step': wall_us / steps / 1e3,
      'busy_ms_per_step': total_busy / steps / 1e3,
      'thunks_per_step': sum(count.values()) / steps,
      'mean_thunk_us': total_busy / max(1, sum(count.values())),
      'thunks_named_outside_hlo': unknown,
      'categories': {c: {'busy_ms_per_step': busy[c] / steps / 1e3,
                         'share_of_busy': busy[c] / total_busy if total_busy else 0.0,
                         'thunks_per_step': count[c] / steps}
                     for c in CATEGORIES},
      'slowest': [{'op': name, 'category': c, 'ms_per_step': us / steps / 1e3}
                  for (name, c), us in per_op.most_common(15)],
  }


def run_profile(args, trace_dir):
  """Builds, compiles, warms and traces the step of `args`; returns the summary."""
  config, devices, state, arguments, p_train_steps = throughput.build_step(args)
  k = args.steps_per_dispatch
  compiled = p_train_steps.lower(state, *arguments).compile()
  categories = parse_hlo(compiled.as_text())
  state, arguments, _, _ = throughput.time_windows(p_train_steps, state, arguments,
                                                   args.warmup_steps, 1, k)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    state, arguments, seconds, cpu_seconds = throughput.time_windows(
        p_train_steps, state, arguments, args.steps, 1, k)
    traced_seconds = time.perf_counter() - start
  ops, executions = thunk_events(trace_dir)
  summary = summarize(ops, executions, categories, args.steps * k)
  summary.update({
      'benchmark': 'op_profile', 'mode': config.mode, 'model': config.model.name,
      'width': config.model.width, 'image_size': config.data.image_size,
      'channels': config.data.channels, 'batch_size': config.train.batch_size,
      'dtype': config.model.dtype, 'num_devices': len(devices),
      'jax_version': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'step_s_median_traced': statistics.median(seconds),
      'step_cpu_s_median_traced': statistics.median(cpu_seconds),
      'traced_seconds': traced_seconds,
      'loadavg': list(os.getloadavg()),
  })
  return summary


def main(argv=None):
  args = throughput.parse_args(argv, description=__doc__)
  with tempfile.TemporaryDirectory() as trace_dir:
    result = run_profile(args, trace_dir)
  print(f"{result['mode']} {result['model']} x{result['width']} {result['dtype']}, batch "
        f"{result['batch_size']} x {result['channels']} x {result['image_size']}^2, "
        f"{result['steps']} traced steps: {1e3 * result['step_s_median_traced']:.1f} ms/step "
        f"wall (traced), executable {result['executable_wall_ms_per_step']:.1f} ms, "
        f"operations busy {result['busy_ms_per_step']:.1f} ms in "
        f"{result['thunks_per_step']:.0f} thunks (mean {result['mean_thunk_us']:.0f} us)")
  print(f"  {'category':<12} {'ms/step':>8} {'share':>6} {'thunks':>7}")
  for category, row in result['categories'].items():
    print(f"  {category:<12} {row['busy_ms_per_step']:8.2f} {100 * row['share_of_busy']:5.1f}% "
          f"{row['thunks_per_step']:7.0f}")
  print('  slowest operations (ms/step): ' + ', '.join(
      f"{r['op']} ({r['category']}) {r['ms_per_step']:.2f}" for r in result['slowest'][:8]))
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
