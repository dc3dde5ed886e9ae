r"""The accelerator check in one call: step, dispatch and inference speed, then the reference baseline.

One Python process, free of TensorFlow (the steps' core imports none; nothing here
imports tensorflow, tensorflow_datasets or clu's writers), for a lent GPU machine
with its own JAX (0.11, CUDA 13) as well as the pinned JAX 0.10.2. Within
`--budget_s` seconds, in priority order, skipping what its estimate says would not
finish:

1. the scanned SimCLR + ASAM ResNet-50 step (`full` preset: 128 px, 3 channels,
   flatten head) in bfloat16 and float32 at global batch 32 and 256;
2. the scanned AdamW (supervised) step likewise;
3. k = 1 against k = 16 steps per dispatch (SimCLR + ASAM, bfloat16, batch 32);
4. embedding inference (bfloat16 and float32, batch 256);
5. with the time left, the `full` baseline under the reference protocol from the
   Kaggle zip (`--dataset`; read with zipfile + PIL, a stratified random 80/20
   slice split, AdamW, the reference's crop, no class weights, bfloat16 unless
   --reference_dtype), epoch after epoch, with its test accuracy per epoch.

Steps are timed by benchmarks/throughput.py's `run_benchmark` (the jitted
`steps.make_train_steps` training runs). Writes at most 6 files to `--out`, one
JSON line per result: check.jsonl (the machine, then a summary), steps.jsonl,
inference.jsonl, reference_baseline.jsonl, skipped.jsonl (what was skipped or
failed, and why). Exits non-zero when something failed.

  python benchmarks/device_check.py --out=$OUT --budget_s=540 \
      --dataset=.data/alzheimer-mri-dataset.zip               # on the GPU (docs/performance.md)
  python benchmarks/device_check.py --out=/tmp/check --smoke   # tiny model, seconds, on CPU
"""

import argparse
import importlib.metadata
import io
import json
import os
import pathlib
import platform
import sys
import time
import types
import zipfile

import jax
import jaxlib
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import throughput
from configs import sweep as sweep_config
from simclr_jax.data import augment
from simclr_jax.data import batches
from simclr_jax.parallel import sharding
from simclr_jax.train import evaluators
from simclr_jax.train import optimizers
from simclr_jax.train import state as state_lib
from simclr_jax.train import steps as steps_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

# Dense bfloat16 peak FLOP/s per device by device kind; float32 matrix products
# run as TF32 on these GPUs, at half of it.
BF16_PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}
CLASS_NAMES = ('Mild_Demented', 'Moderate_Demented', 'Non_Demented', 'Very_Mild_Demented')
FILES = ('check.jsonl', 'steps.jsonl', 'inference.jsonl', 'reference_baseline.jsonl',
         'skipped.jsonl')


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='Folder for the JSON-lines files.')
  parser.add_argument('--budget_s', type=float, default=540.0,
                      help='Wall seconds for everything; items that would not finish are skipped.')
  parser.add_argument('--dataset', default=None,
                      help='The Kaggle zip (alzheimer-mri-dataset.zip) for the reference baseline.')
  parser.add_argument('--smoke', action='store_true',
                      help='A tiny ResNet-18 at 32 px, small batches, one epoch: seconds on a CPU.')
  parser.add_argument('--compile_guess_s', type=float, default=None,
                      help='Compile seconds assumed before any is measured (default 120; smoke 15).')
  parser.add_argument('--max_epochs', type=int, default=100,
                      help='Epochs of the reference baseline at most (the reference: 100).')
  parser.add_argument('--reference_dtype', default='bfloat16', choices=('float32', 'bfloat16'),
                      help='Compute dtype of the reference baseline (the reference: float32).')
  return parser.parse_args(argv)


def peak_flops(device, dtype):
  """The device's dense peak for `dtype`, or the CPU figure of throughput.py."""
  for name, peak in BF16_PEAK_FLOPS.items():
    if name in device.device_kind:
      return peak if dtype == 'bfloat16' else peak / 2
  return throughput.CPU_PEAK_FLOPS


