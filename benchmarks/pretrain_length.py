r"""How long should SimCLR pretrain? One honest fold, few labels, validation subjects only.

Issue 22's sizing experiment. For each pretraining length (epochs) it pretrains SimCLR
on one fold of the honest protocol (the fold's training and validation subjects; the
sweep preset's settings, `plan.run_config`), then, at a few-label budget (k labeled
training subjects with all their slices), fine-tunes the pretrained encoder and trains
a linear probe on it (frozen encoder); a baseline from random weights at the same
budget is the bar. Every number is the **validation** balanced accuracy (subject-level
and slice-level) of the checkpoint chosen on validation: the fold's test subjects are
never read for a choice (the runs compute their test metrics; this script does not
print them). Beside each pretraining: its last kNN and linear-probe monitors and
NT-Xent loss (curves.jsonl).

  python benchmarks/pretrain_length.py --preset=cpu \
    --data=../shared/data/alzheimer-mri-dataset.zip --epochs=6,25,50 --subjects=8 \
    --workdir=/work/runs/pretrain_length --out=docs/results/cpu/pretrain_length

Runs resume: the same command continues where it stopped (each run is a workdir).
Writes OUT.csv and OUT.png; prints one JSON line.
"""

import argparse
import ast
import csv
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='cpu', help='configs/sweep.py preset')
  parser.add_argument('--data', default=None, help='data.path (the Kaggle zip for cpu)')
  parser.add_argument('--epochs', default='6,25,50', help='pretraining lengths, epochs')
  parser.add_argument('--subjects', type=int, default=8, help='labeled training subjects')
  parser.add_argument('--task', default='binary')
  parser.add_argument('--fold', type=int, default=0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', required=True, help='runs go here (outside the checkout)')
  parser.add_argument('--out', required=True, help='OUT.csv and OUT.png are written')
  parser.add_argument('--override', action='append', default=[],
                      help='dotted sweep-config field=value (repeatable), e.g. '
                           'train.batch_size=8')
  return parser.parse_args(argv)


def sweep_config(args):
  from configs import sweep as sweep_config_lib  # pylint: disable=g-import-not-at-top
  config = sweep_config_lib.get_config(f'preset={args.preset}')
  if args.data:
    config.data.path = args.data
  for override in args.override:
    name, text = override.split('=', 1)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *sections, field = name.split('.')
    section = config
    for part in sections:
      section = section[part]
    section[field] = value
  return config


def plot(rows, path, title):
  """Validation balanced accuracy against pretraining epochs, one line per arm."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for arm in ('finetune', 'linear_probe'):
    points = [(r['pretrain_epochs'], r['val_balanced_accuracy']) for r in rows if r['arm'] == arm]
    if points:
      ax.plot(*zip(*points), marker='o', label=arm.replace('_', ' '))
  probe = [(r['pretrain_epochs'], r['val_probe_balanced_accuracy']) for r in rows
           if r['arm'] == 'finetune' and r.get('val_probe_balanced_accuracy') is not None]
  if probe:
    ax.plot(*zip(*probe), marker='s', linestyle=':', label='pretraining monitor: probe on all labels')
  baseline = [r['val_balanced_accuracy'] for r in rows if r['arm'] == 'baseline']
  if baseline and baseline[0] is not None:
    ax.axhline(baseline[0], color='gray', linestyle='--', label='baseline (random init)')
  ax.set_xlabel('SimCLR pretraining epochs')
  ax.set_ylabel('validation balanced accuracy')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _last(lines, key):
  values = [line[key] for line in lines if key in line]
  return values[-1] if values else None


def main(argv=None):
  args = parse_args(argv)
  from simclr_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  run_lib.setup_runtime()
  from simclr_jax.data import arrays as arrays_lib  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  from simclr_jax.study import plan  # pylint: disable=g-import-not-at-top
  from simclr_jax.train import curves  # pylint: disable=g-import-not-at-top

  config = sweep_config(args)
  arrays = arrays_lib.load_arrays(config)
  _, class_names = arrays_lib.task_labels(arrays, plan.task_config(config, args.task))
  budget = splits_lib.Budget('subject', args.subjects)
  num_classes = len(class_names)
  common = dict(seed=args.seed, num_classes=num_classes, task=args.task, fold=args.fold)
  run_splits = plan.protocol_splits(config, 'honest', arrays, fold=args.fold)
  probe_config = plan.run_config(config, 'honest', 'baseline', budget=budget, num_labeled=1,
                                 **common)  # Only to draw the labeled rows.
  labeled = splits_lib.labeled_rows(probe_config, arrays, run_splits['train'])
  supervised = dict(budget=budget, num_labeled=len(labeled), **common)
  rows, start = [], time.time()

  def train(run_config, name):
    workdir = os.path.join(args.workdir, name)
    metrics = run_lib.run(run_config, workdir)
    key = [k for k in metrics if k.startswith('selection_val_')]
    return workdir, metrics, (metrics[key[0]] if key else None)

  _, _, baseline_val = train(plan.run_config(config, 'honest', 'baseline', **supervised),
                             f'baseline_k{args.subjects}')
  rows.append({'pretrain_epochs': 0, 'arm': 'baseline', 'val_balanced_accuracy': baseline_val})
  for epochs in [int(e) for e in args.epochs.split(',')]:
    config.sweep.pretrain_num_epochs = epochs
    pretrain = plan.run_config(config, 'honest', 'pretrain', **common)
    pretrain_dir, _, _ = train(pretrain, f'pretrain_e{epochs}')
    lines = curves.read_curves(pretrain_dir)
    monitors = {'val_knn_balanced_accuracy': _last(lines, f'val/knn{config.eval.knn_k[-1]}_balanced_accuracy'),
                'val_probe_balanced_accuracy': _last(lines, 'val/probe_balanced_accuracy'),
                'final_loss': _last(lines, 'train/loss')}
    for arm, probe in (('finetune', False), ('linear_probe', True)):
      run_config = plan.run_config(config, 'honest', 'finetune', pretrained_workdir=pretrain_dir,
                                   **supervised)
      run_config.finetune.linear_probe = probe
      _, _, value = train(run_config, f'{arm}_e{epochs}_k{args.subjects}')
      rows.append({'pretrain_epochs': epochs, 'arm': arm, 'val_balanced_accuracy': value,
                   **monitors})
  os.makedirs(os.path.dirname(os.path.abspath(args.out)) or '.', exist_ok=True)
  fields = ['pretrain_epochs', 'arm', 'val_balanced_accuracy', 'val_knn_balanced_accuracy',
            'val_probe_balanced_accuracy', 'final_loss']
  with open(args.out + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  plot(rows, args.out + '.png', f'{args.preset}: fold {args.fold}, {args.task}, '
                                f'{args.subjects} labeled subjects (validation subjects)')
  print(json.dumps({'rows': rows, 'wall_seconds': time.time() - start}))


if __name__ == '__main__':
  main()
