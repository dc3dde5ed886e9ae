r"""Supervised settings chosen on honest-protocol validation subjects, never on test.

Issue 22 (must-have 10): every hyper-parameter a preset fixes (learning rate,
augmentation of labeled images, run length, class weights, precise BatchNorm) is
chosen on the honest protocol's validation subjects. For each point of a small grid
of dotted sweep-config fields, this script trains the supervised baseline on a few
folds of the honest protocol (each fold's training subjects, at one or more label
budgets of k subjects with all their slices; the sweep preset's run config,
`plan.run_config`), restores the checkpoint each run chose on validation, and scores
it on that fold's **validation** subjects: balanced accuracy per subject (the mean
of a person's slice probabilities, as the study's primary endpoint) and per slice.
The point with the best mean over folds and budgets is chosen. The fold's test
subjects are never read for a choice: the runs compute test metrics in their
metrics.json, which this script neither prints nor writes.

The grid is one-factor-at-a-time by default: the preset's own values (the centre),
then each field's other values with every other field held at the preset's
(`--design=product`: every combination).

  python benchmarks/tune_supervised.py --preset=cpu \
    --data=../shared/data/alzheimer-mri-dataset.zip --task=binary --folds=0,1 \
    --subjects=16,0 --grid=supervised.optimizer.learning_rate=1e-4,3e-4,1e-3,3e-3 \
    --grid=augment.labeled=False,True --grid=labels.class_weights=balanced,none \
    --grid=eval.precise_bn_batches=8,None --grid=sweep.max_steps_per_run=300,600,1200 \
    --workdir=/work/runs/tune_supervised --out=docs/results/cpu/tune_supervised

Caveat (docs/results/README.md): a fold's validation subjects are test subjects of
another fold, so settings chosen here and used by the whole sweep have seen labels
of subjects it tests; tuning within each fold (nested) would not.

Runs resume: the same command skips finished runs and continues an unfinished one
(each run is a workdir named by its grid values). Prints the number of runs and a
CPU-time estimate (stderr) before training; `--dry_run` stops there. Writes OUT.csv
(one row per grid point, budget and fold) and OUT.md (the points sorted by their
validation score, the chosen one, the command); prints one JSON line.
"""

import argparse
import csv
import itertools
import json
import os
import pathlib
import re
import shlex
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# benchmarks/, beside this file: sweep_config (a preset with --override fields).
import pretrain_length  # pylint: disable=g-import-not-at-top,wrong-import-position

# Seconds of a quiet 2-core CPU per unit of work (a supervised step; a run's overhead
# is plan.RUN_OVERHEAD_STEPS steps): the `cpu` study of docs/results/README.md ran
# its honest runs of about 600 steps in 45-55 s and the 4,000-step reference runs in
# about 300 s, evaluations included (2026-12-01, Intel Xeon, 2 cores).
SECONDS_PER_STEP = 0.07
# Seconds to compile a point's train step on its first run (a new learning rate or
# augmentation is a new program; other folds and budgets reuse it from JAX's
# persistent cache): the cpu study's first baseline run took about 85 s more than
# the later ones.
COMPILE_SECONDS = 60.0
# Fields a grid may not vary: they change the data, the validation subjects or the
# selection criterion, so the points would not be scored alike.
FIXED_PREFIXES = ('data.', 'split.', 'eval.selection_')
DEFAULT_GRID = ('supervised.optimizer.learning_rate=1e-4,3e-4,1e-3,3e-3;'
                'augment.labeled=False,True;labels.class_weights=balanced,none;'
                'eval.precise_bn_batches=8,None;sweep.max_steps_per_run=300,600,1200')
# Fields run configs are derived from (absent from them, or a bound on them).
DERIVED_FROM = ('train.num_epochs',)
METRICS = {'subject': 'val_subject_balanced_accuracy', 'slice': 'val_balanced_accuracy'}
LEVELS = {'val_subject_balanced_accuracy': 'validation balanced accuracy per subject',
          'val_balanced_accuracy': 'validation balanced accuracy per slice'}


