r"""Cross-device reductions of one train step: BatchNorm layers and collectives in its HLO.

Compiles the real train steps (`steps.make_train_steps`, as training runs them) over a
mesh of N devices without running it, and counts in the compiled HLO the
collectives XLA's SPMD partitioner inserted (all-reduce, all-gather,
reduce-scatter, collective-permute, all-to-all: ops and the float32 elements they
carry), beside the model's BatchNorm layers. One `jax.jit` over a mesh with the
global batch sharded means BatchNorm statistics over the global batch: their
all-reduces are part of every step. Defaults are the reference's settings
(SimCLR + ASAM, ResNet-50, batch 32, 3 x 128 x 128):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/collectives.py
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/collectives.py \
      --mode=baseline

The last line printed is JSON. See docs/performance.md.
"""

import argparse
import collections
import json
import pathlib
import re
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import kinds  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute',
               'all-to-all')
_SHAPE = re.compile(r'\b(f32|bf16|f16|s32|u32|pred)\[([0-9,]*)\]')


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--mode', default='pretrain', choices=kinds.TRAIN_MODES)
  parser.add_argument('--model', default='resnet50')
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--sam', default='asam', help='pretrain: none | sam | asam.')
  parser.add_argument('--num_devices', type=int, default=None,
                      help='Devices of the mesh (default: all).')
  parser.add_argument('--hlo_out', default=None, help='Also write the compiled HLO here.')
  return parser.parse_args(argv)


def _elements(shape_text):
  """Elements of every array shape in an HLO result type such as '(f32[64], f32[3,3])'."""
  return sum(int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
             for _, dims in _SHAPE.findall(shape_text))


def count_collectives(hlo_text):
  """{op: {'ops', 'elements'}} of the collectives in compiled HLO text."""
  counts = collections.defaultdict(lambda: {'ops': 0, 'elements': 0})
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\(', line)
    if not match:
      continue
    result_type, op = match.groups()
    base = op[:-len('-start')] if op.endswith('-start') else op
    if base in COLLECTIVES and not op.endswith('-done'):
      counts[base]['ops'] += 1
      counts[base]['elements'] += _elements(result_type)
  return dict(counts)


def batchnorm_layers(params_or_stats):
  """BatchNorm layers of a model: the subtrees of its batch_stats holding 'mean'."""
  flat = jax.tree_util.tree_flatten_with_path(params_or_stats)[0]
  return sum(1 for path, _ in flat if getattr(path[-1], 'key', None) == 'mean')


def main(argv=None):
  args = parse_args(argv)
  config = default.get_config()
  config.mode = args.mode
  config.model.name = args.model
  config.data.image_size, config.data.channels = args.image_size, args.channels
  config.train.batch_size = args.batch_size
  config.pretrain.sam = args.sam
  devices = jax.devices()[:args.num_devices]
  mesh = Mesh(np.asarray(devices), ('data',))
  model = state_lib.create_model(config)
  step = steps_lib.make_train_steps(config, steps_lib.objective(config, model), mesh)
  abstract = state_lib.abstract_state(config, mesh)
  arguments = steps_lib.example_arguments(config, mesh, 1, abstract=True)
  start = time.time()
  compiled = step.lower(abstract, *arguments).compile()
  compile_s = time.time() - start
  hlo = compiled.as_text()
  if args.hlo_out:
    pathlib.Path(args.hlo_out).write_text(hlo)
  counts = count_collectives(hlo)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  result = {
      'mode': args.mode, 'model': args.model, 'sam': args.sam if args.mode == 'pretrain' else
      config.supervised.sam, 'joint_views': config.pretrain.joint_views, 'batch_size': args.batch_size,
      'image_size': args.image_size, 'devices': len(devices),
      'batchnorm_layers': batchnorm_layers(abstract.batch_stats),
      'batchnorm_channels': sum(int(np.prod(x.shape)) for x in
                                jax.tree.leaves(abstract.batch_stats)) // 2,
      'parameters': num_params, 'collectives': counts, 'compile_s': round(compile_s, 1),
      'jax': jax.__version__, 'platform': jax.default_backend(),
  }
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
