"""results.md's tables and the formatting of their cells, from the sweep's aggregates.

Scores are fractions shown in % (Brier score and ECE as numbers: lower is
better), differences in points (a − b), each with its 95 % interval. Every
comparison is labeled by its role: the pre-registered primary endpoint, the
positive control, or exploratory (`role`).
"""

from simclr_jax.metrics import bootstrap
from simclr_jax.study import plan as plan_lib
from simclr_jax.study import results as results_lib
from simclr_jax.study import verdicts

TITLES = {**plan_lib.METRIC_TITLES, 'roc_auc': 'ROC AUC', 'sensitivity': 'Sensitivity',
          'specificity': 'Specificity', 'brier': 'Brier', 'ece': 'ECE'}
PROBABILITY_METRICS = bootstrap.PROBABILITY_METRICS


def join(items):
  """'a', 'a and b', 'a, b and c'."""
  items = list(items)
  if len(items) <= 1:
    return ''.join(items)
  return ', '.join(items[:-1]) + ' and ' + items[-1]


def interval(value, metric='balanced_accuracy'):
  """'45.1 [40.2, 50.3]' of a fraction (in %), '0.213 [0.190, 0.240]' of a Brier score or ECE."""
  if metric in bootstrap.LOWER_IS_BETTER:
    return f'{value["value"]:.3f} [{value["low"]:.3f}, {value["high"]:.3f}]'
  return f'{100 * value["value"]:.1f} [{100 * value["low"]:.1f}, {100 * value["high"]:.1f}]'


def difference(value):
  """'+1.2 [-3.0, +5.4]' (points)."""
  return f'{value["difference"]:+.1f} [{value["low"]:+.1f}, {value["high"]:+.1f}]'


def budget_cell(entry, cross_validated):
  """'10 % (1,234 per fold)', '4 subjects (128 slices per fold)' or 'all subjects (143
  subjects, 4,576 slices per fold)'."""
  per_fold = ' per fold' if cross_validated else ''
  budget = results_lib.budget_of(entry)
  if budget.unit == 'slice':
    return f'{budget.label} ({entry["num_labeled"]:,}{per_fold})'
  subjects = (f'{entry["num_labeled_subjects"]:,} subjects, '
              if budget.is_all and entry.get('num_labeled_subjects') is not None else '')
  return f'{budget.label} ({subjects}{entry["num_labeled"]:,} slices{per_fold})'


def inflation_budget(row, short=False):
  """An inflation row's budget (the protocols' budgets match, or are both all labels)."""
  if row['budget']['label'] == row['from_budget']['label']:
    return row['budget']['label'] if short else results_lib.budget_of(row).phrase
  both = f'{row["from_budget"]["label"]} / {row["budget"]["label"]}'
  return f'all ({both})' if short else f'all labels: {both}'


def step_factors(row):
  """What an inflation step adds: its one factor, or 'several at once: ...'."""
  if row['one_factor']:
    return row['factors'][0]
  return f'several at once: {join(row["factors"])}'


def _compared(row):
  if not row['paired']:
    return (f'unpaired: {row["tested"]["from"]["slices"]:,} / '
            f'{row["tested"]["to"]["slices"]:,} slices')
  compared = row['compared']
  which = 'the same' if compared['same'] else 'the'
  return (f'paired: {which} {compared["slices"]:,} slices'
          f'{"" if compared["same"] else " both tested"} ({compared["subjects"]:,} subjects)')


def inflation_table(rows):
  """Each step's balanced accuracy, from → to (%), and the change (points): paired with
  its 95 % interval, or unpaired without one."""
  header = ['task', 'labeled', 'arm', 'step', 'factor added', 'test compared']
  for level in results_lib.LEVELS:
    name = results_lib.LEVEL_NAMES[level]
    header += [f'bal. acc. {name}', f'change {name} (pts)']
  lines = []
  for row in rows:
    cells = [row['task'], inflation_budget(row, short=True), plan_lib.ARM_NAMES[row['arm']],
             f'{row["from"]} → {row["to"]}', step_factors(row), _compared(row)]
    for level in results_lib.LEVELS:
      value = row[level]['balanced_accuracy']
      cells += [f'{100 * value["from"]:.1f} → {100 * value["to"]:.1f}',
                difference(value) if row['paired'] else
                f'{value["difference"]:+.1f} (unpaired: no interval)']
    lines.append(cells)
  return table(header, lines)


def cap_note(task, cap, num_classes):
  """The balanced-accuracy cap of a task whose class no selection split held."""
  one = len(cap['classes']) == 1
  subjects = join(str(n) for n in cap['subjects'])
  return (f'Cap: {join(cap["classes"])} ({subjects} subject{"" if subjects == "1" else "s"}'
          f'{"" if one else " each"}) {"is" if one else "are"} never in a fold\'s validation '
          f'split, so model selection never scores {"it" if one else "them"} and training sees '
          f'at most a few of {"its" if one else "their"} subjects; where '
          f'{"its" if one else "their"} test subjects are all missed, pooled {task} balanced '
          f'accuracy (the mean of the {num_classes} class recalls) is capped at '
          f'{100 * cap["max_balanced_accuracy"]:.0f} %.')


