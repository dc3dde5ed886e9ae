"""Writes the cpu sweep's reports from its finished runs (no training)."""
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
runs = sweep.plan_runs(config, 'runs/sweep_cpu', arrays)
summary = sweep.write_reports(config, 'runs/sweep_cpu', runs, arrays)
print(summary['num_runs'], summary['wall_seconds'])
