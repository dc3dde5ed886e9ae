"""results.md: the study's report, from the sweep's aggregates (`results.aggregate`).

It states the pre-registered primary endpoint (`sweep.primary`) before any number,
then answers it (`answer_sentences`): the positive control first where it did not
pass, the primary verdicts at each few-label budget, each arm's level against chance
and the raw-pixel floor, the control where it passed, how sure. Then the primary
endpoint's and the control's tables, and per protocol and task the tables of scores,
discrimination and calibration, paired comparisons (each labeled primary, positive
control or exploratory), seed spread, per-fold scores, the missing classes of model
selection, the pretraining curves, and the inflation from the honest protocol to the
reference's, step by step (`inflation.py`; where the protocols between them did not
run, cut to what it can show: several factors at once).
"""

from simclr_jax.data import splits as splits_lib
from simclr_jax.study import plan as plan_lib
from simclr_jax.study import results as results_lib
from simclr_jax.study import tables
from simclr_jax.study import verdicts

join = tables.join


def _budgets_text(budgets):
  """'1 % and 10 % of the slices', '4, 8 and 16 subjects per fold' of budget dicts."""
  budgets = [splits_lib.Budget.from_dict(b) for b in budgets]
  if budgets and all(b.unit == 'subject' and not b.is_all for b in budgets):
    sizes = [b.size for b in budgets]
    return join(str(k) for k in sizes) + (' subject' if sizes == [1] else ' subjects') + (
        ' per fold')
  return join(b.label for b in budgets) + (' of the slices' if budgets and all(
      b.unit == 'slice' for b in budgets) else '')


def _task(task):
  return task.replace('_', '-')


def primary_statement(summary):
  """The pre-registered primary endpoint in words, from the config: no result in it."""
  primary, control = summary['primary'], summary['positive_control']
  budgets = (f'at {_budgets_text(primary["budgets"])}' if primary['budgets'] else
             'at its few-label budgets (its protocol is not in this sweep)')
  text = (f'**Primary endpoint** (pre-registered in the sweep\'s config: `sweep.primary`, '
          f'`sweep.equivalence_margin`): {primary["name"]} in {primary["what"]}, '
          f'{_task(primary["task"])} task, {primary["protocol"]} protocol, {budgets}. Each '
          'budget gets one verdict from the 95 % interval of the paired difference over '
          'subjects and seeds: ahead or behind where the interval excludes 0, equivalent where '
          f'it lies inside ±{primary["margin"]:g} points, else inconclusive. ')
  if control['status'] == 'not run':
    text += 'Positive control: none (the reference protocol is not in this sweep). '
  else:
    text += (f'Positive control: the same comparison under the leaky reference protocol '
             f'({_task(control["task"])} task) at {_budgets_text(control["budgets"])}, where '
             f'{verdicts.arm_name(primary["a"])} should come out ahead. ')
  return text + 'Every other comparison in this report is exploratory.'


# ----------------------------------------------------------------------------- answer


def _cell_text(cell, primary):
  d = cell['difference']
  words = verdicts.outcome_text(cell['outcome'], primary['margin'], d)
  if cell['outcome'] in ('ahead', 'behind'):
    words = f'{verdicts.arm_name(primary["a"])} {cell["outcome"]}'
  return (f'{cell["budget"]["label"]}: {d["difference"]:+.1f} [{d["low"]:+.1f}, '
          f'{d["high"]:+.1f}] points, {words}')


def _overall(cells, primary):
  """The answer's first words, from the verdicts of the finished primary cells."""
  a, b = verdicts.arm_name(primary['a']), verdicts.arm_name(primary['b'], article=True)
  outcomes = [c['outcome'] for c in cells]
  every = 'every primary budget' if len(cells) > 1 else 'the primary budget'
  if all(o == 'ahead' for o in outcomes):
    return f'Yes: {a} is ahead of {b} at {every}.'
  if all(o == 'behind' for o in outcomes):
    return f'No, the reverse: {a} is behind {b} at {every}.'
  if all(o == 'equivalent' for o in outcomes):
    return (f'No: {a} and {b} are equivalent within ±{primary["margin"]:g} points at '
            f'{every}.')
  if all(o == 'inconclusive' for o in outcomes):
    return (f'Inconclusive: at {every} the interval of {primary["name"]} neither excludes 0 '
            f'nor lies within ±{primary["margin"]:g} points.')
  counts = [f'{verdicts.outcome_text(o, primary["margin"])} at {outcomes.count(o)}'
            for o in ('ahead', 'behind', 'equivalent', 'inconclusive') if o in outcomes]
  return f'Mixed: {a} vs {b} is {join(counts)} of the {len(cells)} primary budgets.'


