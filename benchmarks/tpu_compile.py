r"""Compiles the study's programs for Cloud TPU chips on a machine without one.

With `libtpu` installed (benchmarks/requirements-tpu.txt, in a venv of its own),
`jax.experimental.topologies.get_topology_desc` describes the chips of a TPU slice
(e.g. 'v5e:2x2', four TPU v5 lite chips); a `Mesh` over those devices and
`jax.jit(...).lower(ShapeDtypeStructs with NamedShardings).compile()` give the
real TPU executable, whose `memory_analysis()` and `cost_analysis()` tell per-chip
memory and XLA's FLOP count without running anything. For each program of the
preset (the scanned pretraining steps, SimCLR + ASAM; the scanned supervised
steps, AdamW; embedding and logits inference; the kNN monitor's top-k merge;
Grad-CAM) it prints the per-chip memory (arguments, outputs, temporaries,
generated code) against the chip's HBM, the FLOPs per step (or per batch), the
predicted step time and images/s at the chip's bf16 peak and at `--utilisation`
of it, and from those the predicted wall time of a pretraining and of the whole
`full` study (every run of its plan). It also checks each program: no host
callback (send/recv, infeed/outfeed, Python callback custom calls), and none of
simclr_jax/model/cpu_kernels.py's CPU-only forms (their `cpu_kernels` name scope)
in the TPU program. The last line printed is JSON.

  pip install -r requirements.txt -r benchmarks/requirements-tpu.txt   # in its own venv
  python benchmarks/tpu_compile.py --preset=tiny                        # under a minute
  python benchmarks/tpu_compile.py --preset=full --topology=v5e:2x2 --programs=pretrain
  python benchmarks/tpu_compile.py --preset=full --topology=v5e:2x4 --dtype=bfloat16

libtpu prints warnings about the missing TPU host (and `cloud_tpu_init`); they are
harmless here. FLOPs are XLA's count of the SPMD program of one chip. A TPU
computes float32 matrix products at default precision as one bfloat16 pass, so
the bf16 peak is the peak of both dtypes (docs/performance.md).
"""

import argparse
import functools
import json
import math
import os
import pathlib
import platform
import re
import sys
import time

# Compiling touches no TPU: let several such processes (a test beside a long
# compile) load libtpu, whose lock file otherwise admits one.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import throughput
from configs import default
from configs import sweep as sweep_config
from simclr_jax.data import augment
from simclr_jax.data import batches
from simclr_jax.explain import gradcam
from simclr_jax.metrics import neighbours
from simclr_jax.parallel import sharding
from simclr_jax.train import state as state_lib
from simclr_jax.train import steps as steps_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

# Per chip: HBM bytes and dense bfloat16 peak FLOP/s (Cloud TPU documentation).
CHIPS = {
    'v4': {'hbm_bytes': 32 * 2**30, 'peak_flops': 275e12},
    'v5e': {'hbm_bytes': 16 * 2**30, 'peak_flops': 197e12},
    'v5p': {'hbm_bytes': 95 * 2**30, 'peak_flops': 459e12},
    'v6e': {'hbm_bytes': 32 * 2**30, 'peak_flops': 918e12},
}
PROGRAMS = ('pretrain', 'supervised', 'embed', 'logits', 'knn', 'gradcam', 'group_pretrain',
            'group_supervised')
# Not compiled unless asked (--programs): a group's program takes R times as long.
DEFAULT_PROGRAMS = PROGRAMS[:6]
# The Kaggle data set: images, and subjects per class (/work/shared/data/README.md).
KAGGLE_SUBJECTS = {'Mild_Demented': 28, 'Moderate_Demented': 2, 'Non_Demented': 100,
                   'Very_Mild_Demented': 70}
