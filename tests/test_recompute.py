"""A sweep's report recomputed from its predictions.npz and config.json alone."""

import json
import os
import subprocess
import sys

import numpy as np

from simclr_jax.data import arrays as arrays_lib
from simclr_jax.study import records as records_lib
from tests.conftest import REPO
from tests.fake_sweep import read_text


def test_recompute_rebuilds_the_report_from_predictions_alone(fake_sweep, tmp_path):
  config, workdir, _, _, _ = fake_sweep
  path = os.path.join(workdir, records_lib.PREDICTIONS_FILE)
  assert os.path.getsize(path) < 2**20
  with np.load(path) as data:  # Readable without this package: plain arrays and JSON.
    meta = json.loads(str(data['meta']))
    arrays = arrays_lib.load_arrays(config)
    np.testing.assert_array_equal(data['slice_index'], arrays.slice_index[data['row']])
    np.testing.assert_array_equal(data['subject_id'], arrays.subject_ids[data['row']])
    run_of = meta['runs'][int(data['run'][0])]
    assert set(run_of) >= {'protocol', 'task', 'fold', 'seed', 'arm', 'budget'}
  out = str(tmp_path / 'recomputed')
  subprocess.run([sys.executable, '-m', 'simclr_jax.study.recompute', f'--predictions={path}',
                  f'--out={out}'], cwd=REPO, check=True, capture_output=True, timeout=600)
  for name in ('results.md', 'results.csv', 'sweep.json'):
    assert read_text(out, name) == read_text(workdir, name), name
  for name in ('label_fraction_curve.png', 'confusion_matrices.png', 'pretraining_curves.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  assert not os.path.exists(os.path.join(out, 'gradcam_grid.png'))  # Needs checkpoints.