def _control_cells_text(cells, margin):
  return '; '.join(f'{c["budget"]["label"]}: {tables.difference(c["difference"])} points, '
                   f'{verdicts.outcome_text(c["outcome"], margin)}'
                   for c in cells if c['difference'] is not None)


def control_sentence(control, primary):
  """The positive control's outcome in one sentence."""
  a, b = verdicts.arm_name(primary['a']), verdicts.arm_name(primary['b'], article=True)
  few = [c for c in control['cells'] if c.get('few_labels')]
  if control['status'] == 'not run':
    return ('There is no positive control: the reference protocol was not run, so a primary '
            f'result without an effect cannot be told from a weak {a} arm.')
  if control['status'] == 'waiting':
    return ('The positive control has not finished: the reference protocol\'s runs at '
            f'{_budgets_text(control["budgets"])} are missing, so a primary result without '
            f'an effect cannot yet be told from a weak {a} arm.')
  where = (f'under the leaky reference protocol ({_task(control["task"])} task, '
           f'{control["what"]}) at {_budgets_text(control["budgets"])} '
           f'({_control_cells_text(few, primary["margin"])})')
  if control['status'] == 'passed':
    return (f'The positive control passed: {where} {a} is ahead of {b}, so the pipeline '
            'finds an effect where one is there to find (the leak\'s).')
  return (f'The positive control failed: {where} {a} is not ahead of {b}, so the '
          f'{primary["protocol"]}-protocol comparison cannot tell a weak {a} arm from no '
          'effect.')


def _levels_sentence(primary):
  """Each arm's level against chance and the raw-pixel floor, at each primary budget."""
  parts = []
  for cell in primary['cells']:
    arms = []
    for arm, value in cell.get('arms', {}).items():
      notes = [value['against_chance']] if value['against_chance'] else []
      floor = value['minus_floor']
      if floor is not None:
        notes.append(f'− raw-pixel 1-NN {tables.difference(floor)}, '
                     f'{verdicts.outcome_text(floor["outcome"], primary["margin"])}')
      arms.append(f'{verdicts.arm_name(arm)} {tables.interval(value, primary["metric"])}'
                  + (f' ({"; ".join(notes)})' if notes else ''))
    if arms:
      parts.append(f'at {cell["budget"]["label"]}, ' + ', '.join(arms))
  if not parts:
    return None
  chance = next((c['chance'] for c in primary['cells'] if c.get('chance') is not None), None)
  against = f'chance ({100 * chance:.1f} %)' if chance is not None else 'chance'
  return (f'Levels ({primary["what"]}, against {against} and against the raw-pixel 1-NN '
          f'floor): {"; ".join(parts)}.')


def _primary_sentence(primary):
  if primary['status'] == 'not run':
    return (f'The primary endpoint was not run: the {_task(primary["task"])} task under the '
            f'{primary["protocol"]} protocol is not in this sweep (`sweep.tasks`, '
            '`sweep.protocols`), so every comparison below is exploratory.')
  done = [c for c in primary['cells'] if c['difference'] is not None]
  if not done:
    return (f'Not answered yet: no {primary["name"]} comparison of the primary endpoint has '
            'finished.')
  text = (f'{_overall(done, primary)} Primary endpoint ({primary["name"]}, '
          f'{primary["what"]}, {_task(primary["task"])} task, {primary["protocol"]} '
          f'protocol): {"; ".join(_cell_text(c, primary) for c in done)}')
  waiting = [c['budget']['label'] for c in primary['cells']
             if c['difference'] is None or c['partial']]
  if waiting:
    text += f'; still waiting for runs at {join(waiting)}'
  return text + '.'