SLICES_PER_SUBJECT = 32
# What marks a host round trip in a compiled TPU program.
HOST_PATTERNS = (r'\bsend\(', r'\brecv\(', r'\bsend-done\(', r'\brecv-done\(',
                 r'\binfeed\(', r'\boutfeed\(', r'is_host_transfer=true',
                 r'custom_call_target="[^"]*callback[^"]*"')


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', default='full', choices=('tiny', 'full'),
                      help='full: configs/sweep.py:preset=full (ResNet-50, 128 px); tiny: '
                      'a ResNet-18 at 1/8 width, 32 px, 1 channel (compiles in seconds).')
  parser.add_argument('--topology', default='v5e:2x2',
                      help='TPU slice, e.g. v5e:2x2, v5e:2x4, v4:2x2x1, v5p:2x2x1.')
  parser.add_argument('--programs', default=','.join(DEFAULT_PROGRAMS),
                      help=f'Comma-separated subset of {PROGRAMS}; the group_ programs are '
                      'the sweep\'s grouped runs (--group_runs of them in one program).')
  parser.add_argument('--group_runs', type=int, default=10,
                      help='Runs of a group_ program (the sweep\'s group: a cell\'s 5 folds '
                      'x 2 arms, or a protocol\'s 5 pretrainings with --group_runs=5).')
  parser.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                      help='Compute dtype (default: the preset\'s; its auto is bfloat16 on TPUs).')
  parser.add_argument('--batch_size', type=int, default=None,
                      help='Global batch (default: the preset\'s).')
  parser.add_argument('--steps_per_dispatch', type=int, default=16,
                      help='k, the scanned steps of one dispatch (the TPU default).')
  parser.add_argument('--utilisation', type=float, default=0.3,
                      help='Share of the bf16 peak assumed for the predicted times '
                      '(docs/performance.md says why 0.3).')
  return parser.parse_args(argv)


def chip_of(topology):
  name = topology.split(':')[0]
  if name not in CHIPS:
    raise ValueError(f'Unknown TPU generation in --topology={topology}; use one of '
                     f'{sorted(CHIPS)} (e.g. v5e:2x2).')
  return name, CHIPS[name]


def preset_config(preset, mode, dtype=None, batch_size=None):
  """The run config of `mode` (pretrain | baseline) under the preset."""
  if preset == 'full':
    config = sweep_config.get_config('preset=full')
  else:
    config = default.get_config()
    config.data.update(image_size=32, channels=1)
    config.model.update(name='resnet18', width=0.125, encoder_output='avgpool')
    config.pretrain.projection_dims = (32, 16)
    config.train.batch_size = config.eval.batch_size = 32
  config.mode = mode
  if dtype:
    config.model.dtype = dtype
  elif config.model.dtype == 'auto':
    # What 'auto' means on a TPU; heads.compute_dtype would read this CPU's backend.
    config.model.dtype = 'bfloat16'
  if batch_size:
    config.train.batch_size = batch_size
  return config


def tpu_mesh(topology):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(topology_name=topology, platform='tpu').devices
  return Mesh(np.asarray(devices), ('data',))


def data_rows(preset, config):
  """Rows of the data set on the devices: the Kaggle set's 6,400 (full), or two batches."""
  return (sum(KAGGLE_SUBJECTS.values()) * SLICES_PER_SUBJECT if preset == 'full'
          else 2 * config.train.batch_size)


def _like(x, s):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)


def train_program(preset, config, mesh, k):
  """(jitted scanned steps, abstract arguments, images per step) of the config's mode."""
  model = state_lib.create_model(config)
  state = state_lib.abstract_state(config, mesh)
  arguments = steps_lib.example_arguments(config, mesh, k, num_rows=data_rows(preset, config),
                                          abstract=True)
  fn = steps_lib.make_train_steps(config, steps_lib.objective(config, model), mesh)
  return fn, (state, *arguments), config.train.batch_size


