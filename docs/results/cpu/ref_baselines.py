"""Runs only the reference protocol's baseline arm of the cpu sweep (time budget)."""
import sys
from absl import logging
from configs import sweep as sweep_config
from simclr_jax import input_pipeline, run as run_lib, sweep

logging.set_verbosity(logging.INFO)
run_lib.setup_runtime()
config = sweep_config.get_config('preset=cpu')
config.dataset_path = '../shared/data/alzheimer-mri-dataset.zip'
config.data_dir = '~/tensorflow_datasets'
config.max_steps_per_run = 120
config.pretrain_num_epochs = 3
config.evals_per_run = 4
arrays = input_pipeline.load_arrays(config)
runs = [r for r in sweep.plan_runs(config, 'runs/sweep_cpu', arrays)
        if r.protocol == 'reference' and r.arm == 'baseline']
for i, r in enumerate(runs, 1):
  print('reference baseline', r.fraction, sweep._run_training(r, f'{i}/{len(runs)}'), flush=True)