class Check:
  """The budget, the output files and the estimates of what is left."""

  def __init__(self, args):
    self.args, self.start = args, time.perf_counter()
    self.out = pathlib.Path(args.out)
    self.out.mkdir(parents=True, exist_ok=True)
    self.compile_s = {}  # mode -> the longest compile measured.
    self.step_s = {}  # (mode, dtype) -> seconds per image of a measured step.
    self.failed = 0
    self.guess = args.compile_guess_s or (15.0 if args.smoke else 120.0)

  def left(self):
    return self.args.budget_s - (time.perf_counter() - self.start)

  def write(self, name, record):
    with open(self.out / name, 'a') as f:
      f.write(json.dumps(record) + '\n')
    print(json.dumps(record)[:600], flush=True)

  def attempt(self, name, estimate_s, fn):
    """Runs fn() if `estimate_s` fits the budget left; records a skip or failure otherwise."""
    if estimate_s > self.left():
      self.write('skipped.jsonl', {'item': name, 'skipped': 'budget',
                                   'estimate_s': estimate_s, 'left_s': self.left()})
      return None
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      # One item's failure (e.g. memory) must not hide the others' results.
      self.failed += 1
      self.write('skipped.jsonl', {'item': name, 'failed': f'{type(e).__name__}: {e}'[:2000]})
      return None

  def step_estimate(self, mode, dtype, batch, steps):
    per_image = self.step_s.get((mode, dtype)) or max(self.step_s.values(), default=None)
    run = steps * batch * per_image if per_image else (5.0 if self.args.smoke else 30.0)
    return self.compile_s.get(mode, self.guess) + run


def model_flags(args):
  if args.smoke:
    return ['--model=resnet18', '--width=0.125', '--image_size=32', '--channels=1',
            '--encoder_output=avgpool']
  return []  # throughput.py's defaults are the `full` preset's model and images.


def step_items(args):
  """(name, mode, dtype, batch, k) of the step items in priority order."""
  if args.smoke:  # One of each kind: seconds, not minutes, of compilation.
    return [('pretrain bfloat16 batch 8 k 2', 'pretrain', 'bfloat16', 8, 2),
            ('baseline float32 batch 8 k 2', 'baseline', 'float32', 8, 2),
            ('pretrain bfloat16 batch 8 k 1', 'pretrain', 'bfloat16', 8, 1)]
  small, large, k = 32, 256, 16
  items = []
  for mode in ('pretrain', 'baseline'):
    for batch in (small, large):
      for dtype in ('bfloat16', 'float32'):
        items.append((f'{mode} {dtype} batch {batch} k {k}', mode, dtype, batch, k))
  items.append((f'pretrain bfloat16 batch {small} k 1', 'pretrain', 'bfloat16', small, 1))
  return items


def run_step(check, device, name, mode, dtype, batch, k):
  flags = model_flags(check.args) + [
      f'--mode={mode}', f'--dtype={dtype}', f'--batch_size={batch}',
      f'--steps_per_dispatch={k}', f'--peak_flops={peak_flops(device, dtype)}']
  # About 100 timed steps in windows of several dispatches (one wait per window).
  dispatches = max(1, (2 if check.args.smoke else 96) // k)
  window = dispatches if dispatches < 4 else 4
  dispatches = dispatches // window * window
  flags += ['--warmup_steps=1', f'--steps={dispatches}', f'--window={window}']
  estimate = check.step_estimate(mode, dtype, batch, (dispatches + 1) * k)

  def run():
    result = throughput.run_benchmark(throughput.parse_args(flags))
    result['item'] = name
    check.compile_s[mode] = max(check.compile_s.get(mode, 0.0), result['compile_s'])
    check.step_s[mode, dtype] = result['step_s_median'] / batch
    check.write('steps.jsonl', result)
    return result

  return check.attempt(name, estimate, run)


def preset_config(args, mode, dtype):
  """The `full` preset's run config (the tiny model with --smoke)."""
  config = sweep_config.get_config('preset=full')
  config.mode, config.model.dtype = mode, dtype
  if args.smoke:
    config.data.update(image_size=32, channels=1)
    config.model.update(name='resnet18', width=0.125, encoder_output='avgpool')
    config.train.batch_size, config.eval.batch_size = 8, 16
  return config


def run_inference(check, device, dtype):
  """Embedding inference of random uint8 images gathered on the devices, images/s."""
  config = preset_config(check.args, 'pretrain', dtype)
  batch = 16 if check.args.smoke else 256
  mesh = sharding.create_mesh()
  model = state_lib.create_model(config)
  tx = optimizers.create_optimizer(config)
  state = state_lib.create_train_state(config, model, jax.random.key(0), tx, mesh)
  rng = np.random.default_rng(0)
  data = sharding.replicate_tree(
      {'images': rng.integers(0, 256, (batch, config.data.image_size,
                                       config.data.image_size, 1), np.uint8),
       'labels': np.zeros(batch, np.int32)}, mesh)
  inputs = sharding.to_global({'row': np.arange(batch, dtype=np.int32)},
                              sharding.data_sharding(mesh))

  def embed(state, data, inputs):
    images, _ = batches.DeviceDataset.images(data, inputs)
    images = augment.model_input(images, config.data.image_size, config.data.channels)
    return state.apply_fn(state_lib.variables(state), images, method='embed')

  step = jax.jit(embed, out_shardings=sharding.data_sharding(mesh))
  start = time.perf_counter()
  compiled = step.lower(state, data, inputs).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(state, data, inputs))
  repeats = 3 if check.args.smoke else 20
  start = time.perf_counter()
  for _ in range(repeats):
    out = compiled(state, data, inputs)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / repeats
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) * len(mesh.devices.flat)
  record = {'item': f'embed {dtype} batch {batch}', 'model': config.model.name, 'dtype': dtype,
            'batch_size': batch, 'image_size': config.data.image_size, 'compile_s': compile_s,
            'batch_s': seconds, 'images_per_s': batch / seconds,
            'embedding_dims': int(np.prod(out.shape[1:])), 'flops_per_image': flops / batch,
            'peak_fraction': flops / seconds / peak_flops(device, dtype)}
  check.write('inference.jsonl', record)
  return record


