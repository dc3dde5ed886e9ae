"""results.md: the study's report, from the sweep's aggregates (`results_lib.aggregate`).

It opens with a plain answer (does SimCLR beat supervised training at few labels,
under which protocol, how sure), generated from the intervals, then per protocol
and task the tables of scores, paired comparisons and verdicts, per-fold scores,
the missing classes of model selection, and the honest-vs-reference inflation.
"""

from simclr_jax.study import plan as plan_lib
from simclr_jax.study import results as results_lib


# ----------------------------------------------------------------------------- answer


def _few_label_fractions(config):
  few = [f for f in config.sweep.fractions if f <= results_lib.FEW_LABELS_MAX_FRACTION + 1e-9]
  return sorted(few) if few else [min(config.sweep.fractions)]


def _and(items):
  items = list(items)
  if len(items) <= 1:
    return ''.join(items)
  return ', '.join(items[:-1]) + ' and ' + items[-1]


def _simclr_comparisons(summary, protocol, fractions):
  """[(task, fraction, comparison or None)] of SimCLR − baseline at `fractions`."""
  result = summary['protocols'].get(protocol)
  found = []
  for task, entry in (result or {}).get('tasks', {}).items():
    by_fraction = {results_lib._fraction_key(e['fraction']): e for e in entry['fractions']}
    for fraction in fractions:
      fraction_entry = by_fraction.get(results_lib._fraction_key(fraction), {})
      found.append((task, fraction,
                    fraction_entry.get('comparisons', {}).get('finetune-baseline')))
  return found


def _outcome_counts(comparisons):
  outcomes = [c[results_lib.HEADLINE_LEVEL][results_lib.HEADLINE_METRIC]['outcome'] for _, _, c in comparisons]
  return {o: outcomes.count(o) for o in ('ahead', 'behind', 'no difference detectable')}


def _counts_text(counts, total, noun, the='the'):
  """'ahead in 1 and not detectably different in 2 of the 3 {noun}' (zero counts left out)."""
  parts = [f'{name} in {counts[outcome]}' for outcome, name in (
      ('ahead', 'ahead'), ('behind', 'behind'),
      ('no difference detectable', 'not detectably different')) if counts[outcome]]
  return f'{_and(parts)} of {the} {total} {noun}'