def parse_args(argv):
  """The flags, with `grid_fields` ([(field, [value texts])]) parsed from --grid."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='cpu', help='configs/sweep.py preset (the centre)')
  parser.add_argument('--data', default=None, help='data.path (the Kaggle zip for cpu)')
  parser.add_argument('--task', default='binary', help='label task (the primary: binary)')
  parser.add_argument('--folds', default='0,1', help='honest-protocol folds, comma-separated')
  parser.add_argument('--subjects', default='16,0',
                      help='label budgets: labeled training subjects (0: all), comma-separated')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--grid', action='append', default=None,
                      help="'field=v1,v2' (repeatable; or 'field=v1,v2;field2=v3'): a dotted "
                           "sweep-config field and its values (Python literals, else strings; "
                           f"commas inside brackets stay in a value). Default: {DEFAULT_GRID}")
  parser.add_argument('--design', default='ofat', choices=('ofat', 'product'),
                      help='ofat: vary one field at a time around the preset; product: all '
                           'combinations')
  parser.add_argument('--metric', default='subject', choices=tuple(METRICS),
                      help='validation balanced accuracy that chooses: per subject (ties '
                           'broken per slice) or per slice (ties broken per subject)')
  parser.add_argument('--workdir', required=True, help='runs go here (outside the checkout)')
  parser.add_argument('--out', required=True, help='OUT.csv and OUT.md are written')
  parser.add_argument('--override', action='append', default=[],
                      help='dotted sweep-config field=value for every point (repeatable), '
                           'e.g. train.batch_size=8')
  parser.add_argument('--seconds_per_step', type=float, default=SECONDS_PER_STEP,
                      help='for the estimate: CPU seconds per training step')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the runs and the estimate, train nothing')
  args = parser.parse_args(argv)
  try:
    args.grid_fields = parse_grid(';'.join(args.grid or [DEFAULT_GRID]))
  except ValueError as e:
    parser.error(f'--grid: {e}')
  return args


def split_values(text):
  """'1e-4,(0.5, 1.0),x' -> ['1e-4', '(0.5, 1.0)', 'x']: commas inside brackets stay."""
  values, depth, start = [], 0, 0
  for i, char in enumerate(text):
    depth += (char in '([{') - (char in ')]}')
    if char == ',' and depth == 0:
      values.append(text[start:i].strip())
      start = i + 1
  values.append(text[start:].strip())
  return [v for v in values if v]


def parse_grid(text):
  """'a.b=1,2;c=x,y' -> [('a.b', ['1', '2']), ('c', ['x', 'y'])]."""
  grid = []
  for part in (p.strip() for p in text.split(';')):
    if not part:
      continue
    name, sep, values = part.partition('=')
    name = name.strip()
    if not sep or not split_values(values):
      raise ValueError(f'{part!r} is not field=value1,value2')
    if name.startswith(FIXED_PREFIXES):
      raise ValueError(f'{name} changes the data, the validation subjects or the selection; '
                       'the grid may not vary it')
    if name in [n for n, _ in grid]:
      raise ValueError(f'{name} is given twice')
    grid.append((name, split_values(values)))
  if not grid:
    raise ValueError('no field')
  return grid


def get_field(config, name):
  """The value of dotted field `name` ('a.b.c') of a ConfigDict."""
  for part in name.split('.'):
    config = config[part]
  return config


def build_config(args, point=None, texts=()):
  """The sweep config of the preset with --override, then a point's {field: value}
  (or `texts`, 'field=value' as on the command line)."""
  texts = list(texts) + [f'{n}={v!r}' for n, v in (point or {}).items()]
  return pretrain_length.sweep_config(
      argparse.Namespace(preset=args.preset, data=args.data, override=args.override + texts))


def grid_values(args):
  """(centre, grid): the preset's value of each field, and each field's values as parsed."""
  base = build_config(args)
  centre, grid = {}, []
  for name, texts in args.grid_fields:
    try:
      centre[name] = get_field(base, name)
    except (KeyError, AttributeError):
      raise SystemExit(f'--grid: the {args.preset} sweep config has no field {name}') from None
    grid.append((name, [get_field(build_config(args, texts=[f'{name}={text}']), name)
                        for text in texts]))
  return centre, grid


def grid_points(centre, grid, design):
  """The points ({field: value}) in run order, without repeats; ofat starts at the centre."""
  if design == 'product':
    points = [dict(zip(centre, combo)) for combo in itertools.product(*(v for _, v in grid))]
  else:
    points = [dict(centre)] + [{**centre, name: value} for name, values in grid
                               for value in values if value != centre[name]]
  unique = []
  for point in points:
    if point not in unique:
      unique.append(point)
  return unique


def short_names(names):
  """Each field's last part, or the whole dotted name where two fields share it."""
  last = [n.split('.')[-1] for n in names]
  return {n: (s if last.count(s) == 1 else n) for n, s in zip(names, last)}