def read_kaggle_zip(path):
  """The Kaggle zip's images and labels without TensorFlow: zipfile + PIL + numpy.

  Returns:
    (uint8 [N, 128, 128, 1] images, int32 [N] labels indexing CLASS_NAMES), in the
    zip's sorted file order.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path) as archive:
    names = sorted(n for n in archive.namelist() if n.lower().endswith(('.jpg', '.jpeg'))
                   and n.split('/')[-2] in CLASS_NAMES)
    if not names:
      raise ValueError(f'No JPG in a class folder ({", ".join(CLASS_NAMES)}) of {path}; '
                       'pass the Kaggle zip as --dataset.')
    images, labels = [], []
    for name in names:
      with Image.open(io.BytesIO(archive.read(name))) as image:
        image = image.convert('L')
        if image.size != (128, 128):
          image = image.resize((128, 128), Image.BILINEAR)
        images.append(np.asarray(image, np.uint8))
      labels.append(CLASS_NAMES.index(name.split('/')[-2]))
  return np.stack(images)[..., None], np.asarray(labels, np.int32)


def slice_split(labels, seed=0, test_fraction=0.2):
  """The reference protocol's split: random slices, 20 % of each class in test."""
  rng = np.random.default_rng(seed)
  test = []
  for label in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == label))
    test.append(rows[:round(test_fraction * len(rows))])
  test = np.sort(np.concatenate(test))
  return np.setdiff1d(np.arange(len(labels)), test), test