def _how_sure(summary, primary):
  done = [c for c in primary['cells'] if c['difference'] is not None]
  seeds = max([len(c['seeds']) for c in done] or [1])
  subjects = max([c['num_subjects'] for c in done] or [0])
  who = f'the {subjects} test subjects' if subjects else 'the test subjects'
  seeds_text = (f'{seeds} seeds resampled with them' if seeds > 1 else '1 seed')
  return (f'How sure: 95 % percentile intervals of a stratified bootstrap over {who} '
          f'({summary["bootstrap_samples"]} resamples, {seeds_text}); "equivalent" needs the '
          f'whole interval inside ±{primary["margin"]:g} points (`sweep.equivalence_margin`), '
          '"inconclusive" means differences that large are not excluded.')


def _exploratory_sentence(summary, config):
  """The reference protocol's leak, by its floor, and the caps of the primary task."""
  parts = []
  leak = _floor_leak(summary, config)
  if leak:
    parts.append(leak)
  primary = summary['primary']
  cap = summary['protocols'].get(primary['protocol'], {}).get('tasks', {}).get(
      primary['task'], {}).get('cap')
  if cap:
    parts.append(f'{_task(primary["task"])} balanced accuracy is capped at '
                 f'{100 * cap["max_balanced_accuracy"]:.0f} % where the test subjects of '
                 f'{join(cap["classes"])} are missed (see its section)')
  if not parts:
    return None
  text = '; '.join(parts)
  return f'Exploratory: {text}.'


def answer_sentences(summary, config):
  """The report's answer, generated from the intervals (module docstring)."""
  primary, control = summary['primary'], summary['positive_control']
  sentences = []
  if control['status'] != 'passed':
    sentences.append(control_sentence(control, primary))
  sentences.append(_primary_sentence(primary))
  levels = _levels_sentence(primary)
  if levels:
    sentences.append(levels)
  if control['status'] == 'passed':
    sentences.append(control_sentence(control, primary))
  if any(c['difference'] is not None for c in primary['cells']):
    sentences.append(_how_sure(summary, primary))
  exploratory = _exploratory_sentence(summary, config)
  if exploratory:
    sentences.append(exploratory)
  return sentences


# ----------------------------------------------------------------------------- markdown


def _settings_lines(summary, config):
  """What ran and how to read the numbers."""
  units = {result.get('label_unit', 'slice') for result in summary['protocols'].values()}
  notes = []
  if 'subject' in units:
    notes.append('a number of subjects: that many of the fold\'s training subjects are '
                 'labeled, each with all of its slices, stratified by class (one subject of '
                 'each class first, the largest class first, then in proportion: '
                 'Sainte-Laguë), nested (the 4 inside the 8) and seeded; in brackets the '
                 'labeled slices per fold')
  if 'slice' in units:
    notes.append('a percentage: that share of each class\'s training slices is labeled, '
                 'nested and stratified; in brackets the labeled slices per fold (or split)')
  fraction_note = 'the label budget, ' + '; or '.join(notes)
  margin = summary['equivalence_margin']
  return [
      f'Data: `{config.data.name}`; model {config.model.name} (width {config.model.width:g}, '
      f'{config.model.encoder_output}), {config.data.image_size} px, {config.data.channels} channel(s), '
      f'batch {config.train.batch_size}; SimCLR pretraining {config.sweep.pretrain_num_epochs} epochs '
      f'(SAM: {config.pretrain.sam}, rho {config.pretrain.sam_rho:g}); fine-tuning and baseline up to '
      f'{config.train.num_epochs} epochs'
      + (f', capped at about {config.sweep.max_steps_per_run} steps per run'
         if config.sweep.max_steps_per_run else '') + '. Arms: SimCLR (the pretrained encoder '
      'fine-tuned), baseline (the same classifier trained from scratch on the same labeled '
      'images), raw-pixel 1-NN (1-nearest-neighbour by correlation of the pixels, '
      f'area-downsampled to {config.sweep.floor_image_size or "the stored"} px, from the same '
      'labeled images, no training: the floor a learned model must clear).', '',
      'How to read the numbers. Test scores in %, pooled over the folds: under '
      'cross-validation every subject is tested once, by the fold that held it out, and '
      'the scores are those of all these out-of-fold predictions together. Per slice: '
      'every test slice counts; per subject: one prediction per person, the mean of the '
      'slices\' class probabilities. Brier score (0 to 2) and ECE (expected calibration '
      'error, 15 bins) are numbers, lower is better; sensitivity (of the demented class) '
      'and specificity for the binary task. Brackets: 95 % percentile intervals of a '
      'stratified cluster bootstrap over subjects '
      f'({summary["bootstrap_samples"]:,} resamples, seeded by config.seed = '
      f'{summary["bootstrap_seed"]}): subjects are drawn with replacement within their '
      'class (each class keeps its number of subjects), each with all of their slices; '
      'both arms of a comparison are scored on the same draws (paired: same subjects, '
      'same labeled subsets); where several seeds ran, each draw also draws the seeds with '
      'replacement (the same for both arms) and averages them, so the intervals cover '
      'subjects and seeds together, and the seed spread table shows each seed. '
      'Differences are in points (a − b; 100 x the difference of fractions, Brier and ECE '
      'too). Verdicts follow the intervals and the equivalence margin of '
      f'±{margin:g} points: "ahead" when the whole interval is above 0 (below for Brier and '
      'ECE), "behind" when it is on the other side, "equivalent" when it lies inside the '
      'margin, else "inconclusive". Each comparison is labeled primary, positive control or '
      f'exploratory. "Labeled": {fraction_note}.', '']


