"""The study's verdicts: the pre-registered primary endpoint, the positive control, arm levels.

The primary endpoint is fixed in the sweep's config before any run
(`sweep.primary`: protocol, task, level, metric, comparison, and which budgets
count as few labels), with an equivalence margin (`sweep.equivalence_margin`,
points). Each of its budgets gets one of four verdicts from the 95 % interval of
the paired difference a − b (`bootstrap.equivalence_outcome`): ahead (the interval
lies above 0), behind (below 0), equivalent (inside ±margin), or inconclusive
(neither: differences that matter are not excluded). Every other comparison of
the report is exploratory.

The positive control is the same comparison under the leaky reference protocol
at its few-label fractions, where SimCLR should come out ahead: if it does not,
the pipeline cannot tell a weak SimCLR arm from no effect, and the report says
so before any honest-protocol claim.

Each arm's level at the primary budgets is stated against chance (`chance`) and
against the raw-pixel floor (the paired arm − floor difference).
"""

from simclr_jax.data import splits as splits_lib
from simclr_jax.metrics import bootstrap
from simclr_jax.study import plan as plan_lib

# What a config without `sweep.primary` (one written before it existed) is read with.
DEFAULTS = {'protocol': 'honest', 'task': 'binary', 'level': 'subject',
            'metric': 'balanced_accuracy', 'comparison': 'finetune-baseline',
            'max_subjects': 16, 'max_fraction': 0.1}
DEFAULT_MARGIN = 5.0
CONTROL_PROTOCOL = 'reference'
COMPARISONS = ('finetune-baseline', 'probe-baseline', 'finetune-floor', 'probe-floor',
               'baseline-floor')
LEVEL_NAMES = {'slice': 'per slice', 'subject': 'per subject'}
METRIC_NAMES = {'accuracy': 'accuracy', 'balanced_accuracy': 'balanced accuracy',
                'macro_f1': 'macro-F1', 'roc_auc': 'ROC AUC', 'sensitivity': 'sensitivity',
                'specificity': 'specificity', 'brier': 'Brier score',
                'ece': 'expected calibration error'}


def settings(config):
  """The primary endpoint: `sweep.primary`'s fields, 'a', 'b' (the arms) and 'margin'."""
  primary = config.sweep.get('primary') or {}
  values = {key: primary.get(key, default) for key, default in DEFAULTS.items()}
  values['a'], values['b'] = values['comparison'].split('-')
  values['margin'] = float(config.sweep.get('equivalence_margin', DEFAULT_MARGIN))
  return values


def what(level, metric):
  """'balanced accuracy per subject'."""
  return f'{METRIC_NAMES[metric]} {LEVEL_NAMES[level]}'


def arm_name(arm, article=False):
  """'SimCLR', 'baseline' ('the supervised baseline'), 'raw-pixel 1-NN' ('the raw-pixel 1-NN floor')."""
  if not article:
    return plan_lib.ARM_NAMES[arm]
  return {'baseline': 'the supervised baseline', 'floor': 'the raw-pixel 1-NN floor'}.get(
      arm, plan_lib.ARM_NAMES[arm])


def few_label_budgets(config, protocol):
  """The protocol's few-label budgets: subjects up to max_subjects, fractions up to
  max_fraction (`sweep.primary`), or its smallest budget."""
  primary = settings(config)
  budgets = plan_lib.protocol_budgets(config, protocol)
  few = [b for b in budgets if not b.is_all and b.size <= (
      primary['max_subjects'] if b.unit == 'subject' else primary['max_fraction'] + 1e-9)]
  return few or list(budgets[:1])


def outcome(difference, margin, metric):
  """ahead | behind | equivalent | inconclusive of a − b (`bootstrap.equivalence_outcome`)."""
  return bootstrap.equivalence_outcome(difference, margin, metric in bootstrap.LOWER_IS_BETTER)


def outcome_text(result, margin, difference=None):
  """A verdict in a few words; with `difference`, an inconclusive one names its interval."""
  if result == 'equivalent':
    return f'equivalent within ±{margin:g}'
  if result == 'inconclusive' and difference is not None:
    return (f'inconclusive: differences from {difference["low"]:+.1f} to '
            f'{difference["high"]:+.1f} points are not excluded')
  return result


def chance(task_entry, level, metric):
  """The score of answering without looking: 1/K balanced accuracy, the majority's
  accuracy, 0.5 ROC AUC; None for the other metrics."""
  if metric == 'balanced_accuracy':
    return 1.0 / len(task_entry['class_names'])
  if metric == 'accuracy':
    return task_entry['subject_majority_share' if level == 'subject' else 'majority_share']
  if metric == 'roc_auc':
    return 0.5
  return None


def against_chance(value, level):
  """above chance | below chance | at chance (the interval holds it) | None."""
  if level is None:
    return None
  if value['low'] > level:
    return 'above chance'
  if value['high'] < level:
    return 'below chance'
  return 'at chance'