def run_reference_baseline(check, dtype):
  """The `full` baseline under the reference protocol, with test accuracy per epoch."""
  images, labels = read_kaggle_zip(check.args.dataset)
  train_idx, test_idx = slice_split(labels)
  config = preset_config(check.args, 'baseline', dtype)
  config.labels.class_weights = 'none'  # The reference's plain cross entropy.
  config.model.num_classes = len(CLASS_NAMES)
  mesh = sharding.create_mesh()
  k = 2 if check.args.smoke else 16
  rows = batches.TrainingRows(train_idx.astype(np.int64), config.train.batch_size, config.seed)
  per_epoch = rows.steps_per_epoch
  epochs = 1 if check.args.smoke else check.args.max_epochs
  model = state_lib.create_model(config)
  tx = optimizers.create_optimizer(config)
  state = state_lib.create_train_state(config, model, jax.random.key(config.seed), tx, mesh)
  device_data = batches.DeviceDataset(types.SimpleNamespace(images=images, labels=labels), mesh)
  train_steps = steps_lib.make_train_steps(config, steps_lib.objective(config, model), mesh)
  rngs = sharding.replicate_tree({'dropout': jax.random.key(config.seed + 1),
                                  'augment': batches.augment_key(config.seed)}, mesh)

  def logits(state, data, inputs):
    batch_images, _ = batches.DeviceDataset.images(data, inputs)
    return state.apply_fn(state_lib.variables(state),
                          augment.model_input(batch_images, config.data.image_size,
                                              config.data.channels),
                          train=False)

  infer = jax.jit(logits, out_shardings=sharding.data_sharding(mesh))
  metrics = sharding.replicate_tree(steps_lib.TrainMetrics.empty(), mesh)
  step, epoch_s = 0, None
  for epoch in range(1, epochs + 1):
    if epoch_s is not None and epoch_s > check.left():
      check.write('skipped.jsonl', {'item': f'reference baseline epochs {epoch}..{epochs}',
                                    'skipped': 'budget', 'epoch_s': epoch_s,
                                    'left_s': check.left()})
      break
    start = time.perf_counter()
    end = epoch * per_epoch
    while step < end:
      num = min(k, end - step)
      host = [rows.step_inputs(step + i) for i in range(k)]
      inputs = {key: np.stack([h[key] for h in host]) for key in host[0]}
      values = sharding.replicate_tree(
          steps_lib.step_values(num, per_epoch, np.ones(config.model.num_classes),
                                optimizers.schedule_values(config, epochs * per_epoch)), mesh)
      state, metrics = train_steps(state, metrics, device_data.inputs(inputs, batch_axis=1),
                                   device_data.arrays, rngs, values)
      step += num
    train = jax.device_get(metrics.compute())
    metrics = sharding.replicate_tree(steps_lib.TrainMetrics.empty(), mesh)
    test_logits = evaluators.infer_rows(infer, state, device_data, test_idx,
                                        config.eval.batch_size)
    accuracy = float(np.mean(np.argmax(test_logits, -1) == labels[test_idx]))
    seconds = time.perf_counter() - start
    # The first epoch includes compilation; later epochs are timed from the second.
    epoch_s = seconds if epoch_s is None or epoch == 2 else max(epoch_s, seconds)
    check.write('reference_baseline.jsonl', {
        'epoch': epoch, 'step': step, 'test_accuracy': accuracy,
        'train_loss': float(train['loss']), 'train_accuracy': float(train['accuracy']),
        'epoch_s': seconds, 'dtype': dtype, 'model': config.model.name,
        'batch_size': config.train.batch_size, 'train_images': len(train_idx),
        'test_images': len(test_idx)})
  return step


def _version(package):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment(device):
  return {'item': 'environment', 'jax_version': jax.__version__,
          'packages': {p: _version(p) for p in ('flax', 'optax', 'orbax-checkpoint', 'clu',
                                                'ml_collections', 'pillow', 'numpy')},
          'jaxlib_version': jaxlib.__version__,
          'python': platform.python_version(), 'platform': device.platform,
          'device_kind': device.device_kind, 'num_devices': jax.device_count(),
          'cpu_count': os.cpu_count(), 'memory_stats': device.memory_stats(),
          'tensorflow_imported': 'tensorflow' in sys.modules and sys.modules['tensorflow'] is not None}


def main(argv=None):
  args = parse_args(argv)
  check = Check(args)
  device = jax.devices()[0]
  check.write('check.jsonl', environment(device))
  for name, mode, dtype, batch, k in step_items(args):
    run_step(check, device, name, mode, dtype, batch, k)
  for dtype in ('bfloat16',) if args.smoke else ('bfloat16', 'float32'):
    check.attempt(f'embed {dtype}', check.guess / 2 + 10,
                  lambda dtype=dtype: run_inference(check, device, dtype))
  if args.dataset:
    check.attempt('reference baseline', check.compile_s.get('baseline', check.guess) + 30,
                  lambda: run_reference_baseline(check, args.reference_dtype))
  else:
    check.write('skipped.jsonl', {'item': 'reference baseline', 'skipped': 'no --dataset'})
  check.write('check.jsonl', {'item': 'summary', 'seconds': time.perf_counter() - check.start,
                              'failed': check.failed,
                              'tensorflow_imported': environment(device)['tensorflow_imported']})
  return 1 if check.failed else 0


if __name__ == '__main__':
  sys.exit(main())
