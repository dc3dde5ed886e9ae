"""The sweep's reports: rows of the finished runs, aggregates, verdicts, tables, figures.

Reads only the finished runs' `metrics.json` (through `runs.py`), so the reports
can be written mid-sweep; writes results.csv, results.md, sweep.json,
label_fraction_curve.png, confusion_matrices.png and gradcam_grid.png.
"""

import csv
import io
import math

import jax
import numpy as np

from simclr_jax import explain
from simclr_jax import plots
from simclr_jax import runs
from simclr_jax import sweep_plan

CSV_COLUMNS = ('protocol', 'arm', 'fraction', 'seed', 'num_labeled', 'accuracy',
               'balanced_accuracy', 'macro_f1', 'chosen_step', 'wall_seconds')


def duration(seconds):
  """'1 h 05 min' or '4 min 09 s'."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours} h {minutes:02d} min' if hours else f'{minutes} min {seconds:02d} s'


def collect_rows(planned):
  """One dict per finished floor, baseline or finetune run (the rows of results.csv)."""
  rows = []
  for run in planned:
    if run.arm == 'pretrain' or not run.finished:
      continue
    metrics = runs.read_metrics(run.workdir)
    wall = runs.read_wall_time(run.workdir)
    rows.append({
        'protocol': run.protocol, 'arm': run.arm, 'fraction': run.fraction,
        'seed': run.seed, 'num_labeled': metrics.get('num_train_images', run.num_labeled),
        **{metric: metrics[metric] for metric in sweep_plan.METRICS},
        'chosen_step': metrics.get('chosen_step'), 'wall_seconds': wall,
        'confusion_matrix': metrics['confusion_matrix'],
        'class_names': metrics['class_names'],
        'selection_metric': next((v for k, v in metrics.items()
                                  if k.startswith('selection_')), None),
        'workdir': run.workdir,
    })
  return rows


def _stats(values):
  """Mean, sample standard deviation (None for one value) and the values."""
  values = [float(v) for v in values]
  return {'mean': float(np.mean(values)),
          'std': float(np.std(values, ddof=1)) if len(values) > 1 else None,
          'values': values}


def simclr_verdict(baseline, finetune):
  """Did SimCLR beat the baseline in balanced accuracy, relative to the seed spread?

  The spread is the larger of the two arms' standard deviations over seeds.

  Args:
    baseline: balanced accuracies of the baseline, one per seed.
    finetune: balanced accuracies of SimCLR fine-tuning, one per seed.

  Returns:
    {'gain', 'spread' (None for one seed), 'verdict'}: gain and spread in points.
  """
  gain = 100 * (np.mean(finetune) - np.mean(baseline))
  if min(len(baseline), len(finetune)) < 2:
    return {'gain': float(gain), 'spread': None, 'verdict': 'one seed, spread unknown'}
  spread = 100 * max(np.std(baseline, ddof=1), np.std(finetune, ddof=1))
  if gain > spread:
    verdict = 'SimCLR better, above spread'
  elif gain < -spread:
    verdict = 'baseline better, above spread'
  else:
    verdict = 'within spread'
  return {'gain': float(gain), 'spread': float(spread), 'verdict': verdict}


def aggregate(config, rows, arrays):
  """The sweep's aggregates: per protocol and fraction, mean +- std of each arm."""
  summary = {'dataset': config.dataset, 'class_names': list(arrays.class_names),
             'protocols': {}, 'inflation': []}
  for protocol in config.protocols:
    test_labels = arrays.labels[sweep_plan.protocol_splits(config, protocol, arrays)['test']]
    counts = np.bincount(test_labels, minlength=len(arrays.class_names))
    fractions = []
    for fraction in config.fractions:
      entry = {'fraction': float(fraction), 'num_labeled': None, 'arms': {}}
      for arm in sweep_plan.ARMS:
        arm_rows = [r for r in rows if r['protocol'] == protocol and r['arm'] == arm
                    and math.isclose(r['fraction'], fraction)]
        if not arm_rows:
          continue
        entry['num_labeled'] = int(arm_rows[0]['num_labeled'])
        entry['arms'][arm] = {metric: _stats([r[metric] for r in arm_rows])
                              for metric in sweep_plan.METRICS}
        entry['arms'][arm]['seeds'] = [r['seed'] for r in arm_rows]
      if {'baseline', 'finetune'} <= set(entry['arms']):
        entry['simclr_vs_baseline'] = simclr_verdict(
            entry['arms']['baseline']['balanced_accuracy']['values'],
            entry['arms']['finetune']['balanced_accuracy']['values'])
        if 'floor' in entry['arms']:
          floor = entry['arms']['floor']['balanced_accuracy']['mean']
          entry['simclr_vs_baseline']['both_clear_floor'] = bool(all(
              entry['arms'][arm]['balanced_accuracy']['mean'] > floor
              for arm in ('baseline', 'finetune')))
      if entry['arms']:
        fractions.append(entry)
    summary['protocols'][protocol] = {
        'description': sweep_plan.PROTOCOL_DESCRIPTIONS[protocol], **sweep_plan.PROTOCOLS[protocol],
        'num_test_images': int(len(test_labels)),
        'majority_share': float(counts.max() / max(1, counts.sum())),
        'fractions': fractions}
  if {'honest', 'reference'} <= set(summary['protocols']):
    summary['inflation'] = _inflation(summary['protocols'])
  return summary


