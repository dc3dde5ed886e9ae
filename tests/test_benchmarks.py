"""Every script under benchmarks/ runs at a tiny size (smoke tests, seconds each)."""

import importlib.util
import json
import os

import jax
import numpy as np
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