def answer_sentences(summary, config):
  """The report's opening: three sentences generated from the intervals.

  1. Does SimCLR beat the supervised baseline at few labels (the fractions up to
     results_lib.FEW_LABELS_MAX_FRACTION), by the headline level and metric? 2. Under which
     protocol, and what the reference protocol says. 3. How sure: the intervals.
  """
  protocol = results_lib.ANSWER_PROTOCOL if results_lib.ANSWER_PROTOCOL in summary['protocols'] else config.sweep.protocols[0]
  fractions = _few_label_fractions(config)
  fraction_text = _and(plan_lib.percent_label(f) for f in fractions)
  what = (f'{plan_lib.METRIC_TITLES[results_lib.HEADLINE_METRIC].lower()} '
          f'{results_lib.LEVEL_NAMES[results_lib.HEADLINE_LEVEL]}')
  found = _simclr_comparisons(summary, protocol, fractions)
  done = [c for c in found if c[2] is not None]
  if not done:
    return [f'Not answered yet: no SimCLR and baseline runs of the {protocol} protocol '
            f'have finished at {fraction_text} of the labels.',
            f'The {protocol} protocol is {plan_lib.PROTOCOL_DESCRIPTIONS[protocol]}.',
            'The intervals follow once both arms have finished runs.']
  differences = [c[results_lib.HEADLINE_LEVEL][results_lib.HEADLINE_METRIC]['difference'] for _, _, c in done]
  span = (f'{min(differences):+.1f}' if len(differences) == 1 else
          f'{min(differences):+.1f} to {max(differences):+.1f}')
  counts = _outcome_counts(done)
  tasks = _and(task.replace('_', '-') for task in config.sweep.tasks
               if any(t == task for t, _, _ in done))
  where = f'with few labels ({fraction_text}; {tasks} task{"s" if "and" in tasks else ""})'
  if counts['ahead'] == len(done):
    first = (f'Yes: {where}, SimCLR fine-tuning beats the supervised baseline here, by '
             f'{span} points of {what}.')
  elif counts['behind'] == len(done):
    first = (f'No, the reverse: {where}, SimCLR fine-tuning is behind the supervised '
             f'baseline here, by {span} points of {what}.')
  elif counts['no difference detectable'] == len(done):
    first = (f'Not detectably: {where}, SimCLR fine-tuning and the supervised baseline '
             f'differ by {span} points of {what}, which this many subjects cannot tell '
             'apart from no difference.')
  else:
    first = (f'Not consistently: {where}, SimCLR fine-tuning is '
             f'{_counts_text(counts, len(done), "comparisons with the supervised baseline")}'
             f' ({span} points of {what}).')
  result = summary['protocols'][protocol]
  if result['num_folds']:
    how = (f'{result["num_folds"]}-fold cross-validation grouped by subject, every subject '
           'tested once, out of fold, checkpoints chosen on validation subjects')
  else:
    how = plan_lib.PROTOCOL_DESCRIPTIONS[protocol]
  second = f'That is under the {protocol} protocol ({how})'
  other = 'reference' if protocol != 'reference' else None
  other_done = ([c for c in _simclr_comparisons(summary, other, fractions) if c[2]]
                if other in summary['protocols'] else [])
  if other_done:
    second += ('; under the reference protocol\'s slice split SimCLR is '
               + _counts_text(_outcome_counts(other_done), len(other_done),
                              'comparisons', the='the same'))
    floor = [r for r in summary['inflation'] if r['arm'] == 'floor']
    if floor:
      row = max(floor, key=lambda r: (r['task'] == config.sweep.tasks[0], r['fraction']))
      second += (f', and its raw-pixel 1-NN, which learns nothing, scores '
                 f'{100 * row["accuracy"]["reference"]:.1f} % accuracy against '
                 f'{100 * row["accuracy"]["honest"]:.1f} % under the honest protocol '
                 f'({row["task"].replace("_", "-")}, {plan_lib.percent_label(row["fraction"])}'
                 ' of the labels): the slice split rewards finding a person\'s other slices')
  elif other is not None and other not in summary['protocols']:
    second += '; the reference protocol was not run'
  second += '.'
  num_subjects = max(c['num_subjects'] for _, _, c in done)
  seeds = max(len(c['seeds']) for _, _, c in done)
  intervals = '; '.join(
      f'{task.replace("_", "-")} {plan_lib.percent_label(fraction)}: '
      f'[{c[results_lib.HEADLINE_LEVEL][results_lib.HEADLINE_METRIC]["low"]:+.1f}, '
      f'{c[results_lib.HEADLINE_LEVEL][results_lib.HEADLINE_METRIC]["high"]:+.1f}]'
      for task, fraction, c in done)
  third = (f'How sure: the 95 % intervals of SimCLR − baseline over the {num_subjects} '
           f'test subjects (stratified bootstrap over subjects, '
           f'{summary["bootstrap_samples"]} resamples, {seeds} seed'
           f'{"s" if seeds > 1 else ""}{" averaged" if seeds > 1 else ""}) are {intervals} '
           'points')
  incomplete = len(found) - len(done)
  partial = [c for t, f, c in done if _partial(summary, protocol, t, f)]
  if incomplete or partial:
    third += (f', with {incomplete + len(partial)} of the {len(found)} comparisons still '
              'waiting for runs')
  third += '; an interval that contains 0 means no difference was detected.'
  return [first, second, third]


def _partial(summary, protocol, task, fraction):
  entry = next(e for e in summary['protocols'][protocol]['tasks'][task]['fractions']
               if results_lib._fraction_key(e['fraction']) == results_lib._fraction_key(fraction))
  return any(arm['folds_pooled'] < arm['folds_planned'] for arm in entry['arms'].values())


# ----------------------------------------------------------------------------- markdown


def _interval(value):
  """'45.1 [40.2, 50.3]' of a {'value', 'low', 'high'} fraction."""
  return f'{100 * value["value"]:.1f} [{100 * value["low"]:.1f}, {100 * value["high"]:.1f}]'


def _difference(value):
  return f'{value["difference"]:+.1f} [{value["low"]:+.1f}, {value["high"]:+.1f}]'


def _fraction_label(entry, cross_validated):
  per_fold = ' per fold' if cross_validated else ''
  return f'{plan_lib.percent_label(entry["fraction"])} ({entry["num_labeled"]:,}{per_fold})'


def _table(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] * 2 + ['---:'] * (len(header) - 2)) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return lines


def _folds_note(arm):
  if arm['folds_pooled'] < arm['folds_planned']:
    return f' ({arm["folds_pooled"]} of {arm["folds_planned"]} folds)'
  return ''


def _scores_table(entry, cross_validated):
  header = ['labeled', 'arm', 'subjects', 'slices']
  for metric in results_lib.REPORT_METRICS:
    header += [f'{plan_lib.METRIC_TITLES[metric]} {results_lib.LEVEL_NAMES[level]}' for level in results_lib.LEVELS]
  header.append('seeds')
  rows = []
  for fraction_entry in entry['fractions']:
    for arm_name, arm in fraction_entry['arms'].items():
      cells = [_fraction_label(fraction_entry, cross_validated),
               plan_lib.ARM_NAMES[arm_name] + _folds_note(arm),
               f'{arm["num_subjects"]:,}', f'{arm["num_slices"]:,}']
      for metric in results_lib.REPORT_METRICS:
        cells += [_interval(arm[level][metric]) for level in results_lib.LEVELS]
      cells.append(str(len(arm['seeds'])))
      rows.append(cells)
  return _table(header, rows)