def group_program(preset, config, devices, k, num_runs):
  """(jitted group steps, abstract arguments, images per step, mesh) of `num_runs` runs.

  The sweep's grouped program (`groups.make_group_steps`): the scanned steps under
  `vmap` over a leading run axis, on a (`run`, `data`) mesh of the chips with as
  many along `run` as divide both the chips and the runs (`sharding.run_devices`).
  """
  from simclr_jax.train import compile_cache  # pylint: disable=g-import-not-at-top
  from simclr_jax.train import groups  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  runs = sharding.run_devices(num_runs, num_devices=len(devices))
  mesh = sharding.create_mesh(runs, devices)
  model = state_lib.create_model(config)
  state = state_lib.abstract_state(config, mesh)
  metrics, inputs, data, rngs, values = steps_lib.example_arguments(
      config, mesh, k, num_rows=data_rows(preset, config), abstract=True)

  def stacked(x):  # [R, ...], the run axis over `run` where the mesh has one.
    spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
    return jax.ShapeDtypeStruct((num_runs, *x.shape), x.dtype, sharding=NamedSharding(
        mesh, P('run' if runs > 1 else None, *spec)))

  arguments = (*jax.tree.map(stacked, (state, metrics, inputs)), data,
               *jax.tree.map(stacked, (rngs, values)))
  fn = groups.make_group_steps(config, steps_lib.objective(config, model), mesh,
                               compile_cache.CompileCache(), 'tpu', spread=runs > 1)
  return fn, arguments, num_runs * config.train.batch_size, mesh


def infer_program(preset, config, mesh, method):
  """Inference over rows of the data set on the devices, as a run evaluates."""
  state = state_lib.abstract_state(config, mesh)
  repl, rows = sharding.replicated_sharding(mesh), sharding.data_sharding(mesh)
  size, batch = config.data.image_size, config.eval.batch_size
  data = {'images': _like(np.zeros((data_rows(preset, config), size, size, 1), np.uint8), repl),
          'labels': _like(np.zeros(data_rows(preset, config), np.int32), repl)}
  inputs = {'row': _like(np.zeros(batch, np.int32), rows)}

  def infer(state, data, inputs):
    images, _ = batches.DeviceDataset.images(data, inputs)
    images = augment.model_input(images, config.data.image_size, config.data.channels)
    if method == 'embed':
      return state.apply_fn(state_lib.variables(state), images, method='embed')
    return state.apply_fn(state_lib.variables(state), images, train=False)

  fn = jax.jit(infer, out_shardings=rows)
  return fn, (state, data, inputs), batch


def knn_program(config, mesh, embedding_dims, block=1024):
  """One block of the kNN monitor's search: the running top-k merged with a key block."""
  repl = sharding.replicated_sharding(mesh)
  k = max(config.eval.knn_k)
  f32, i32 = np.float32, np.int32
  arrays = (np.zeros((block, k), f32), np.zeros((block, k), i32),
            np.zeros((block, embedding_dims), f32), np.zeros((block, embedding_dims), f32),
            *[np.zeros(block, i32)] * 5)
  fn = functools.partial(neighbours._merge_top_k, k=k, metric='cosine')  # pylint: disable=protected-access
  return jax.jit(fn), tuple(_like(a, repl) for a in arrays), block


def gradcam_program(config, mesh):
  """Grad-CAM of a batch of the classifier (the explained model of the study)."""
  model = state_lib.create_model(config)
  state = state_lib.abstract_state(config, mesh)
  variables = state_lib.variables(state)
  rows = sharding.data_sharding(mesh)
  batch = config.train.batch_size
  images = jax.ShapeDtypeStruct(
      (batch, config.data.image_size, config.data.image_size, config.data.channels),
                                jnp.float32, sharding=rows)
  class_index = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
  # The study's grid: Grad-CAM of the last stage (stage2 at the tiny preset's 32 px).
  layer = 'stage4' if config.data.image_size >= 64 else 'stage2'
  fn = functools.partial(gradcam._cam, model, method='gradcam', layer=layer)  # pylint: disable=protected-access
  return jax.jit(lambda v, x, c: fn(v, x, c, None)), (variables, images, class_index), batch


