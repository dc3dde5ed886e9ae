"""The sweep's reports: predictions.npz, results.csv, results.md, sweep.json and the figures.

`write_reports` (the sweep) reads the finished runs (`records.from_workdirs`), so the
reports can be written mid-sweep, writes their out-of-fold predictions, the plan,
run counts, wall times and pretraining curves to predictions.npz, draws the
Grad-CAM grid (it needs the checkpoints), and hands the rest to `write_outputs`,
which `recompute.py` calls on a predictions.npz alone: results.csv, results.md,
sweep.json, label_fraction_curve.png, pretraining_curves.png and
confusion_matrices.png are functions of the records and the config. The numbers
come from `rows.py` and `results.py`, the text of results.md from `markdown.py`.
"""

import csv
import io
import math

import jax

from simclr_jax.data import arrays as arrays_lib
from simclr_jax.explain import grid as cam_grid
from simclr_jax import plots
from simclr_jax.train import workdirs
from simclr_jax.data import splits as splits_lib
from simclr_jax.study import plan as plan_lib
from simclr_jax.study import markdown as markdown_lib
from simclr_jax.study import records as records_lib
from simclr_jax.study import results as results_lib
from simclr_jax.study import rows as rows_lib


def results_csv(rows):
  """results.csv: one line per finished run (per fold), then the pooled lines."""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=rows_lib.CSV_COLUMNS, extrasaction='ignore',
                          lineterminator='\r\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _csv_value(row[k]) for k in rows_lib.CSV_COLUMNS})
  return out.getvalue()


def _csv_value(value):
  """A results.csv cell: '' for None, a budget's label ('4 subjects', '10 %')."""
  if value is None:
    return ''
  return value.label if isinstance(value, splits_lib.Budget) else value


# ----------------------------------------------------------------------------- writing


def sweep_meta(planned, records, elapsed):
  """What a report needs beside the records: the plan, run counts, wall times, curves."""
  walls = [r['wall_seconds'] for r in records if r['wall_seconds'] is not None]
  floor = [r['wall_seconds'] for r in records
           if r['arm'] == 'floor' and r['wall_seconds'] is not None]
  pretrain = [workdirs.read_wall_time(run.workdir) for run in planned if run.arm == 'pretrain']
  pretrain = [wall for wall in pretrain if wall is not None]
  return {
      'plan': records_lib.plan_entries(planned),
      'num_runs': {'finished': len(records) + len(pretrain), 'planned': len(planned),
                   **{f'{arm}_finished': sum(r['arm'] == arm for r in records)
                      for arm in plan_lib.ARMS},
                   'pretrain_finished': len(pretrain)},
      'wall_seconds': {'runs_total': float(sum(walls) + sum(pretrain)),
                       'pretraining': float(sum(pretrain)), 'floor': float(sum(floor)),
                       'last_invocation': elapsed},
      'curves': records_lib.pretraining_curves(planned)}


def write_reports(config, workdir, planned, arrays, elapsed=None, figures=True):
  """Writes predictions.npz and (`write_outputs`) every report; with figures, the PNGs.

  Reports cover the finished runs, so they can be written mid-sweep. Every process
  reads the runs and computes the Grad-CAM heatmaps (restoring is collective);
  only process 0 writes files.

  Returns:
    The aggregates (sweep.json's content).
  """
  records = records_lib.from_workdirs(planned)
  meta = sweep_meta(planned, records, elapsed)
  if jax.process_index() == 0:
    workdirs.write_bytes(workdirs.output_path(workdir, records_lib.PREDICTIONS_FILE),
                         records_lib.to_bytes(records, arrays.slice_index, meta))
  extra = set()
  if figures and any(r['predictions'] is not None for r in records):
    if write_gradcam_grid(config, records, arrays,
                          workdirs.output_path(workdir, 'gradcam_grid.png')) is not None:
      extra.add('gradcam_grid.png')
  return write_outputs(config, workdir, records, meta, figures, extra)


def _curves_with_chance(curves, summary):
  """The pretraining curves, each with the chance balanced accuracy of its monitor's task."""
  result = []
  for curve in curves:
    task = summary['protocols'].get(curve['protocol'], {}).get('tasks', {}).get(curve['task'])
    result.append({**curve, 'chance': 1 / len(task['class_names']) if task else None})
  return result