def table(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] * 2 + ['---:'] * (len(header) - 2)) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return lines


def role(summary, protocol, task, budget, key):
  """'primary', 'positive control' or 'exploratory': a comparison's part in the study."""
  for name, entry in (('primary', summary.get('primary')),
                      ('positive control', summary.get('positive_control'))):
    if (entry and entry['protocol'] == protocol and entry.get('task') == task
        and key == entry['comparison'] and budget in entry['budgets']):
      return name
  return 'exploratory'


def _folds_note(arm):
  if arm['folds_pooled'] < arm['folds_planned']:
    return f' ({arm["folds_pooled"]} of {arm["folds_planned"]} folds)'
  return ''


def _arm_rows(entry, cross_validated, metrics, extra=()):
  rows = []
  for budget_entry in entry['budgets']:
    for arm_name, arm in budget_entry['arms'].items():
      cells = [budget_cell(budget_entry, cross_validated),
               plan_lib.ARM_NAMES[arm_name] + _folds_note(arm)]
      cells += [f(arm) for f in extra]
      for metric in metrics:
        cells += [interval(arm[level][metric], metric) for level in results_lib.LEVELS]
      rows.append(cells)
  return rows


def _metric_header(metrics):
  return [f'{TITLES[m]} {results_lib.LEVEL_NAMES[level]}' for m in metrics
          for level in results_lib.LEVELS]


def scores_table(entry, cross_validated):
  """Balanced accuracy, accuracy and macro-F1 of each arm, per slice and per subject."""
  header = (['labeled', 'arm', 'subjects', 'slices'] + _metric_header(results_lib.REPORT_METRICS)
            + ['seeds'])
  rows = _arm_rows(entry, cross_validated, results_lib.REPORT_METRICS,
                   (lambda a: f'{a["num_subjects"]:,}', lambda a: f'{a["num_slices"]:,}'))
  counts = [str(len(arm['seeds'])) for e in entry['budgets'] for arm in e['arms'].values()]
  return table(header, [row + [count] for row, count in zip(rows, counts)])


def probability_table(entry, cross_validated):
  """ROC AUC, sensitivity and specificity (binary tasks), Brier score and ECE of each arm."""
  metrics = [m for m in PROBABILITY_METRICS if m in entry.get('metrics', ())]
  if not metrics:
    return []
  return table(['labeled', 'arm'] + _metric_header(metrics),
               _arm_rows(entry, cross_validated, metrics))


def comparisons_table(summary, protocol, task, entry, cross_validated):
  """Every paired comparison: its role, the differences and the headline metric's verdict."""
  level, metric = summary['headline']['level'], summary['headline']['metric']
  margin = summary['equivalence_margin']
  extra = [m for m in ('roc_auc',) if m in entry.get('metrics', ())]
  header = ['labeled', 'comparison', 'endpoint', 'subjects']
  header += _metric_header(results_lib.REPORT_METRICS)
  header += [f'{TITLES[m]} per subject' for m in extra]
  header.append(f'verdict ({verdicts.what(level, metric)})')
  rows = []
  for budget_entry in entry['budgets']:
    for key, comparison in budget_entry['comparisons'].items():
      cells = [budget_cell(budget_entry, cross_validated), comparison['name'],
               role(summary, protocol, task, budget_entry['budget'], key),
               f'{comparison["num_subjects"]:,}']
      for m in results_lib.REPORT_METRICS:
        cells += [difference(comparison[lv][m]) for lv in results_lib.LEVELS]
      cells += [difference(comparison['subject'][m]) for m in extra]
      cells.append(verdicts.outcome_text(comparison[level][metric]['outcome'], margin))
      rows.append(cells)
  return table(header, rows) if rows else []


def verdict_lines(summary, protocol, task, entry, cross_validated):
  """The primary comparison's verdict at each budget, in sentences, with its role."""
  key = summary['primary']['comparison']
  level = summary['headline']['level']
  other = 'slice' if level == 'subject' else 'subject'
  lines = []
  for budget_entry in entry['budgets']:
    comparison = budget_entry['comparisons'].get(key)
    where = budget_cell(budget_entry, cross_validated)
    if comparison is None:
      lines.append(f'- {where}: not both arms of {summary["primary"]["name"]} have '
                   'finished yet.')
      continue
    part = role(summary, protocol, task, budget_entry['budget'], key)
    lines.append(f'- {where}, {part}: {comparison["verdict"][level]} '
                 f'{results_lib.LEVEL_NAMES[other].capitalize()}: '
                 f'{comparison["verdict"][other]}')
  return lines


