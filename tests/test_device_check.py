"""The accelerator check (benchmarks/device_check.py) in smoke mode, with TensorFlow blocked.

A lent GPU machine has JAX, flax, optax and orbax but no TensorFlow, TFDS, clu
writers or network: the check must run without importing any of them.
"""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image

from tests import conftest

# Runs the check as a script in a process where importing TensorFlow fails, then
# reports which of the forbidden modules got imported anyway.
_BLOCKED_RUN = """
import json, runpy, sys
sys.modules['tensorflow'] = None
sys.modules['tensorflow_datasets'] = None
sys.argv = ['benchmarks/device_check.py'] + sys.argv[1:]
try:
  runpy.run_path('benchmarks/device_check.py', run_name='__main__')
  code = 0
except SystemExit as exit_:
  code = exit_.code
forbidden = ('tensorflow', 'tensorflow_datasets', 'clu.metric_writers', 'clu.periodic_actions')
print(json.dumps({'imported': sorted(m for m in forbidden if sys.modules.get(m) is not None)}))
sys.exit(code)
"""


def _kaggle_like_zip(path, per_class=6):
  """A zip laid out as the Kaggle download (Dataset/<class>/<file>.jpg), random pixels."""
  rng = np.random.default_rng(0)
  with zipfile.ZipFile(path, 'w') as archive:
    for name in ('Mild_Demented', 'Moderate_Demented', 'Non_Demented', 'Very_Mild_Demented'):
      for i in range(per_class):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 128), np.uint8)).save(buffer, 'JPEG')
        archive.writestr(f'Dataset/{name}/{name}_{i + 1}.jpg', buffer.getvalue())


def test_smoke_mode_runs_every_item_without_tensorflow(tmp_path, compilation_cache):
  dataset, out = tmp_path / 'kaggle.zip', tmp_path / 'out'
  _kaggle_like_zip(dataset)
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  result = subprocess.run(
      [sys.executable, '-c', _BLOCKED_RUN, f'--out={out}', '--smoke', f'--dataset={dataset}'],
      cwd=conftest.REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == {'imported': []}
  files = sorted(p.name for p in out.iterdir())
  assert len(files) <= 6 and 'skipped.jsonl' not in files, files
  read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]
  steps = read('steps.jsonl')
  assert [(s['mode'], s['dtype'], s['steps_per_dispatch']) for s in steps] == [
      ('pretrain', 'bfloat16', 2), ('baseline', 'float32', 2), ('pretrain', 'bfloat16', 1)]
  assert all(s['images_per_s'] > 0 and s['compiles_while_stepping'] == 0 for s in steps)
  assert read('inference.jsonl')[0]['images_per_s'] > 0
  epochs = read('reference_baseline.jsonl')
  assert [e['epoch'] for e in epochs] == [1] and 0 <= epochs[0]['test_accuracy'] <= 1
  assert epochs[0]['train_images'] + epochs[0]['test_images'] == 24
  summary = read('check.jsonl')[-1]
  assert summary['failed'] == 0 and not summary['tensorflow_imported']


def test_a_small_budget_skips_items_and_says_why(tmp_path):
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-c', _BLOCKED_RUN, f'--out={out}', '--smoke', '--budget_s=0'],
      cwd=conftest.REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  skipped = [json.loads(line) for line in (out / 'skipped.jsonl').read_text().splitlines()]
  assert {s['skipped'] for s in skipped} == {'budget', 'no --dataset'}
  assert not (out / 'steps.jsonl').exists()
