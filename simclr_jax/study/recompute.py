r"""Recomputes a sweep's report from its predictions.npz and its config alone.

  python -m simclr_jax.study.recompute --predictions=runs/sweep/predictions.npz \
    --out=runs/sweep_recomputed [--config=runs/sweep/config.json]

Writes results.md, results.csv, sweep.json, label_fraction_curve.png,
confusion_matrices.png and pretraining_curves.png to `--out`, the same as the
sweep's own (`report.write_outputs` on the records that predictions.npz keeps:
every run's out-of-fold test predictions, the plan, run counts, wall times and
pretraining curves). `--config` defaults to the config.json beside the
predictions (the sweep's config as it ran). Not recomputable from predictions:
the Grad-CAM grid (it needs a run's checkpoint and the images); results.md links
it only where `--out` already holds one.
"""

import json
import os

from absl import app
from absl import flags
import ml_collections

from simclr_jax import errors
from simclr_jax.study import records as records_lib
from simclr_jax.study import report as report_lib

_PREDICTIONS = flags.DEFINE_string('predictions', None, 'A sweep\'s predictions.npz.')
_OUT = flags.DEFINE_string('out', None, 'Where the recomputed report goes.')
_CONFIG = flags.DEFINE_string('config', None, 'The sweep\'s config.json (default: the one '
                              'beside --predictions).')


def load_config(path):
  """The sweep's config from its config.json (a ConfigDict of the JSON's values)."""
  with open(path) as f:
    value = json.load(f)
  if not isinstance(value, dict) or 'sweep' not in value:
    raise errors.UserError(f'{path} is not a sweep\'s config.json (no `sweep` section); pass '
                           'the config.json the sweep wrote to its workdir with --config.')
  return ml_collections.ConfigDict(value)


def recompute(predictions, out, config=None):
  """Writes the report of `predictions` (a predictions.npz) to `out`; returns sweep.json's content."""
  config = config or os.path.join(os.path.dirname(os.path.abspath(predictions)), 'config.json')
  for path, flag in ((predictions, '--predictions'), (config, '--config')):
    if not os.path.exists(path):
      raise errors.UserError(f'{path} does not exist; pass {flag}=PATH.')
  records, meta = records_lib.load(predictions)
  return report_lib.write_outputs(load_config(config), out, records, meta)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  if not _PREDICTIONS.value or not _OUT.value:
    raise app.UsageError('Pass --predictions=DIR/predictions.npz and --out=DIR.')
  recompute(_PREDICTIONS.value, _OUT.value, _CONFIG.value)


if __name__ == '__main__':
  app.run(main)