def _comparisons_table(entry, cross_validated):
  header = ['labeled', 'comparison', 'subjects']
  for metric in results_lib.REPORT_METRICS:
    header += [f'{plan_lib.METRIC_TITLES[metric]} {results_lib.LEVEL_NAMES[level]}' for level in results_lib.LEVELS]
  header.append(f'verdict ({plan_lib.METRIC_TITLES[results_lib.HEADLINE_METRIC].lower()} '
                f'{results_lib.LEVEL_NAMES[results_lib.HEADLINE_LEVEL]})')
  rows = []
  for fraction_entry in entry['fractions']:
    for comparison in fraction_entry['comparisons'].values():
      cells = [_fraction_label(fraction_entry, cross_validated), comparison['name'],
               f'{comparison["num_subjects"]:,}']
      for metric in results_lib.REPORT_METRICS:
        cells += [_difference(comparison[level][metric]) for level in results_lib.LEVELS]
      cells.append(comparison[results_lib.HEADLINE_LEVEL][results_lib.HEADLINE_METRIC]['outcome'])
      rows.append(cells)
  return _table(header, rows) if rows else []


def _per_fold_table(entry, num_folds):
  header = ['labeled', 'arm', 'seed'] + [f'fold {k}' for k in range(num_folds)] + ['pooled']
  rows = []
  for fraction_entry in entry['fractions']:
    for arm_name, arm in fraction_entry['arms'].items():
      for seed in arm['seeds']:
        by_fold = {f['fold']: f for f in arm['per_fold'] if f['seed'] == seed}
        cells = [plan_lib.percent_label(fraction_entry['fraction']),
                 plan_lib.ARM_NAMES[arm_name], str(seed)]
        for k in range(num_folds):
          f = by_fold.get(k)
          cells.append('-' if f is None else
                       f'{100 * f["slice"]["balanced_accuracy"]:.1f} / '
                       f'{100 * f["subject"]["balanced_accuracy"]:.1f}')
        pooled = next(p for p in arm['per_seed'] if p['seed'] == seed)
        cells.append(f'{100 * pooled["slice"]["balanced_accuracy"]:.1f} / '
                     f'{100 * pooled["subject"]["balanced_accuracy"]:.1f}')
        rows.append(cells)
  return _table(header, rows)


def _selection_lines(selection):
  lines = []
  for group in selection['missing']:
    folds = [f for f in group['folds'] if f is not None]
    where = (f'of fold{"s" if len(folds) > 1 else ""} {_and(str(f) for f in folds)} '
             if folds else '')
    key = (group['key'] or 'selection metric').replace('_', ' ')
    lines.append(
        f'Missing classes in model selection: the {group["split"]} split {where}holds no '
        f'subject of {_and(group["missing"])}, so the selection metric ({group["split"]} '
        f'{key}) averages over {_and(group["averaged_over"])} only '
        f'({group["num_runs"]} of the {selection["num_trained_runs"]} trained runs).')
  return lines


def _md_verdicts(entry, cross_validated):
  lines = []
  for fraction_entry in entry['fractions']:
    comparison = fraction_entry['comparisons'].get('finetune-baseline')
    if comparison is None:
      lines.append(f'- {_fraction_label(fraction_entry, cross_validated)}: not both '
                   'SimCLR and the baseline have finished yet.')
      continue
    lines.append(f'- {_fraction_label(fraction_entry, cross_validated)}: '
                 f'{comparison["verdict"][results_lib.HEADLINE_LEVEL]} Per slice: '
                 f'{comparison["verdict"]["slice"]}')
  return lines


