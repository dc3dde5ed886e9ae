"""The sweep's reports: results.csv, results.md, sweep.json and the figures.

Reads only the finished runs' `metrics.json` and `test_predictions.npz` (through
`runs.py`), so the reports can be written mid-sweep; the numbers come from
`sweep_results.py`, the text of results.md from `sweep_markdown.py`. Writes
results.csv, results.md, sweep.json, label_fraction_curve.png,
confusion_matrices.png and gradcam_grid.png.
"""

import csv
import io
import math

import jax
import numpy as np

from simclr_jax.data import arrays as arrays_lib
from simclr_jax.explain import grid as cam_grid
from simclr_jax import plots
from simclr_jax.train import workdirs
from simclr_jax.study import plan as plan_lib
from simclr_jax.study import markdown as markdown_lib
from simclr_jax.study import results as results_lib


def results_csv(rows):
  """results.csv: one line per finished run (per fold), then the pooled lines."""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=results_lib.CSV_COLUMNS, extrasaction='ignore',
                          lineterminator='\r\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ('' if row[k] is None else row[k]) for k in results_lib.CSV_COLUMNS})
  return out.getvalue()


# ----------------------------------------------------------------------------- writing


def _json_ready(value):
  """`value` with sets, tuples and numpy scalars made JSON types."""
  if isinstance(value, dict):
    return {str(k): _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set)):
    return [_json_ready(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def _wall_seconds(planned, rows):
  walls = [r['wall_seconds'] for r in rows if r['wall_seconds'] is not None]
  floor = [r['wall_seconds'] for r in rows
           if r['arm'] == 'floor' and r['wall_seconds'] is not None]
  pretrain = [workdirs.read_wall_time(run.workdir) for run in planned if run.arm == 'pretrain']
  pretrain = [wall for wall in pretrain if wall is not None]
  return {'runs_total': float(sum(walls) + sum(pretrain)), 'pretraining': float(sum(pretrain)),
          'floor': float(sum(floor))}, len(pretrain)


def write_reports(config, workdir, planned, arrays, elapsed=None, figures=True):
  """Writes results.csv, results.md, sweep.json and (with figures) the three PNGs.

  Reports cover the finished runs, so they can be written mid-sweep. Every process
  reads the runs and computes the Grad-CAM heatmaps (restoring is collective);
  only process 0 writes files.

  Returns:
    The aggregates (sweep.json's content).
  """
  rows = results_lib.collect_rows(planned)
  pooled = results_lib.pool_rows(rows, planned)
  summary = results_lib.aggregate(config, rows, pooled)
  summary['answer'] = markdown_lib.answer_sentences(summary, config)
  wall, num_pretrained = _wall_seconds(planned, rows)
  summary['wall_seconds'] = {**wall, 'last_invocation': elapsed}
  summary['num_runs'] = {
      'finished': len(rows) + num_pretrained, 'planned': len(planned),
      **{f'{arm}_finished': sum(r['arm'] == arm for r in rows) for arm in plan_lib.ARMS},
      'pretrain_finished': num_pretrained}
  writer = jax.process_index() == 0
  written = set()
  if figures and pooled:
    if writer:
      plots.plot_label_fraction_curves(
          summary, workdirs.output_path(workdir, 'label_fraction_curve.png'))
      written.add('label_fraction_curve.png')
      if write_confusion_matrices(config, summary,
                                  workdirs.output_path(workdir, 'confusion_matrices.png')):
        written.add('confusion_matrices.png')
    if write_gradcam_grid(config, rows, arrays,
                          workdirs.output_path(workdir, 'gradcam_grid.png')) is not None:
      written.add('gradcam_grid.png')
  if writer:
    # Figures of an earlier, complete report stay linked while runs are added.
    present = {name for name in results_lib.FIGURES if workdirs.output_path(workdir, name).exists()}
    cross_validated = [r for r in pooled if r['fold'] == 'pooled']
    workdirs.write_text(workdirs.output_path(workdir, 'results.csv'),
                    results_csv(rows + sorted(cross_validated, key=_csv_order)))
    workdirs.write_text(workdirs.output_path(workdir, 'results.md'),
                    markdown_lib.results_markdown(summary, config, written | present))
    workdirs.write_json(workdirs.output_path(workdir, 'sweep.json'), _json_ready(summary))
  return summary


def _csv_order(row):
  return (row['protocol'], row['task'], row['fraction'], row['seed'],
          plan_lib.ARMS.index(row['arm']))


def write_confusion_matrices(config, summary, path):
  """Pooled confusion matrices of the first protocol with folds (honest): every task.

  Rows: task x the smallest and the largest fraction; columns: arm x level (per
  slice, per subject); the first seed's pooled out-of-fold predictions.

  Returns:
    Whether a figure was written.
  """
  protocols = summary['protocols']
  protocol = next((p for p in protocols if protocols[p]['num_folds']), config.sweep.protocols[0])
  grid, class_rows = [], []
  for task, entry in protocols[protocol]['tasks'].items():
    fractions = entry['fractions']
    for fraction_entry in ([fractions[0], fractions[-1]] if len(fractions) > 1
                           else fractions):
      row = []
      for arm in plan_lib.ARMS:
        arm_entry = fraction_entry['arms'].get(arm)
        for level in results_lib.LEVELS:
          if arm_entry is None:
            row.append(None)
            continue
          value = arm_entry[level][results_lib.HEADLINE_METRIC]['value']
          title = (f'{plan_lib.ARM_NAMES[arm]}, {results_lib.LEVEL_NAMES[level]}\n{task}, '
                   f'{plan_lib.percent_label(fraction_entry["fraction"])} labels, '
                   f'bal. acc. {100 * value:.1f} %')
          row.append((arm_entry['confusion'][level], title, entry['class_names']))
      grid.append(row)
      class_rows.append(entry['class_names'])
  if not grid:
    return False
  plots.plot_confusion_grid(
      grid, class_rows[0], path,
      title=f'Pooled out-of-fold test confusion matrices, protocol {protocol} (first seed; '
            'rows: task and label fraction)')
  return True


def write_gradcam_grid(config, rows, arrays, path):
  """Grad-CAM of the best SimCLR run at the largest fraction, on its own fold's test split.

  The run: the first protocol's and first task's SimCLR (finetune) runs at their
  largest fraction, the one with the best selection-split score (never chosen on
  test unless the protocol does); its test split is that of its fold. Every
  process computes the heatmaps (restoring is collective); process 0 draws.

  Returns:
    The figure (process 0), or None.
  """
  protocol, task = config.sweep.protocols[0], config.sweep.tasks[0]
  candidates = [r for r in rows if r['protocol'] == protocol and r['task'] == task
                and r['arm'] == 'finetune']
  if not candidates:
    return None
  largest = max(r['fraction'] for r in candidates)
  candidates = [r for r in candidates if math.isclose(r['fraction'], largest)]
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
      f'SimCLR fine-tuned on {plan_lib.percent_label(largest)} of the labels, protocol '
      f'{protocol}, task {task}{fold}, seed {best["seed"]}{selection}:\n'
      'the most confident image of each predicted class among its test subjects',
      labels=labels[test_idx])