def check_program(lowered, compiled):
  """Host round trips and CPU-only kernels found in a lowered and compiled program."""
  hlo = compiled.as_text()
  stablehlo = lowered.as_text(debug_info=True)
  host = sorted({m for p in HOST_PATTERNS for m in re.findall(p, hlo)})
  host += sorted(set(re.findall(r'@[\w.]*callback\w*', lowered.as_text())))
  return {'host_callbacks': host,
          # The name scope of cpu_kernels' CPU-only forms ('cpu_kernels/...' in op names).
          'cpu_kernels': stablehlo.count('cpu_kernels/'),
          'select_and_scatter': stablehlo.count('stablehlo.select_and_scatter')}


def compile_program(name, fn, arguments, images, num_devices, chip, devices_per_chip=1):
  """Lowers and compiles one program; its memory, FLOPs and checks.

  The program is one device's; a chip of several devices (a v4 chip's two
  TensorCores, as the compile-only topology lists them) runs it once per device.
  """
  start = time.perf_counter()
  with throughput.CompileCounter() as compiles:
    lowered = fn.lower(*arguments)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA's count of one chip's SPMD program. HloCostAnalysis counts a while loop's
  # body once, so a dispatch of k scanned steps counts one step (measured: the tiny
  # preset's k = 1, 2 and 8 programs count the same FLOPs within 4).
  device_flops = float(cost.get('flops', float('nan')))
  chip_flops = device_flops * devices_per_chip
  memory_bytes = {key: devices_per_chip * value for key, value in {
      'argument': memory.argument_size_in_bytes,
      'output': memory.output_size_in_bytes,
      'alias': memory.alias_size_in_bytes,
      'temp': memory.temp_size_in_bytes,
      'code': memory.generated_code_size_in_bytes,
  }.items()}
  # Donated (aliased) outputs reuse their arguments' buffers.
  total = (memory_bytes['argument'] + memory_bytes['output'] - memory_bytes['alias']
           + memory_bytes['temp'] + memory_bytes['code'])
  step_s_peak = chip_flops / chip['peak_flops']
  return {
      'program': name,
      'compile_s': seconds,
      'lower_s': lower_s,
      'backend_compile_s': compiles.seconds,
      'memory_bytes_per_chip': memory_bytes,
      'memory_total_bytes_per_chip': total,
      'hbm_share': total / chip['hbm_bytes'],
      'hbm_headroom_bytes': chip['hbm_bytes'] - total,
      'flops_per_step_per_chip': chip_flops,
      'flops_per_step': device_flops * num_devices,
      'images_per_step': images,
      'flops_per_image': device_flops * num_devices / images,
      'step_s_at_peak': step_s_peak,
      **check_program(lowered, compiled),
  }