def _inflation(protocols):
  """Reference minus honest mean, per fraction, arm and metric (in points)."""
  honest = {e['fraction']: e for e in protocols['honest']['fractions']}
  rows = []
  for entry in protocols['reference']['fractions']:
    if entry['fraction'] not in honest:
      continue
    for arm in sweep_plan.ARMS:
      if arm not in entry['arms'] or arm not in honest[entry['fraction']]['arms']:
        continue
      row = {'fraction': entry['fraction'], 'arm': arm}
      for metric in sweep_plan.METRICS:
        h = honest[entry['fraction']]['arms'][arm][metric]['mean']
        r = entry['arms'][arm][metric]['mean']
        row[metric] = {'honest': h, 'reference': r, 'inflation': 100 * (r - h)}
      rows.append(row)
  return rows


def _percent(stats):
  if stats is None:
    return '-'
  if stats['std'] is None:
    return f'{100 * stats["mean"]:.1f}'
  return f'{100 * stats["mean"]:.1f} ± {100 * stats["std"]:.1f}'


def _fraction_label(entry):
  return f'{sweep_plan.percent_label(entry["fraction"])} ({entry["num_labeled"]:,})'


def _table(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return lines


def verdict_sentence(entry):
  """One plain sentence on SimCLR vs the baseline at one fraction."""
  comparison = entry.get('simclr_vs_baseline')
  if comparison is None:
    return f'{_fraction_label(entry)}: not both arms finished yet.'
  gain, spread = comparison['gain'], comparison['spread']
  who = 'SimCLR beat the baseline' if gain > 0 else 'SimCLR did not beat the baseline'
  text = f'{_fraction_label(entry)}: {who} ({gain:+.1f} pts of balanced accuracy'
  if spread is None:
    text += '; one seed, so no seed-to-seed spread to compare with).'
  elif abs(gain) > spread:
    text += f', more than the seed-to-seed spread of {spread:.1f} pts).'
  else:
    text += f', within the seed-to-seed spread of {spread:.1f} pts: no clear difference).'
  if 'both_clear_floor' in comparison:
    text += (' Both learned arms clear the raw-pixel floor.' if comparison['both_clear_floor']
             else ' Not both learned arms clear the raw-pixel floor.')
  return text


def results_markdown(summary, config):
  """results.md: per protocol, a table per metric, the verdicts, then the inflation."""
  lines = ['# Label-fraction study: SimCLR fine-tuning vs supervised baseline', '',
           f'Data: `{config.dataset}`; model {config.model} (width {config.width:g}, '
           f'{config.encoder_output}), {config.image_size} px, {config.channels} channel(s), '
           f'batch {config.batch_size}; pretraining {config.pretrain_num_epochs} epochs '
           f'(SAM: {config.sam}, rho {config.sam_rho:g}); fine-tuning and baseline up to '
           f'{config.num_epochs} epochs'
           + (f', capped at about {config.max_steps_per_run} steps per run'
              if config.max_steps_per_run else '') + '.',
           'Cells: test scores in %, mean ± sample standard deviation over seeds '
           '(no ± where one seed ran). Raw-pixel 1-NN: 1-nearest-neighbour by '
           'correlation of the pixels (area-downsampled to '
           f'{config.floor_image_size or "the stored"} px), from the same labeled '
           'images, no training.', '']
  wall = summary.get('wall_seconds')
  if wall:
    lines += [f'Wall time: {duration(wall["runs_total"])} summed over the runs '
              f'({duration(wall["pretraining"])} of it pretraining); the last invocation '
              f'of the sweep took {duration(wall["last_invocation"] or 0.0)}.', '']
  for protocol, result in summary['protocols'].items():
    lines += [f'## Protocol `{protocol}`', '', f'{result["description"][0].upper()}'
              f'{result["description"][1:]}. Test split: {result["num_test_images"]:,} '
              f'images; always answering the majority class scores '
              f'{100 * result["majority_share"]:.1f} % accuracy and '
              f'{100 / len(summary["class_names"]):.1f} % balanced accuracy.', '']
    for metric in sweep_plan.METRICS:
      lines += [f'### {sweep_plan.METRIC_TITLES[metric]} (%)', '']
      rows = []
      for entry in result['fractions']:
        seeds = max(len(entry['arms'][a]['seeds']) for a in entry['arms'])
        rows.append([_fraction_label(entry)] + [
            _percent(entry['arms'].get(arm, {}).get(metric)) for arm in sweep_plan.ARMS] + [str(seeds)])
      lines += _table(['labeled data'] + [sweep_plan.ARM_NAMES[a] for a in sweep_plan.ARMS] + ['seeds'], rows)
      lines.append('')
    lines += ['### Did SimCLR beat the baseline? (balanced accuracy)', '']
    rows = []
    for entry in result['fractions']:
      comparison = entry.get('simclr_vs_baseline')
      if comparison is None:
        continue
      spread = comparison['spread']
      floor = comparison.get('both_clear_floor')
      rows.append([_fraction_label(entry), f'{comparison["gain"]:+.1f}',
                   '-' if spread is None else f'{spread:.1f}', comparison['verdict'],
                   '-' if floor is None else ('yes' if floor else 'no')])
    lines += _table(['labeled data', 'SimCLR − baseline (pts)', 'seed spread (pts)',
                     'verdict', 'both arms above the floor'], rows)
    lines += ['', 'Spread: the larger of the two arms\' standard deviations over seeds.', '']
    lines += [f'- {verdict_sentence(entry)}' for entry in result['fractions']]
    lines.append('')
  if summary['inflation']:
    lines += ['## Honest vs reference protocol: how much the reference\'s choices inflate '
              'the scores', '',
              'Mean test score under each protocol and the difference (reference − '
              'honest, in points): this project\'s estimate of what the reference\'s '
              'numbers owe to its slice split, transductive pretraining and test-set '
              'selection.', '']
    rows = []
    for row in summary['inflation']:
      cells = [sweep_plan.percent_label(row['fraction']), sweep_plan.ARM_NAMES[row['arm']]]
      for metric in ('accuracy', 'balanced_accuracy'):
        m = row[metric]
        cells += [f'{100 * m["honest"]:.1f}', f'{100 * m["reference"]:.1f}',
                  f'{m["inflation"]:+.1f}']
      rows.append(cells)
    lines += _table(['labeled', 'arm', 'accuracy honest', 'accuracy reference',
                     'inflation (pts)', 'bal. acc. honest', 'bal. acc. reference',
                     'inflation (pts)'], rows)
    lines.append('')
  return '\n'.join(lines)


def results_csv(rows):
  """results.csv: one line per finished run."""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction='ignore',
                          lineterminator='\r\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ('' if row[k] is None else row[k]) for k in CSV_COLUMNS})
  return out.getvalue()


def write_reports(config, workdir, planned, arrays, elapsed=None, figures=True):
  """Writes results.csv, results.md, sweep.json and (with figures) the three PNGs.

  Reports cover the finished runs, so they can be written mid-sweep.
  """
  rows = collect_rows(planned)
  summary = aggregate(config, rows, arrays)
  walls = [r['wall_seconds'] for r in rows if r['wall_seconds'] is not None]
  pretrain_walls = [runs.read_wall_time(run.workdir) for run in planned
                    if run.arm == 'pretrain']
  pretrain_walls = [wall for wall in pretrain_walls if wall is not None]
  summary['wall_seconds'] = {'runs_total': float(sum(walls) + sum(pretrain_walls)),
                             'pretraining': float(sum(pretrain_walls)),
                             'last_invocation': elapsed}
  summary['num_runs'] = {'finished': len(rows) + len(pretrain_walls),
                         'planned': len(planned)}
  if jax.process_index() == 0:
    runs.write_text(runs.output_path(workdir, 'results.csv'), results_csv(rows))
    runs.write_text(runs.output_path(workdir, 'results.md'),
                    results_markdown(summary, config))
    runs.write_json(runs.output_path(workdir, 'sweep.json'), summary)
  if figures and rows:
    if jax.process_index() == 0:
      plots.plot_label_fraction_curves(
          summary, runs.output_path(workdir, 'label_fraction_curve.png'))
      write_confusion_matrices(config, rows,
                               runs.output_path(workdir, 'confusion_matrices.png'))
    write_gradcam_grid(config, rows, arrays, runs.output_path(workdir, 'gradcam_grid.png'))
  return summary


def write_confusion_matrices(config, rows, path):
  """The grid of test confusion matrices: fractions x arms, first protocol and seed."""
  protocol = config.protocols[0]
  seed = sweep_plan.protocol_seeds(config, protocol)[0]
  cells = {}
  for r in rows:
    if r['protocol'] == protocol and r['seed'] == seed:
      title = (f'{sweep_plan.ARM_NAMES[r["arm"]]}, {sweep_plan.percent_label(r["fraction"])} ({r["num_labeled"]:,})\n'
               f'acc {100 * r["accuracy"]:.1f} %, bal. acc '
               f'{100 * r["balanced_accuracy"]:.1f} %')
      cells[r['fraction'], r['arm']] = (r['confusion_matrix'], title)
  fractions = [f for f in config.fractions if any((f, a) in cells for a in sweep_plan.ARMS)]
  arms = [a for a in sweep_plan.ARMS if any((f, a) in cells for f in fractions)]
  class_names = next(r['class_names'] for r in rows)
  grid = [[cells.get((f, a)) for a in arms] for f in fractions]
  plots.plot_confusion_grid(grid, class_names, path,
                            title=f'Test confusion matrices, protocol {protocol}, '
                                  f'seed {seed} (rows: labeled fraction)')


def write_gradcam_grid(config, rows, arrays, path):
  """Grad-CAM of the best SimCLR run at the largest fraction on its protocol's test split.

  The run is the first protocol's SimCLR (finetune) run at its largest fraction with
  the best selection-split score (never chosen on test unless the protocol does).
  Every process computes the heatmaps (restoring is collective); process 0 draws.
  """
  protocol = config.protocols[0]
  candidates = [r for r in rows if r['protocol'] == protocol and r['arm'] == 'finetune']
  if not candidates:
    return None
  largest = max(r['fraction'] for r in candidates)
  candidates = [r for r in candidates if r['fraction'] == largest]
  best = max(candidates, key=lambda r: (r['selection_metric'] or 0.0, -r['seed']))
  run_config, model, variables = runs.restore_for_inference(best['workdir'])
  test_idx = sweep_plan.protocol_splits(config, protocol, arrays)['test']
  explanation = explain.explain(model, variables, arrays.images[test_idx], run_config,
                                config.cam_method, config.cam_layer,
                                batch_size=config.eval_batch_size)
  if jax.process_index() != 0:
    return None
  return explain.write_gradcam_grid(
      path, arrays.images[test_idx], explanation, arrays.file_names[test_idx],
      arrays.class_names,
      f'{explain.CAM_NAMES[config.cam_method]} ({config.cam_layer})',
      f'SimCLR fine-tuned on {sweep_plan.percent_label(largest)} of the labels, protocol '
      f'{protocol}, seed {best["seed"]}: the most confident test image of each '
      'predicted class', labels=arrays.labels[test_idx])