def point_dir(point, short):
  """The workdir name of a point: every grid field's value (the same run, the same name)."""
  return '+'.join(re.sub(r'[^\w.,=-]', '', f'{short[n]}={v}') for n, v in point.items())


def point_label(point, centre, short):
  """What differs from the preset ('preset' for the centre itself)."""
  differing = [f'{short[n]}={v}' for n, v in point.items() if v != centre[n]]
  return ', '.join(differing) or 'preset'


def validation_scores(workdir, arrays, labels, val_idx, num_classes, compiled):
  """(slice, subject) balanced accuracy and subjects of the run's best checkpoint on `val_idx`.

  The best checkpoint is the state the trainer chose on validation (precise BatchNorm
  statistics included); its validation predictions are recomputed here because the
  run stores only its test predictions. `compiled`: model key -> jitted inference.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import batches  # pylint: disable=g-import-not-at-top
  from simclr_jax.metrics import classification  # pylint: disable=g-import-not-at-top
  from simclr_jax.train import compile_cache  # pylint: disable=g-import-not-at-top
  from simclr_jax.train import workdirs  # pylint: disable=g-import-not-at-top
  run_config, model, variables = workdirs.restore_for_inference(workdir)
  key = compile_cache.model_key(run_config)
  if key not in compiled:  # Points of one model share it (same shapes, same network).
    compiled[key] = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
  size = run_config.eval.batch_size
  logits = []
  for start in range(0, len(val_idx), size):  # Padded to whole batches: one compilation.
    rows = val_idx[start:start + size]
    padded = np.concatenate([rows, np.repeat(rows[-1:], size - len(rows))])
    images = batches.preprocess(arrays.images[padded], run_config)
    logits.append(np.asarray(compiled[key](variables, images))[:len(rows)])
  predictions = classification.Predictions(
      rows=np.asarray(val_idx, np.int64), subject_ids=arrays.subject_ids[val_idx],
      labels=labels[val_idx],
      probabilities=classification.softmax(np.concatenate(logits)).astype(np.float32))
  metrics = classification.prediction_metrics(predictions, num_classes)
  return (float(metrics['balanced_accuracy']), float(metrics['subject']['balanced_accuracy']),
          int(metrics['num_subjects']))


def summarise(rows, points, labels, metric):
  """One summary per point, best first: mean score over folds and budgets, and its parts."""
  first, second = METRICS[metric], METRICS['slice' if metric == 'subject' else 'subject']
  summaries = []
  for order, (point, label) in enumerate(zip(points, labels)):
    mine = [r for r in rows if r['point'] == label]
    summary = {'point': label, 'settings': point, 'score': statistics.mean(r[first] for r in mine),
               'tie_break': statistics.mean(r[second] for r in mine), 'order': order,
               'by_budget': {}, 'by_fold': {}}
    for column, group in (('budget', 'by_budget'), ('fold', 'by_fold')):
      for value in dict.fromkeys(r[column] for r in mine):
        summary[group][value] = statistics.mean(r[first] for r in mine if r[column] == value)
    summaries.append(summary)
  # Best score first; ties: the other level, then the preset, then the grid's order.
  return sorted(summaries, key=lambda s: (-s['score'], -s['tie_break'], s['point'] != 'preset',
                                          s['order']))


def write_markdown(path, args, centre, summaries, rows, command):
  """OUT.md: the points sorted by validation score, the chosen one and the command."""
  first = METRICS[args.metric]
  second = METRICS['slice' if args.metric == 'subject' else 'subject']
  budgets = list(summaries[0]['by_budget'])
  folds = list(summaries[0]['by_fold'])
  val_subjects = sorted({r['num_val_subjects'] for r in rows})
  val_subjects = '-'.join(map(str, sorted({val_subjects[0], val_subjects[-1]})))
  design = {'ofat': 'one-factor-at-a-time grid around the preset',
            'product': 'every combination of the grid'}[args.design]
  lines = [
      f'# Supervised settings on validation subjects ({args.preset} preset, {args.task})', '',
      f'Baseline runs of the honest protocol, folds {", ".join(map(str, folds))}, label '
      f'budgets {", ".join(budgets)} (k training subjects, all their slices), seed '
      f'{args.seed}; {design}. Score: the {LEVELS[first]} of the checkpoint each run chose '
      f'on validation, mean over folds and budgets (ties: the {LEVELS[second]}); the budget '
      'and fold columns are the score\'s parts. Test subjects were not read. '
      f'{val_subjects} validation subjects per fold: one subject moves a fold\'s '
      'per-subject score by several points.', '',
      '| rank | setting (else the preset) | score | ' + ' | '.join(
          [LEVELS[second]] + budgets + [f'fold {f}' for f in folds]) + ' |',
      '|' + '---|' * (3 + 1 + len(budgets) + len(folds))]
  for rank, s in enumerate(summaries, 1):
    cells = [s['score'], s['tie_break']] + [s['by_budget'][b] for b in budgets] + [
        s['by_fold'][f] for f in folds]
    name = f'**{s["point"]}**' if rank == 1 else s['point']
    lines.append(f'| {rank} | {name} | ' + ' | '.join(f'{100 * c:.1f} %' for c in cells) + ' |')
  chosen = summaries[0]
  lines += ['', 'The preset: ' + ', '.join(f'`{n} = {v!r}`' for n, v in centre.items()) + '.']
  lines += ['', f'Chosen: **{chosen["point"]}**, that is ' + ', '.join(
      f'`{n} = {v!r}`' for n, v in chosen['settings'].items()) + '.', '',
            'Command:', '', '```', command, '```', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  from simclr_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  run_lib.setup_runtime()
  from simclr_jax.data import arrays as arrays_lib  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import batches  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  from simclr_jax.study import plan  # pylint: disable=g-import-not-at-top
  from simclr_jax.train import workdirs  # pylint: disable=g-import-not-at-top

  centre, grid = grid_values(args)
  points = grid_points(centre, grid, args.design)
  short = short_names(list(centre))
  labels_of_points = [point_label(p, centre, short) for p in points]
  base = build_config(args)
  arrays = arrays_lib.load_arrays(base)
  labels, class_names = arrays_lib.task_labels(arrays, plan.task_config(base, args.task))
  folds = [int(f) for f in args.folds.split(',')]
  budgets = [splits_lib.Budget('subject', int(k)) for k in args.subjects.split(',')]
  fold_splits = {f: plan.protocol_splits(base, 'honest', arrays, fold=f) for f in folds}
  labeled = {(f, b): splits_lib.budget_subset(arrays, fold_splits[f]['train'], b, args.seed)
             for f in folds for b in budgets}

  runs = []  # (point, label, fold, budget, workdir, run config, steps)
  for point, label in zip(points, labels_of_points):
    config = build_config(args, point)
    for fold, budget in itertools.product(folds, budgets):
      run = plan.run_config(config, 'honest', 'baseline', seed=args.seed,
                            num_classes=len(class_names), budget=budget,
                            num_labeled=len(labeled[fold, budget]), task=args.task, fold=fold)
      for name, value in point.items():  # A field the run config sets itself is refused.
        derived = name.startswith('sweep.') or name in DERIVED_FROM
        if not derived and get_field(run, name) != value:
          raise SystemExit(f'--grid: {name} is set by the honest protocol\'s run config '
                           f'({get_field(run, name)!r}), not by the grid; leave it out.')
      steps = run.train.num_epochs * batches.steps_per_epoch(len(labeled[fold, budget]),
                                                             run.train.batch_size)
      workdir = os.path.join(args.workdir, args.task, budget.name, f'fold{fold}',
                             f'{point_dir(point, short)}_s{args.seed}')
      runs.append((point, label, fold, budget, workdir, run, steps))
  todo = [r for r in runs if not workdirs.is_finished(r[4])]
  work = sum(r[6] * (1 if r[5].supervised.sam == 'none' else 2) + plan.RUN_OVERHEAD_STEPS
             for r in todo)
  compiles = len({r[1] for r in todo})
  estimate = work * args.seconds_per_step + compiles * COMPILE_SECONDS
  print(f'{len(points)} grid points x {len(folds)} folds x {len(budgets)} budgets = {len(runs)} '
        f'runs ({len(runs) - len(todo)} finished); {len(todo)} to train, '
        f'{sum(r[6] for r in todo)} steps: about {estimate / 60:.0f} min of this 2-core CPU '
        f'({args.seconds_per_step} s per step, {plan.RUN_OVERHEAD_STEPS} steps of overhead a '
        f'run, {COMPILE_SECONDS:.0f} s to compile each of {compiles} points)',
        file=sys.stderr, flush=True)
  if args.dry_run:
    print(json.dumps({'runs': len(runs), 'to_train': len(todo), 'points': labels_of_points,
                      'estimated_seconds': estimate}))
    return None

  rows, compiled, start = [], {}, time.time()
  for point, label, fold, budget, workdir, run, _ in runs:
    if not workdirs.is_finished(workdir):
      began = time.time()
      run_lib.run(run, workdir)
      workdirs.write_wall_time(workdir, time.time() - began)  # As the sweep's runs.
    # Only the selection's own fields of metrics.json: its test metrics stay unread.
    selection = workdirs.read_metrics(workdir)
    val_idx = fold_splits[fold]['val']
    val_slice, val_subject, num_val = validation_scores(workdir, arrays, labels, val_idx,
                                                        len(class_names), compiled)
    chosen_by = selection.get(f'selection_val_{run.eval.selection_metric}')
    if (run.eval.selection_metric == 'balanced_accuracy' and chosen_by is not None
        and abs(chosen_by - val_slice) > 1e-3):
      print(f'warning: {workdir}: validation balanced accuracy {val_slice:.4f} recomputed, '
            f'{chosen_by:.4f} at selection', file=sys.stderr)
    rows.append({'point': label, **{n: repr(v) for n, v in point.items()}, 'task': args.task,
                 'budget': budget.name, 'fold': fold, 'seed': args.seed,
                 'num_labeled': len(labeled[fold, budget]), 'num_val_subjects': num_val,
                 'total_steps': selection['total_steps'], 'chosen_step': selection['chosen_step'],
                 'val_balanced_accuracy': val_slice, 'val_subject_balanced_accuracy': val_subject,
                 'wall_seconds': workdirs.read_wall_time(workdir), 'workdir': workdir})

  summaries = summarise(rows, points, labels_of_points, args.metric)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)) or '.', exist_ok=True)
  with open(args.out + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  command = shlex.join(['python', 'benchmarks/tune_supervised.py'] + argv)
  write_markdown(args.out + '.md', args, centre, summaries, rows, command)
  chosen = summaries[0]
  print(json.dumps({
      'chosen': chosen['point'], 'settings': chosen['settings'], 'metric': METRICS[args.metric],
      'score': chosen['score'],
      'points': [{'point': s['point'], 'score': s['score'], 'tie_break': s['tie_break']}
                 for s in summaries],
      'runs': len(runs), 'trained': len(todo), 'wall_seconds': time.time() - start}))
  return summaries


if __name__ == '__main__':
  main()
