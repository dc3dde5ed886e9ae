"""Entry point: `python main.py --config=configs/<mode>.py[:args] --workdir=DIR`.

The config's `mode` picks what runs: pretrain, finetune, baseline (training),
predict (classification + Grad-CAM of new images), sweep (the label-fraction study)
or audit (near-duplicate leakage audit). Any config field can be overridden with
`--config.field=value`.
"""

import os

from absl import app
from absl import flags
from absl import logging
from clu import platform
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and outputs.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for a multi-process launch (not needed on '
                    'Cloud TPU pods or SLURM).')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process launch.')
flags.DEFINE_integer('process_id', None, 'This process of a multi-process launch.')
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/pretrain.py:runlocal.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}; pass settings as --config.field=value.')
  # Imported here so that `--help` is fast and TensorFlow never grabs an accelerator.
  from simclr_jax import run  # pylint: disable=g-import-not-at-top
  run.setup_runtime()
  from simclr_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
  logging.info('JAX process %d / %d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  platform.work_unit().set_task_status(
      f'process_index: {jax.process_index()}, process_count: {jax.process_count()}')
  platform.work_unit().create_artifact(platform.ArtifactType.DIRECTORY, FLAGS.workdir, 'workdir')
  run.run(FLAGS.config, os.path.abspath(FLAGS.workdir))


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