def _wall_lines(summary):
  wall = summary.get('wall_seconds')
  if not wall:
    return []
  return [f'Wall time: {results_lib.duration(wall["runs_total"])} summed over the '
          f'{summary["num_runs"]["finished"]} finished runs of '
          f'{summary["num_runs"]["planned"]} planned ({results_lib.duration(wall["pretraining"])} '
          f'of it pretraining, {results_lib.duration(wall["floor"])} the raw-pixel floor)'
          + ('' if wall['last_invocation'] is None else
             f'; the last invocation of the sweep took '
             f'{results_lib.duration(wall["last_invocation"])}') + '.', '']


def _endpoint_lines(summary):
  primary, control = summary['primary'], summary['positive_control']
  margin = summary['equivalence_margin']
  lines = [f'## Primary endpoint: {primary["name"]}, {primary["what"]}, '
           f'{_task(primary["task"])} task, {primary["protocol"]} protocol', '']
  lines += [_primary_sentence(primary), '']
  lines += tables.primary_tables(primary, margin)
  lines += ['## Positive control: the leaky reference protocol', '',
            control_sentence(control, primary), '']
  control_rows = tables.control_table(control, margin)
  if control_rows:
    lines += control_rows + ['']
  return lines


def _task_lines(summary, protocol, result, task, entry):
  cross_validated = bool(result['num_folds'])
  class_names = entry['class_names']
  pooled = (f'pooled over {entry["folds_pooled"]} of {entry["folds_planned"]} folds'
            if cross_validated else 'one split')
  per_class = ', '.join(f'{n} {c}' for n, c in zip(entry['subjects_per_class'], class_names))
  lines = [f'### `{protocol}`, task `{task}` ({len(class_names)} classes)', '',
           f'Test: {entry["num_test_subjects"]:,} subjects ({per_class}), '
           f'{entry["num_test_slices"]:,} slices, {pooled}. Always answering the '
           f'majority class scores {100 * entry["majority_share"]:.1f} % accuracy '
           f'per slice and {100 * entry["subject_majority_share"]:.1f} % per subject; '
           f'chance balanced accuracy is {100 / len(class_names):.1f} %.', '']
  if entry.get('cap'):
    lines += [tables.cap_note(task, entry['cap'], len(class_names)), '']
  lines += ['#### Test scores (%, 95 % interval)', '']
  lines += tables.scores_table(entry, cross_validated) + ['']
  probability = tables.probability_table(entry, cross_validated)
  if probability:
    lines += ['#### Discrimination and calibration (95 % interval; ROC AUC, sensitivity '
              'and specificity in %, Brier and ECE lower is better)', '']
    lines += probability + ['']
  lines += ['#### Paired comparisons (a − b, points, 95 % interval)', '']
  lines += tables.comparisons_table(summary, protocol, task, entry, cross_validated) + ['']
  lines += tables.verdict_lines(summary, protocol, task, entry, cross_validated) + ['']
  seeds = tables.seed_table(summary, entry, cross_validated)
  if seeds:
    lines += [f'#### Seed spread ({verdicts.what(**summary["headline"])}, each seed\'s '
              'pooled value)', ''] + seeds + ['']
  if cross_validated:
    lines += ['#### Balanced accuracy per fold (%, per slice / per subject)', '']
    lines += tables.per_fold_table(entry, result['num_folds']) + ['']
  selection = tables.selection_lines(entry['selection'])
  return lines + (selection + [''] if selection else [])


