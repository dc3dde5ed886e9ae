r"""One cell of the honest sweep, end to end, its runs grouped and one by one: wall time.

Issue 21's measurement of grouping where it counts: `main.py` in sweep mode, cut to
one cell of the honest protocol (one task, one label budget, one seed, every fold:
the folds' pretrainings, then each fold's baseline and finetune runs), run once with
`--config.sweep.group_runs=1` (one run after another, as before grouping) and once
with `--config.sweep.group_runs=N` (each fold's pretraining together, then the
cell's 2 x folds supervised runs together), alternating, each in a fresh workdir
with an empty compilation cache of its own (so both pay for their compilation, as
a first sweep does). Prints each invocation's wall time, the time of its
pretraining and supervised phases (from the sweep's own "Sweep group ... done"
lines), the load average around it, the medians and their ratio; the last line
is JSON.

  python benchmarks/sweep_cell.py --preset=cpu \
    --data=../shared/data/alzheimer-mri-dataset.zip --workdir=/tmp/sweep_cell
  python benchmarks/sweep_cell.py --preset=runlocal --workdir=/tmp/sweep_cell  # minutes
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = re.compile(r'Sweep group \d+/\d+ done \(\d+ runs?: (?P<what>.*?)\) in '
                  r'(?P<min>\d+) min (?P<sec>\d+) s')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='cpu', help='configs/sweep.py preset')
  parser.add_argument('--data', default=None, help='data.path (the Kaggle zip for cpu)')
  parser.add_argument('--task', default='binary')
  parser.add_argument('--subjects', type=int, default=8, help='the cell\'s label budget')
  parser.add_argument('--pretrain_epochs', type=int, default=1,
                      help='pretraining epochs (the preset\'s with 0)')
  parser.add_argument('--group_runs', type=int, default=10, help='N of the grouped arm')
  parser.add_argument('--repeats', type=int, default=1, help='invocations of each arm')
  parser.add_argument('--workdir', required=True, help='scratch space (outside the checkout)')
  parser.add_argument('--override', action='append', default=[],
                      help='a further --config.FIELD=VALUE for both arms (repeatable)')
  return parser.parse_args(argv)


def command(args, group_runs, workdir):
  flags = [f'--config=configs/sweep.py:preset={args.preset}', f'--workdir={workdir}',
           "--config.sweep.protocols=('honest',)", f"--config.sweep.tasks=('{args.task}',)",
           f'--config.sweep.subject_budgets=({args.subjects},)', '--config.sweep.seeds=(0,)',
           f'--config.sweep.group_runs={group_runs}']
  if args.data:
    flags.append(f'--config.data.path={args.data}')
  if args.pretrain_epochs:
    flags.append(f'--config.sweep.pretrain_num_epochs={args.pretrain_epochs}')
  flags += [f'--config.{o}' for o in args.override]
  return [sys.executable, 'main.py', *flags]


def phases(log_text):
  """Seconds of the pretraining and supervised groups, from the sweep's log."""
  seconds = {'pretrain': 0, 'supervised': 0}
  for match in DONE.finditer(log_text):
    supervised = any(arm in match['what'] for arm in ('baseline', 'finetune', 'probe'))
    phase = 'supervised' if supervised else 'pretrain'
    seconds[phase] += 60 * int(match['min']) + int(match['sec'])
  return seconds


def run_once(args, group_runs, index):
  workdir = os.path.join(args.workdir, f'g{group_runs}_{index}')
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  env = dict(os.environ, SIMCLR_JAX_CACHE=os.path.join(workdir, 'jax_cache'))
  log_path = os.path.join(workdir, 'log.txt')
  load_before = os.getloadavg()[0]
  start = time.time()
  with open(log_path, 'w') as log:
    result = subprocess.run(command(args, group_runs, os.path.join(workdir, 'sweep')),
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            check=False)
  wall = time.time() - start
  with open(log_path) as f:
    text = f.read()
  if result.returncode:
    sys.exit(f'The sweep failed (exit {result.returncode}); see {log_path}:\n{text[-2000:]}')
  return {'group_runs': group_runs, 'wall_s': round(wall, 1), **phases(text),
          'load_before': load_before, 'load_after': os.getloadavg()[0]}


def main(argv=None):
  args = parse_args(argv)
  print(' '.join(command(args, 'N', os.path.join(args.workdir, '...'))), flush=True)
  results = []
  for index in range(args.repeats):
    for group_runs in (1, args.group_runs):
      results.append(run_once(args, group_runs, index))
      print(json.dumps(results[-1]), flush=True)
  alone = statistics.median(r['wall_s'] for r in results if r['group_runs'] == 1)
  grouped = statistics.median(r['wall_s'] for r in results if r['group_runs'] != 1)
  print(f'one by one {alone:.0f} s, grouped (up to {args.group_runs} runs) {grouped:.0f} s: '
        f'{alone / grouped:.2f}x (median of {args.repeats})')
  print(json.dumps({'benchmark': 'sweep_cell', 'preset': args.preset, 'task': args.task,
                    'subjects': args.subjects, 'pretrain_epochs': args.pretrain_epochs,
                    'one_by_one_s': alone, 'grouped_s': grouped,
                    'speedup': round(alone / grouped, 3), 'runs': results}))


if __name__ == '__main__':
  main()