def results_markdown(summary, config, figures=()):
  """results.md: the answer, the figures, then per protocol and task the tables."""
  lines = ['# Does SimCLR pretraining beat supervised training at few labels?', '',
           '**Answer.** ' + ' '.join(summary['answer']), '']
  if 'label_fraction_curve.png' in figures:
    lines += ['![Balanced accuracy and accuracy against the label fraction, per protocol '
              'and task, with 95 % intervals over subjects](label_fraction_curve.png)', '']
  fraction_note = ('labeled images per fold (the training subjects\' slices at that '
                   'fraction, nested and stratified)')
  lines += [
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
      'slices\' class probabilities. Brackets: 95 % percentile intervals of a stratified '
      'cluster bootstrap over subjects '
      f'({summary["bootstrap_samples"]:,} resamples, seeded by config.seed = '
      f'{summary["bootstrap_seed"]}): subjects are drawn with replacement within their '
      'class (each class keeps its number of subjects), each with all of their slices; '
      'both arms of a comparison are scored on the same draws (paired: same subjects, '
      'same labeled subsets); where several seeds ran, the statistic of a draw is the '
      'mean over the seeds, so the intervals are over subjects with seeds averaged, not '
      'over seeds. Differences are in points (a − b). Verdicts follow the intervals: '
      '"ahead" when the whole interval is above 0, "behind" when it is below 0, else no '
      f'difference detectable at this sample size. "Labeled": {fraction_note}.', '']
  wall = summary.get('wall_seconds')
  if wall:
    lines += [f'Wall time: {results_lib.duration(wall["runs_total"])} summed over the '
              f'{summary["num_runs"]["finished"]} finished runs of '
              f'{summary["num_runs"]["planned"]} planned ({results_lib.duration(wall["pretraining"])} '
              f'of it pretraining, {results_lib.duration(wall["floor"])} the raw-pixel floor)'
              + ('' if wall['last_invocation'] is None else
                 f'; the last invocation of the sweep took '
                 f'{results_lib.duration(wall["last_invocation"])}') + '.', '']
  for protocol, result in summary['protocols'].items():
    cross_validated = bool(result['num_folds'])
    description = result['description']
    lines += [f'## Protocol `{protocol}`', '',
              f'{description[0].upper()}{description[1:]}.', '']
    if protocol == 'reference':
      lines += [f'Still otherwise than the reference: {plan_lib.REFERENCE_DIFFERENCES}.', '']
    ran = plan_lib.protocol_tasks(config, protocol)
    left_out = [t for t in config.sweep.tasks if t not in ran]
    if left_out:
      lines += [f'Left out under this protocol: the {_and(left_out)} task '
                f'(`--config.sweep.reference_tasks` ran only {_and(ran)}).', '']
    if not result['tasks']:
      lines += ['No run of this protocol has finished yet.', '']
    for task, entry in result['tasks'].items():
      class_names = entry['class_names']
      pooled = (f'pooled over {entry["folds_pooled"]} of {entry["folds_planned"]} folds'
                if cross_validated else 'one split')
      per_class = ', '.join(f'{n} {c}' for n, c in zip(entry['subjects_per_class'],
                                                        class_names))
      lines += [f'### `{protocol}`, task `{task}` ({len(class_names)} classes)', '',
                f'Test: {entry["num_test_subjects"]:,} subjects ({per_class}), '
                f'{entry["num_test_slices"]:,} slices, {pooled}. Always answering the '
                f'majority class scores {100 * entry["majority_share"]:.1f} % accuracy '
                f'per slice and {100 * entry["subject_majority_share"]:.1f} % per subject; '
                f'chance balanced accuracy is {100 / len(class_names):.1f} %.', '',
                '#### Test scores (%, 95 % interval)', '']
      lines += _scores_table(entry, cross_validated) + ['']
      lines += ['#### Paired comparisons (a − b, points, 95 % interval)', '']
      lines += _comparisons_table(entry, cross_validated) + ['']
      lines += _md_verdicts(entry, cross_validated) + ['']
      if cross_validated:
        lines += ['#### Balanced accuracy per fold (%, per slice / per subject)', '']
        lines += _per_fold_table(entry, result['num_folds']) + ['']
      selection = _selection_lines(entry['selection'])
      if selection:
        lines += selection + ['']
  if 'confusion_matrices.png' in figures:
    lines += ['## Confusion matrices', '',
              '![Pooled out-of-fold confusion matrices of each arm, per slice and per '
              'subject](confusion_matrices.png)', '']
  if 'gradcam_grid.png' in figures:
    lines += ['## Where the SimCLR model looks', '',
              '![Grad-CAM of the most confident test image of each predicted class]'
              '(gradcam_grid.png)', '']
  if summary['inflation']:
    lines += ['## Honest vs reference protocol: how much the reference\'s choices inflate '
              'the scores', '',
              'Pooled test scores per slice under each protocol and the difference '
              '(reference − honest, in points): what the reference\'s numbers owe to its '
              'slice split, transductive pretraining and test-set selection (different '
              'test sets, so no paired interval).', '']
    rows = []
    for row in summary['inflation']:
      cells = [row['task'], plan_lib.percent_label(row['fraction']),
               plan_lib.ARM_NAMES[row['arm']]]
      for metric in ('accuracy', 'balanced_accuracy'):
        m = row[metric]
        cells += [f'{100 * m["honest"]:.1f}', f'{100 * m["reference"]:.1f}',
                  f'{m["inflation"]:+.1f}']
      rows.append(cells)
    lines += _table(['task', 'labeled', 'arm', 'accuracy honest', 'accuracy reference',
                     'inflation (pts)', 'bal. acc. honest', 'bal. acc. reference',
                     'inflation (pts)'], rows)
    lines.append('')
  return '\n'.join(lines)