def _protocol_lines(summary, config, protocol, result):
  description = result['description']
  lines = [f'## Protocol `{protocol}`', '', f'{description[0].upper()}{description[1:]}.', '']
  if protocol == 'reference':
    lines += [f'Still otherwise than the reference: {plan_lib.REFERENCE_DIFFERENCES}.', '']
  budgets = plan_lib.protocol_budgets(config, protocol)
  per_fold = ' per fold' if result['num_folds'] else ''
  lines += [f'Label budgets: {join(b.label for b in budgets)}'
            + (f' (training subjects{per_fold}, each with all of its training slices).'
               if budgets[0].unit == 'subject' else ' of the training slices.'), '']
  ran = plan_lib.protocol_tasks(config, protocol)
  left_out = [t for t in config.sweep.tasks if t not in ran]
  if left_out:
    lines += [f'Left out under this protocol: the {join(left_out)} '
              f'task{"s" if len(left_out) > 1 else ""} '
              f'(`--config.sweep.reference_tasks` ran only {join(ran)}).', '']
  if not result['tasks']:
    lines += ['No run of this protocol has finished yet.', '']
  for task, entry in result['tasks'].items():
    lines += _task_lines(summary, protocol, result, task, entry)
  return lines


def _floor_leak(summary, config):
  """The raw-pixel 1-NN's accuracy before and after the honest protocol's first step."""
  rows = [r for r in (summary['inflation'] or {}).get('rows', ())
          if r['arm'] == 'floor' and r['from'] == 'honest']
  if not rows:
    return None
  row = max(rows, key=lambda r: (r['task'] == config.sweep.tasks[0],
                                 results_lib.budget_of(r).sort_key))
  value = row['slice']['accuracy']
  where = (f'on the same {row["compared"]["slices"]:,} test slices' if row['paired'] else
           'on different test slices')
  alone = ' alone' if row['one_factor'] else ' among the other factors of this step'
  return (f'under the {row["to"]} protocol (the slice split{alone}) the raw-pixel 1-NN, '
          f'which learns nothing, scores {100 * value["to"]:.1f} % accuracy per slice '
          f'against {100 * value["from"]:.1f} % under the honest protocol {where} '
          f'({_task(row["task"])}, {tables.inflation_budget(row)}): the slice split rewards '
          'finding a person\'s other slices')


def _steps_lines(inflation):
  """The steps in words, and what the table cannot show where protocols did not run."""
  lines = []
  for number, step in enumerate(inflation['steps'], 1):
    other = plan_lib.PROTOCOL_FACTORS['reference'][-1]
    added = join(f'{f} ({plan_lib.REFERENCE_OTHER_CHOICES})' if f == other else f
                 for f in step['factors'])
    several = '' if step['one_factor'] else 'several factors at once: '
    lines.append(f'{number}. `{step["from"]}` → `{step["to"]}` adds {several}{added}.')
  skipped = [f'`{p}`' for p in inflation['skipped']]
  if skipped and {'honest', 'reference'} <= set(inflation['chain']):
    what = ('It compares the honest and the reference protocol with several factors '
            'changed at once' if len(inflation['chain']) == 2 else
            'A step that adds several factors at once')
    lines += ['', f'**Cut to what it can show**: {join(skipped)} did not run '
              f'(`sweep.protocols`). {what}, so it cannot say how much each of them '
              'inflates the scores; `--config.sweep.protocols` with all of '
              f'{join(f"`{p}`" for p in plan_lib.PROTOCOLS)} adds one at a time.']
  return lines + ['']


