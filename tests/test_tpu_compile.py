"""The TPU compilation check (benchmarks/tpu_compile.py) in its tiny mode.

Runs where libtpu is installed (benchmarks/requirements-tpu.txt, in a venv of its
own); elsewhere, the project's venv and CI included, it skips and says so.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests import conftest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason='libtpu is not installed: pip install -r requirements.txt -r '
    'benchmarks/requirements-tpu.txt in a venv of its own to run the TPU compilation check')


def test_tiny_preset_compiles_every_program_for_a_tpu_slice():
  result = subprocess.run(
      [sys.executable, 'benchmarks/tpu_compile.py', '--preset=tiny', '--topology=v5e:2x2'],
      cwd=conftest.REPO, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['device_kind'] == 'TPU v5 lite' and report['num_chips'] == 4
  programs = {p['program']: p for p in report['programs']}
  assert set(programs) == {'pretrain', 'supervised', 'embed', 'logits', 'knn', 'gradcam'}
  for name, program in programs.items():
    assert program['host_callbacks'] == [], name
    assert not program['cpu_kernels_used'], name
    assert 0 < program['memory_total_bytes_per_chip'] < report['hbm_bytes_per_chip'], name
    assert program['flops_per_step'] > 0 and program['step_s_at_peak'] > 0, name
  # lax's max-pool gradient, not cpu_kernels' CPU form, is in the train steps.
  assert programs['pretrain']['select_and_scatter'] and programs['supervised']['select_and_scatter']
  predicted = report['predicted']
  assert predicted['pretrain_100_epochs_steps'] == 100 * 200  # 6,400 images, batch 32.
  assert predicted['study_s'] > predicted['pretrain_100_epochs_s'] > 0