def write_outputs(config, workdir, records, meta, figures=True, extra_figures=()):
  """results.csv, results.md, sweep.json and (with figures) the figures of the records.

  Args:
    config: the sweep's config.
    workdir: where the files go.
    records: `records.from_workdirs` or `records.load`'s records.
    meta: `sweep_meta`'s dict (or predictions.npz's).
    figures: whether to draw label_fraction_curve.png, pretraining_curves.png and
      confusion_matrices.png.
    extra_figures: figures already written to link from results.md (the Grad-CAM grid).

  Returns:
    The aggregates (sweep.json's content).
  """
  rows = rows_lib.collect_rows(records)
  pooled = rows_lib.pool_rows(rows, meta['plan'])
  summary = results_lib.aggregate(config, rows, pooled)
  summary['answer'] = markdown_lib.answer_sentences(summary, config)
  summary['wall_seconds'] = meta['wall_seconds']
  summary['num_runs'] = meta['num_runs']
  if jax.process_index() != 0:
    return summary
  written = set(extra_figures)
  if figures and pooled:
    plots.plot_label_fraction_curves(
        summary, workdirs.output_path(workdir, 'label_fraction_curve.png'))
    written.add('label_fraction_curve.png')
    if write_confusion_matrices(config, summary,
                                workdirs.output_path(workdir, 'confusion_matrices.png')):
      written.add('confusion_matrices.png')
  if figures and meta['curves']:
    plots.plot_pretraining_curves(_curves_with_chance(meta['curves'], summary),
                                  workdirs.output_path(workdir, 'pretraining_curves.png'))
    written.add('pretraining_curves.png')
  # Figures of an earlier, complete report stay linked while runs are added.
  present = {name for name in results_lib.FIGURES if workdirs.output_path(workdir, name).exists()}
  cross_validated = [r for r in pooled if r['fold'] == 'pooled']
  workdirs.write_text(workdirs.output_path(workdir, 'results.csv'),
                      results_csv(rows + sorted(cross_validated, key=_csv_order)))
  workdirs.write_text(workdirs.output_path(workdir, 'results.md'),
                      markdown_lib.results_markdown(summary, config, written | present))
  workdirs.write_json(workdirs.output_path(workdir, 'sweep.json'), records_lib.json_ready(summary))
  return summary


def _csv_order(row):
  return (row['protocol'], row['task'], row['budget'].sort_key, row['seed'],
          plan_lib.ARMS.index(row['arm']))


def write_confusion_matrices(config, summary, path):
  """Pooled confusion matrices of the first protocol with folds (honest): every task.

  Rows: task x the smallest and the largest label budget; columns: arm x level (per
  slice, per subject); the first seed's pooled out-of-fold predictions.

  Returns:
    Whether a figure was written.
  """
  protocols = summary['protocols']
  protocol = next((p for p in protocols if protocols[p]['num_folds']), config.sweep.protocols[0])
  grid, class_rows = [], []
  for task, entry in protocols[protocol]['tasks'].items():
    budgets = entry['budgets']
    for budget_entry in ([budgets[0], budgets[-1]] if len(budgets) > 1 else budgets):
      row = []
      for arm in plan_lib.ARMS:
        arm_entry = budget_entry['arms'].get(arm)
        for level in results_lib.LEVELS:
          if arm_entry is None:
            row.append(None)
            continue
          value = arm_entry[level]['balanced_accuracy']['value']
          title = (f'{plan_lib.ARM_NAMES[arm]}, {results_lib.LEVEL_NAMES[level]}\n{task}, '
                   f'labels: {budget_entry["budget"]["label"]}, '
                   f'bal. acc. {100 * value:.1f} %')
          row.append((arm_entry['confusion'][level], title, entry['class_names']))
      grid.append(row)
      class_rows.append(entry['class_names'])
  if not grid:
    return False
  plots.plot_confusion_grid(
      grid, class_rows[0], path,
      title=f'Pooled out-of-fold test confusion matrices, protocol {protocol} (first seed; '
            'rows: task and label budget)')
  return True


def write_gradcam_grid(config, records, arrays, path):
  """Grad-CAM of the best SimCLR run at the largest label budget, on its own fold's test split.

  The run: the first protocol's and first task's SimCLR (finetune) runs at their
  largest budget, the one with the best selection-split score (never chosen on
  test unless the protocol does); its test split is that of its fold. Every
  process computes the heatmaps (restoring is collective); process 0 draws.

  Returns:
    The figure (process 0), or None.
  """
  protocol, task = config.sweep.protocols[0], config.sweep.tasks[0]
  candidates = [r for r in records if r['protocol'] == protocol and r['task'] == task
                and r['arm'] == 'finetune' and r['workdir'] is not None]
  if not candidates:
    return None
  largest = max((r['budget'] for r in candidates), key=lambda b: b.sort_key)
  candidates = [r for r in candidates if r['budget'] == largest]
  best = max(candidates, key=lambda r: (r['selection'] if r['selection'] is not None
                                        else -math.inf, -r['seed'],
                                        -(r['fold'] or 0)))
  run_config, model, variables = workdirs.restore_for_inference(best['workdir'])
  test_idx = plan_lib.protocol_splits(config, protocol, arrays, best['fold'])['test']
  labels, class_names = arrays_lib.task_labels(arrays, plan_lib.task_config(config, task))
  explanation = cam_grid.explain(model, variables, arrays.images[test_idx], run_config,
                                config.cam.method, config.cam.layer,
                                batch_size=config.eval.batch_size)
  if jax.process_index() != 0:
    return None
  fold = '' if best['fold'] is None else f', fold {best["fold"]}'
  selection = ''
  if best['selection'] is not None:
    key = str(best['selection_key']).replace('_', ' ')
    selection = f', best {best["selection_split"]} {key} {100 * best["selection"]:.1f} %'
  return cam_grid.write_gradcam_grid(
      path, arrays.images[test_idx], explanation, arrays.file_names[test_idx], class_names,
      f'{cam_grid.CAM_NAMES[config.cam.method]} ({config.cam.layer})',
      f'SimCLR fine-tuned on {largest.phrase}, protocol '
      f'{protocol}, task {task}{fold}, seed {best["seed"]}{selection}:\n'
      'the most confident image of each predicted class among its test subjects',
      labels=labels[test_idx])