def fake_kaggle_arrays():
  """The Kaggle set's labels and subjects, without its pixels, for the study's plan."""
  from simclr_jax.data import arrays as arrays_lib  # pylint: disable=g-import-not-at-top
  names = sorted(KAGGLE_SUBJECTS)
  labels = np.repeat(np.arange(len(names)), [KAGGLE_SUBJECTS[n] * SLICES_PER_SUBJECT
                                             for n in names]).astype(np.int32)
  n = len(labels)
  subject_ids = np.arange(n, dtype=np.int64) // SLICES_PER_SUBJECT
  return arrays_lib.DatasetArrays(
      images=np.zeros((n, 1, 1, 1), np.uint8), labels=labels,
      subject_ids=subject_ids, slice_index=np.tile(np.arange(SLICES_PER_SUBJECT, dtype=np.int32), n // SLICES_PER_SUBJECT),
      file_names=np.asarray([f'{i}.jpg' for i in range(n)]), class_names=names)


def study_work(batch_size=None):
  """Train steps and images inferred of every run of the `full` study's plan.

  Returns:
    {'pretrain_steps', 'supervised_steps', 'embedded_images', 'inferred_images',
     'runs'}: the sums over the plan's runs. A pretraining embeds its train and
     selection rows at each validation (the kNN monitor); a supervised run infers
     its selection rows at each validation and its test rows once.
  """
  from simclr_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  from simclr_jax.study import plan  # pylint: disable=g-import-not-at-top
  config = sweep_config.get_config('preset=full')
  if batch_size:
    config.train.batch_size = batch_size
  arrays = fake_kaggle_arrays()
  work = {'pretrain_steps': 0, 'supervised_steps': 0, 'embedded_images': 0,
          'inferred_images': 0, 'runs': 0}
  for run in plan.plan_runs(config, '/nonexistent', arrays):
    if run.config is None:
      continue
    splits = plan.protocol_splits(config, run.protocol, arrays, run.fold)
    evals = run.config.train.num_epochs // run.config.eval.every_epochs
    selection = len(splits[run.config.eval.selection_split])
    work['runs'] += 1
    if run.arm == 'pretrain':
      n = len(splits_lib.pretrain_indices(splits, run.config.split.include_test_in_pretrain))
      work['pretrain_steps'] += run.config.train.num_epochs * batches.steps_per_epoch(
          n, config.train.batch_size)
      work['embedded_images'] += evals * (len(splits['train']) + selection)
    else:
      n = batches.train_batch_size(run.num_labeled, config.train.batch_size)
      work['supervised_steps'] += run.config.train.num_epochs * batches.steps_per_epoch(
          run.num_labeled, n)
      work['inferred_images'] += evals * selection + len(splits['test'])
  return work


def predictions(results, config, utilisation):
  """Predicted wall times from the programs' FLOPs at the peak and at `utilisation`."""
  by_name = {r['program']: r for r in results}
  peak = {}
  if 'pretrain' in by_name:
    # The reference's pretraining: 100 epochs of all 6,400 images.
    steps = 100 * batches.steps_per_epoch(
        sum(KAGGLE_SUBJECTS.values()) * SLICES_PER_SUBJECT, config.train.batch_size)
    peak['pretrain_100_epochs_s'] = steps * by_name['pretrain']['step_s_at_peak']
    peak['pretrain_100_epochs_steps'] = steps
  needed = {'pretrain', 'supervised', 'embed', 'logits'}
  if needed <= set(by_name):
    work = study_work(config.train.batch_size)
    per_image = lambda name: by_name[name]['step_s_at_peak'] / by_name[name]['images_per_step']
    peak['study_s'] = (work['pretrain_steps'] * by_name['pretrain']['step_s_at_peak']
                       + work['supervised_steps'] * by_name['supervised']['step_s_at_peak']
                       + work['embedded_images'] * per_image('embed')
                       + work['inferred_images'] * per_image('logits'))
    peak['study_work'] = work
  out = {}
  for key, value in peak.items():
    out[key] = value
    if key.endswith('_s'):
      out[f'{key}_at_{utilisation:g}'] = value / utilisation
  return out


def run_check(args):
  chip_name, chip = chip_of(args.topology)
  mesh = tpu_mesh(args.topology)
  num_devices = mesh.devices.size
  num_chips = len({tuple(d.coords) for d in mesh.devices.flat})
  devices_per_chip = num_devices // num_chips
  programs = [p for p in args.programs.split(',') if p]
  unknown = set(programs) - set(PROGRAMS)
  if unknown:
    raise ValueError(f'Unknown programs {sorted(unknown)}; use a subset of {PROGRAMS}.')
  pretrain = preset_config(args.preset, 'pretrain', args.dtype, args.batch_size)
  supervised = preset_config(args.preset, 'baseline', args.dtype, args.batch_size)
  if pretrain.train.batch_size % num_devices:
    raise ValueError(f'The global batch {pretrain.train.batch_size} does not split over '
                     f'{num_devices} chips; pass --batch_size=N with N a multiple.')
  k = args.steps_per_dispatch
  results = []
  for name in programs:
    if name in ('pretrain', 'supervised'):
      config = pretrain if name == 'pretrain' else supervised
      fn, arguments, images = train_program(args.preset, config, mesh, k)
    elif name in ('embed', 'logits'):
      config = pretrain if name == 'embed' else supervised
      fn, arguments, images = infer_program(args.preset, config, mesh, name)
    elif name == 'knn':
      fn, arguments, images = knn_program(pretrain, mesh, embedding_dims(pretrain))
    elif name.startswith('group_'):
      config = pretrain if name == 'group_pretrain' else supervised
      fn, arguments, images, group_mesh = group_program(
          args.preset, config, list(mesh.devices.flat), k, args.group_runs)
      name = f'{name} ({args.group_runs} runs, mesh {dict(group_mesh.shape)})'
    else:
      fn, arguments, images = gradcam_program(supervised, mesh)
    result = compile_program(name, fn, arguments, images, num_devices, chip, devices_per_chip)
    # A train step differentiates the stem's max pooling: lax's gradient is a
    # select_and_scatter, cpu_kernels' CPU form has none.
    result['cpu_kernels_used'] = bool(result['cpu_kernels']) or (
        name.startswith(('pretrain', 'supervised', 'group_')) and not result['select_and_scatter'])
    result['step_s_at_utilisation'] = result['step_s_at_peak'] / args.utilisation
    result['images_per_s_at_peak'] = result['images_per_step'] / result['step_s_at_peak']
    result['images_per_s_at_utilisation'] = result['images_per_s_at_peak'] * args.utilisation
    results.append(result)
    print_result(result, chip)
  return {
      'benchmark': 'tpu_compile',
      'preset': args.preset,
      'topology': args.topology,
      'chip': chip_name,
      'device_kind': mesh.devices.flat[0].device_kind,
      'num_chips': num_chips,
      'num_devices': num_devices,
      'hbm_bytes_per_chip': chip['hbm_bytes'],
      'peak_flops_per_chip': chip['peak_flops'],
      'utilisation': args.utilisation,
      'model': pretrain.model.name,
      'image_size': pretrain.data.image_size,
      'channels': pretrain.data.channels,
      'dtype': pretrain.model.dtype,
      'batch_size': pretrain.train.batch_size,
      'steps_per_dispatch': k,
      'jax_version': jax.__version__,
      'host_cpu': platform.processor() or platform.machine(),
      'cpu_count': os.cpu_count(),
      'programs': results,
      'predicted': predictions(results, pretrain, args.utilisation),
  }


def embedding_dims(config):
  """Width of the embedding the kNN monitor compares (the encoder output h)."""
  model = state_lib.create_model(config)
  x = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size,
                            config.data.channels), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(0)},
      jnp.zeros(x.shape, x.dtype), train=False))
  out = jax.eval_shape(lambda v, x: model.apply(v, x, method='embed'), variables, x)
  return math.prod(out.shape[1:])