def _budget_entry(task_entry, budget):
  return next((e for e in task_entry['budgets']
               if splits_lib.Budget.from_dict(e['budget']) == budget), None)


def _partial(budget_entry):
  return any(arm['folds_pooled'] < arm['folds_planned']
             for arm in budget_entry['arms'].values())


def _cell(budget_entry, budget, primary, task_entry):
  """One budget of the primary endpoint (or the control): the difference, its verdict,
  each arm's level against chance and the floor."""
  level, metric, margin = primary['level'], primary['metric'], primary['margin']
  cell = {'budget': budget.to_dict(), 'difference': None}
  if budget_entry is None:
    return cell
  comparison = budget_entry['comparisons'].get(primary['comparison'])
  if comparison is not None:
    difference = comparison[level][metric]
    cell.update(difference=difference, outcome=difference['outcome'],
                num_subjects=comparison['num_subjects'], seeds=comparison['seeds'],
                partial=_partial(budget_entry),
                verdict=bootstrap.verdict(
                    difference, arm_name(primary['a']), arm_name(primary['b'], True),
                    what(level, metric), margin=margin,
                    lower_is_better=metric in bootstrap.LOWER_IS_BETTER))
  level_of_chance = chance(task_entry, level, metric)
  cell['chance'] = level_of_chance
  cell['arms'] = {}
  for arm, entry in budget_entry['arms'].items():
    value = entry[level][metric]
    floor = budget_entry['comparisons'].get(f'{arm}-floor')
    cell['arms'][arm] = {
        **value, 'against_chance': against_chance(value, level_of_chance),
        'minus_floor': None if floor is None else floor[level][metric]}
  return cell


def _status(cells):
  if not cells or any(c['difference'] is None or c['partial'] for c in cells):
    return 'waiting'
  return 'answered'


def primary_endpoint(summary, config):
  """The primary endpoint's settings, its cells (one per few-label budget) and status.

  Status: 'answered' (every cell's runs finished), 'waiting' (some not yet), or
  'not run' (the protocol or the task is not in the sweep).
  """
  primary = settings(config)
  result = {**primary, 'name': f'{arm_name(primary["a"])} − {arm_name(primary["b"])}',
            'what': what(primary['level'], primary['metric']), 'cells': []}
  protocol = summary['protocols'].get(primary['protocol'])
  budgets = (few_label_budgets(config, primary['protocol'])
             if primary['protocol'] in config.sweep.protocols else [])
  result['budgets'] = [b.to_dict() for b in budgets]
  task_entry = (protocol or {}).get('tasks', {}).get(primary['task'])
  ran = (primary['protocol'] in config.sweep.protocols
         and primary['task'] in plan_lib.protocol_tasks(config, primary['protocol']))
  if not ran:
    result['status'] = 'not run'
    return result
  if task_entry is None:
    result['status'] = 'waiting'
    return result
  result['cells'] = [_cell(_budget_entry(task_entry, b), b, primary, task_entry)
                     for b in budgets]
  result['status'] = _status(result['cells'])
  return result


def positive_control(summary, config):
  """The primary comparison under the reference protocol, at every one of its budgets.

  Its task: the primary task where the reference protocol ran it, else its first.
  Status: 'passed' (a ahead of b at every few-label fraction), 'failed' (not ahead
  at some), 'waiting' (runs missing), 'not run' (no reference protocol).
  """
  primary = settings(config)
  result = {'protocol': CONTROL_PROTOCOL, 'level': primary['level'],
            'metric': primary['metric'], 'comparison': primary['comparison'],
            'name': f'{arm_name(primary["a"])} − {arm_name(primary["b"])}',
            'what': what(primary['level'], primary['metric']), 'cells': []}
  if CONTROL_PROTOCOL not in config.sweep.protocols:
    result.update(status='not run', budgets=[], task=None)
    return result
  tasks = plan_lib.protocol_tasks(config, CONTROL_PROTOCOL)
  result['task'] = primary['task'] if primary['task'] in tasks else tasks[0]
  few = few_label_budgets(config, CONTROL_PROTOCOL)
  result['budgets'] = [b.to_dict() for b in few]
  task_entry = summary['protocols'].get(CONTROL_PROTOCOL, {}).get('tasks', {}).get(
      result['task'])
  if task_entry is None:
    result['status'] = 'waiting'
    return result
  for budget in plan_lib.protocol_budgets(config, CONTROL_PROTOCOL):
    cell = _cell(_budget_entry(task_entry, budget), budget, primary, task_entry)
    cell['few_labels'] = budget in few
    result['cells'].append(cell)
  few_cells = [c for c in result['cells'] if c['few_labels']]
  if _status(few_cells) == 'waiting':
    result['status'] = 'waiting'
  else:
    result['status'] = ('passed' if all(c['outcome'] == 'ahead' for c in few_cells)
                        else 'failed')
  return result