def seed_table(summary, entry, cross_validated):
  """Each seed's value of the headline metric, where a budget ran several seeds."""
  level, metric = summary['headline']['level'], summary['headline']['metric']
  key = summary['primary']['comparison']
  show = (lambda v: f'{v:.3f}') if metric in bootstrap.LOWER_IS_BETTER else (
      lambda v: f'{100 * v:.1f}')
  rows = []
  for budget_entry in entry['budgets']:
    arms = budget_entry['arms']
    if max(len(arm['seeds']) for arm in arms.values()) < 2:
      continue
    for arm_name, arm in arms.items():
      values = arm[level][metric]['seed_values']
      rows.append([budget_cell(budget_entry, cross_validated), plan_lib.ARM_NAMES[arm_name],
                   ', '.join(str(s) for s in arm['seeds']),
                   ' / '.join(show(v) for v in values),
                   f'{show(min(values))} to {show(max(values))}'])
    comparison = budget_entry['comparisons'].get(key)
    values = comparison and comparison[level][metric]['seed_values']
    if values:
      rows.append([budget_cell(budget_entry, cross_validated), comparison['name'] + ' (points)',
                   ', '.join(str(s) for s in comparison['seeds']),
                   ' / '.join(f'{v:+.1f}' for v in values),
                   f'{min(values):+.1f} to {max(values):+.1f}'])
  return table(['labeled', 'arm', 'seeds', 'per seed', 'range'], rows) if rows else []


def per_fold_table(entry, num_folds):
  header = ['labeled', 'arm', 'seed'] + [f'fold {k}' for k in range(num_folds)] + ['pooled']
  rows = []
  both = lambda f: (f'{100 * f["slice"]["balanced_accuracy"]:.1f} / '
                    f'{100 * f["subject"]["balanced_accuracy"]:.1f}')
  for budget_entry in entry['budgets']:
    for arm_name, arm in budget_entry['arms'].items():
      for seed in arm['seeds']:
        by_fold = {f['fold']: f for f in arm['per_fold'] if f['seed'] == seed}
        cells = [budget_entry['budget']['label'], plan_lib.ARM_NAMES[arm_name], str(seed)]
        cells += ['-' if by_fold.get(k) is None else both(by_fold[k]) for k in range(num_folds)]
        cells.append(both(next(p for p in arm['per_seed'] if p['seed'] == seed)))
        rows.append(cells)
  return table(header, rows)


def selection_lines(selection):
  lines = []
  for group in selection['missing']:
    folds = [f for f in group['folds'] if f is not None]
    where = (f'of fold{"s" if len(folds) > 1 else ""} {join(str(f) for f in folds)} '
             if folds else '')
    key = (group['key'] or 'selection metric').replace('_', ' ')
    lines.append(
        f'Missing classes in model selection: the {group["split"]} split {where}holds no '
        f'subject of {join(group["missing"])}, so the selection metric ({group["split"]} '
        f'{key}) averages over {join(group["averaged_over"])} only '
        f'({group["num_runs"]} of the {selection["num_trained_runs"]} trained runs).')
  return lines


def primary_tables(primary, margin):
  """The primary endpoint: its verdict per budget, then each arm's level against chance
  and against the raw-pixel floor."""
  if not primary['cells']:
    return []
  show = lambda d: '-' if d is None else difference(d)
  verdict_rows, level_rows = [], []
  for cell in primary['cells']:
    label = cell['budget']['label']
    d = cell['difference']
    verdict_rows.append([label, primary['name'], show(d),
                         'waiting for runs' if d is None else
                         verdicts.outcome_text(cell['outcome'], margin, d)
                         + (' (not every fold yet)' if cell['partial'] else ''),
                         '-' if d is None else ', '.join(map(str, cell['seeds'])),
                         '-' if d is None else f'{cell["num_subjects"]:,}'])
    chance = cell.get('chance')
    for arm, value in cell.get('arms', {}).items():
      floor = value['minus_floor']
      level_rows.append([
          label, plan_lib.ARM_NAMES[arm], interval(value, primary['metric']),
          '-' if chance is None else f'{value["against_chance"]} ({100 * chance:.1f})',
          '-' if floor is None else difference(floor),
          '-' if floor is None else verdicts.outcome_text(floor['outcome'], margin)])
  lines = table(['labeled', 'comparison', 'a − b (points)', 'verdict', 'seed ids', 'subjects'],
                verdict_rows) + ['']
  if level_rows:
    lines += table(['labeled', 'arm', f'{primary["what"]} (%)', 'against chance',
                    'arm − raw-pixel 1-NN (points)', 'verdict against the floor'],
                   level_rows) + ['']
  return lines


def control_table(control, margin):
  """The positive control: the reference protocol's a − b at every one of its budgets."""
  rows = []
  for cell in control['cells']:
    d = cell['difference']
    rows.append([cell['budget']['label'], 'yes' if cell['few_labels'] else 'no',
                 '-' if d is None else difference(d),
                 'waiting for runs' if d is None else
                 verdicts.outcome_text(cell['outcome'], margin, d)])
  return table(['labeled', 'few labels (the control)', f'{control["name"]} (points)',
                'verdict'], rows) if rows else []