def print_result(r, chip):
  gib = lambda b: b / 2**30
  m = r['memory_bytes_per_chip']
  print(f"{r['program']}: compiled in {r['compile_s']:.1f} s; per chip "
        f"{gib(m['argument']):.2f} GiB arguments, {gib(m['output']):.2f} outputs "
        f"({gib(m['alias']):.2f} aliased), {gib(m['temp']):.2f} temporaries, "
        f"{gib(m['code']):.3f} code = {gib(r['memory_total_bytes_per_chip']):.2f} of "
        f"{gib(chip['hbm_bytes']):.0f} GiB HBM ({100 * r['hbm_share']:.1f} %); "
        f"{r['flops_per_step'] / 1e9:.2f} GFLOP per step "
        f"({r['flops_per_image'] / 1e9:.2f} GFLOP per image); "
        f"{1e3 * r['step_s_at_peak']:.2f} ms at peak, {r['images_per_s_at_peak']:.0f} images/s; "
        f"host callbacks {r['host_callbacks'] or 'none'}; "
        f"CPU kernels {'USED' if r['cpu_kernels_used'] else 'not used'}")


def main(argv=None):
  args = parse_args(argv)
  result = run_check(args)
  for key, value in result['predicted'].items():
    if key.endswith('_s') or '_s_at_' in key:
      print(f'predicted {key}: {value / 60:.1f} min')
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
