r"""A metric against training steps, read from runs' TensorBoard events, as a figure and a CSV.

The issue-13 sizing check: does the `cpu` preset's baseline fit the reference protocol's
split? Its runs evaluate test accuracy every epoch (the reference's protocol), so the curve is
in their events already:

  python benchmarks/accuracy_curve.py \
    /work/runs/sweep_cpu/reference/four_class/baseline_f1_s0 \
    /work/runs/sweep_cpu/reference/four_class/finetune_f1_s0 \
    --tag=test/accuracy --out=docs/results/cpu/reference_accuracy_curve.png

Writes OUT (PNG) and the same points beside it as CSV (run, step, value).
"""

import argparse
import csv
import glob
import os
import pathlib
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from simclr_jax import plots  # pylint: disable=g-import-not-at-top,wrong-import-position


def read_curve(run_dir, tag):
  """(step, value) pairs of `tag` in the run's event files, in step order.

  The first value of a step is kept: a run's final test of its chosen checkpoint is
  written at the last step again, after that step's own evaluation.
  """
  points = {}
  for path in sorted(glob.glob(os.path.join(run_dir, 'events.out.tfevents.*'))):
    events = event_accumulator.EventAccumulator(path, size_guidance={'tensors': 0})
    events.Reload()
    if tag in events.Tags()['tensors']:
      for event in events.Tensors(tag):
        points.setdefault(event.step, float(tf.make_ndarray(event.tensor_proto)))
  if not points:
    raise SystemExit(f'error: {run_dir} has no {tag} summaries; check the run directory and --tag.')
  return sorted(points.items())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', help='run directories (workdirs of training runs)')
  parser.add_argument('--tag', default='test/accuracy')
  parser.add_argument('--out', required=True, help='the PNG to write; the CSV goes beside it')
  parser.add_argument('--target', type=float, default=None,
                      help='a horizontal line, e.g. 0.95 (the issue\'s bar)')
  args = parser.parse_args(argv)
  curves = {os.path.basename(os.path.normpath(run)): read_curve(run, args.tag)
            for run in args.runs}
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for name, points in curves.items():
    steps, values = zip(*points)
    ax.plot(steps, [100 * v for v in values], marker='.', label=name)
  if args.target is not None:
    ax.axhline(100 * args.target, color='grey', linestyle='--', linewidth=1,
               label=f'{100 * args.target:g} %')
  ax.set_xlabel('training step (batch 32)')
  ax.set_ylabel(f'{args.tag} (%)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  plots.save_figure(fig, args.out)
  with open(os.path.splitext(args.out)[0] + '.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['run', 'step', args.tag])
    for name, points in curves.items():
      writer.writerows([name, step, f'{value:.5f}'] for step, value in points)
  for name, points in curves.items():
    best = max(points, key=lambda p: p[1])
    print(f'{name}: {len(points)} points, last {100 * points[-1][1]:.1f} % at step '
          f'{points[-1][0]}, best {100 * best[1]:.1f} % at step {best[0]}')


if __name__ == '__main__':
  main()