def _inflation_lines(summary):
  inflation = summary['inflation']
  steps = inflation['steps']
  if len(steps) == 1 and steps[0]['skipped']:
    title = f'`{steps[0]["from"]}` vs `{steps[0]["to"]}`, several factors at once'
  else:
    title = ('from the honest protocol to the reference\'s, step by step'
             + (' (some steps add several factors at once)'
                if any(s['skipped'] for s in steps) else ''))
  lines = [f'## Inflation: {title}', '']
  lines += _steps_lines(inflation)
  lines += ['Balanced accuracy before → after each step (%) and its change (after − before, '
            'points). Paired where the two protocols tested slices in common: both '
            'protocols\' pooled predictions restricted to those slices (the honest '
            'protocol\'s out-of-fold predictions of the slices a slice split tested; the '
            'slice-split protocols, reference included, test the same slices), each subject '
            'scored on its slices both tested, with the 95 % interval of a stratified '
            'bootstrap over those subjects (both protocols on the same resamples); these '
            'scores can differ from each protocol\'s own, over its whole test split. '
            'Unpaired where they share no test slice: the difference of the two protocols\' '
            'own scores, with no interval (different test sets have no paired one). Budgets '
            'match where equal, and all labels match across units (all subjects, 100 % of '
            'the slices).', '']
  if inflation['rows']:
    lines += tables.inflation_table(inflation['rows']) + ['']
  else:
    lines += ['No step has both of its protocols\' runs at a matching budget yet.', '']
  honest = summary['protocols'].get('honest', {}).get('tasks', {})
  capped = [(task, honest[task]['cap']) for task in dict.fromkeys(
      row['task'] for row in inflation['rows'] if row['from'] == 'honest')
            if honest.get(task, {}).get('cap')]
  for task, cap in capped:
    lines += [f'The honest {task} scores are capped at '
              f'{100 * cap["max_balanced_accuracy"]:.0f} % balanced accuracy where the test '
              f'subjects of {join(cap["classes"])} are missed (see its section).', '']
  return lines


def results_markdown(summary, config, figures=()):
  """results.md: the primary endpoint, the answer, the figures, then the tables."""
  lines = ['# Does SimCLR pretraining beat supervised training at few labels?', '',
           primary_statement(summary), '',
           '**Answer.** ' + ' '.join(summary['answer']), '']
  if 'label_fraction_curve.png' in figures:
    lines += ['![Balanced accuracy and accuracy against the label budget, per protocol '
              'and task, with 95 % intervals over subjects](label_fraction_curve.png)', '']
  lines += _settings_lines(summary, config) + _wall_lines(summary)
  lines += _endpoint_lines(summary)
  for protocol, result in summary['protocols'].items():
    lines += _protocol_lines(summary, config, protocol, result)
  if 'pretraining_curves.png' in figures:
    lines += ['## Pretraining curves', '',
              'Each fold\'s SimCLR pretraining: the NT-Xent loss of its training batches, and '
              'the kNN (k = 1) and linear-probe balanced accuracy of its embeddings on the '
              'selection split (the fold\'s validation subjects under the honest protocol, '
              'the validation slices under slice_split and slice_split_transductive, the '
              'test split under the reference protocol, which only monitors it), from '
              'each pretraining\'s curves.jsonl.', '',
              '![NT-Xent loss, kNN and linear-probe balanced accuracy of each fold\'s '
              'pretraining](pretraining_curves.png)', '']
  if 'confusion_matrices.png' in figures:
    lines += ['## Confusion matrices', '',
              '![Pooled out-of-fold confusion matrices of each arm, per slice and per '
              'subject](confusion_matrices.png)', '']
  if 'gradcam_grid.png' in figures:
    lines += ['## Where the SimCLR model looks', '',
              '![Grad-CAM of the most confident test image of each predicted class]'
              '(gradcam_grid.png)', '']
  if summary['inflation']:
    lines += _inflation_lines(summary)
  return '\n'.join(lines)
