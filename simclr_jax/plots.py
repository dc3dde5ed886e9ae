"""Every matplotlib figure of the project, one function per figure.

Figures are drawn with the Agg backend (no display needed) and saved as PNG; each
function also returns the figure as an RGB uint8 array so it can go to TensorBoard.
"""

from etils import epath
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np


def figure_to_array(fig):
  """RGB uint8 [H, W, 3] of a drawn figure."""
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig, path):
  """Saves `fig` to `path` (if given; a local path or a URL), closes it, returns its pixels."""
  image = figure_to_array(fig)
  if path:
    with epath.Path(path).open('wb') as f:
      fig.savefig(f, format='png', dpi=fig.dpi, bbox_inches='tight')
  plt.close(fig)
  return image


def draw_confusion_matrix(ax, matrix, class_names, title=None):
  """Counts and row-normalised shading of a confusion matrix on `ax`."""
  matrix = np.asarray(matrix)
  rows = matrix.sum(axis=1, keepdims=True)
  shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
  ax.imshow(shares, cmap='Blues', vmin=0, vmax=1)
  short = [name.replace('_Demented', '').replace('_', ' ') for name in class_names]
  ax.set_xticks(range(len(short)), short, rotation=30, ha='right', fontsize=8)
  ax.set_yticks(range(len(short)), short, fontsize=8)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  for i in range(matrix.shape[0]):
    for j in range(matrix.shape[1]):
      ax.text(j, i, str(matrix[i, j]), ha='center', va='center', fontsize=8,
              color='white' if shares[i, j] > 0.5 else 'black')
  if title:
    ax.set_title(title, fontsize=9)


def plot_confusion_matrix(matrix, class_names, path=None, title=None):
  """One confusion matrix (counts, shaded by recall per true class)."""
  fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
  draw_confusion_matrix(ax, matrix, class_names, title)
  return save_figure(fig, path)


def plot_audit_pairs(pairs_by_scheme, path=None,
                     title='Closest test images to train+val'):
  """The closest test/train pairs of each split scheme, side by side.

  Args:
    pairs_by_scheme: {scheme name: list of dicts with test_image and
      reference_image ([H, W] or [H, W, 1]), similarity, test_name,
      reference_name and optionally same_subject (bool)}, closest pair first.
    path: PNG to write, or None.
    title: title of the figure.

  Returns:
    The figure as an RGB uint8 array.
  """
  schemes = [name for name, pairs in pairs_by_scheme.items() if pairs]
  num_rows = max([len(pairs_by_scheme[name]) for name in schemes] or [1])
  height = 2.0 * num_rows + 0.9
  fig = plt.figure(dpi=100, figsize=(3.6 * max(len(schemes), 1), height))
  fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va='top')
  if not schemes:
    fig.text(0.5, 0.5, 'no cross-split pairs', ha='center')
    return save_figure(fig, path)
  panels = np.atleast_1d(fig.subfigures(1, len(schemes), wspace=0.06))
  for panel, scheme in zip(panels, schemes):
    # Room at the top for the figure title, then the scheme's title.
    panel.suptitle(f'{scheme} split', fontsize=10, fontweight='bold',
                   y=1 - 0.45 / height, va='top')
    axes = panel.subplots(num_rows, 2, squeeze=False, gridspec_kw=dict(
        wspace=0.05, hspace=0.45, top=1 - 0.95 / height, bottom=0.03,
        left=0.02, right=0.98))
    for ax in axes.ravel():
      ax.axis('off')
    for row, pair in enumerate(pairs_by_scheme[scheme]):
      for side, (image, name, split) in enumerate((
          (pair['test_image'], pair['test_name'], 'test'),
          (pair['reference_image'], pair['reference_name'], 'train'))):
        axes[row, side].imshow(np.squeeze(np.asarray(image)), cmap='gray')
        # File names may be long paths; the last part identifies the slice.
        axes[row, side].set_title(f'{split}: {str(name).split("/")[-1]}',
                                  fontsize=7)
      label = f'similarity {pair["similarity"]:.4f}'
      if pair.get('same_subject') is not None:
        label += ', same subject' if pair['same_subject'] else ', other subject'
      axes[row, 0].text(1.025, -0.04, label, transform=axes[row, 0].transAxes,
                        ha='center', va='top', fontsize=7)
  return save_figure(fig, path)


ARM_STYLES = (('floor', 'raw-pixel 1-NN (no training)', 'tab:gray', 's'),
              ('baseline', 'supervised baseline', 'tab:orange', 'o'),
              ('finetune', 'SimCLR + fine-tuning', 'tab:blue', 'D'),
              ('probe', 'SimCLR linear probe', 'tab:green', '^'))
LEVEL_STYLES = (('slice', 'per slice', '-', 0.18), ('subject', 'per subject', '--', 0.09))


def _budget_position(entry):
  """A budget's x: its fraction of the slices, or its (mean) number of labeled subjects."""
  budget = entry['budget']
  if budget['unit'] == 'slice':
    return budget['size']
  return entry.get('num_labeled_subjects') or budget['size'] or 1


def plot_label_fraction_curves(summary, path=None):
  """Test scores against the label budget, with 95 % bands over subjects.

  One row per protocol and task, columns balanced accuracy and accuracy; in each
  panel the three arms, per slice (solid line, darker band) and per subject
  (dashed line, lighter band), on a log x axis of the label budget: the fraction of
  the slices, or the number of labeled subjects (all subjects at their mean count).

  Args:
    summary: the sweep's aggregates (`study.results.aggregate`):
      summary['protocols'][protocol]['tasks'][task] holds 'class_names',
      'majority_share', 'subject_majority_share' and 'budgets', a list of
      {'budget': {'unit', 'size', 'label'}, 'num_labeled', 'num_labeled_subjects',
      'arms': {arm: {'slice' | 'subject': {metric: {'value', 'low', 'high'}}}}} with
      arms among floor, baseline, finetune.
    path: PNG to write, or None.

  Returns:
    The figure as an RGB uint8 array.
  """
  metrics = (('balanced_accuracy', 'balanced accuracy'), ('accuracy', 'accuracy'))
  panels = [(protocol, task, entry)
            for protocol, result in summary['protocols'].items()
            for task, entry in result['tasks'].items() if entry['budgets']]
  num_rows = max(1, len(panels))
  fig, axes = plt.subplots(num_rows, len(metrics), squeeze=False, dpi=100,
                           figsize=(5.2 * len(metrics), 3.3 * num_rows + 0.9))
  if not panels:
    for ax in axes.ravel():
      ax.axis('off')
    axes[0, 0].text(0.5, 0.5, 'no finished run yet', ha='center', transform=axes[0, 0].transAxes)
  for row, (protocol, task, entry) in enumerate(panels):
    positions = [_budget_position(e) for e in entry['budgets']]
    for col, (metric, metric_name) in enumerate(metrics):
      ax = axes[row, col]
      for offset, (arm, _, color, marker) in zip((-1, 0, 1), ARM_STYLES):
        points = [(x, e['arms'][arm]) for x, e in zip(positions, entry['budgets'])
                  if arm in e['arms']]
        if not points:
          continue
        # A small horizontal shift per arm keeps overlapping markers apart.
        x = np.array([p[0] for p in points]) * 1.03**offset
        for level, _, style, alpha in LEVEL_STYLES:
          values = [p[1][level][metric] for p in points]
          value = np.array([100 * v['value'] for v in values])
          ax.fill_between(x, [100 * v['low'] for v in values],
                          [100 * v['high'] for v in values], color=color, alpha=alpha,
                          linewidth=0)
          ax.plot(x, value, color=color, marker=marker, linestyle=style, markersize=4,
                  markerfacecolor=color if level == 'slice' else 'white')
      if metric == 'accuracy':
        ax.axhline(100 * entry['majority_share'], color='k', linestyle=':', linewidth=1)
      else:
        ax.axhline(100 / len(entry['class_names']), color='k', linestyle='-.', linewidth=1)
      ax.set_xscale('log')
      ax.set_xticks(positions, [f'{e["budget"]["label"]}\n({e["num_labeled"]:,})'
                                for e in entry['budgets']], fontsize=8)
      ax.minorticks_off()
      if len(positions) == 1:
        ax.set_xlim(positions[0] / 1.5, positions[0] * 1.5)
      ax.set_ylim(0, 100)
      ax.grid(alpha=0.3)
      ax.set_title(f'{protocol}, {task.replace("_", "-")}: {metric_name}', fontsize=10)
      if col == 0:
        ax.set_ylabel('test score (%)')
      if row == num_rows - 1:
        ax.set_xlabel('label budget (labeled training slices per fold or split)')
  handles = [matplotlib.lines.Line2D([], [], color=color, marker=marker, label=label)
             for _, label, color, marker in ARM_STYLES]
  handles += [matplotlib.lines.Line2D([], [], color='k', linestyle=style, label=label)
              for _, label, style, _ in LEVEL_STYLES]
  handles += [matplotlib.lines.Line2D([], [], color='k', linestyle=':', linewidth=1,
                                      label='majority class (accuracy)'),
              matplotlib.lines.Line2D([], [], color='k', linestyle='-.', linewidth=1,
                                      label='chance (balanced accuracy)')]
  fig.legend(handles=handles, loc='upper center', ncol=4, fontsize=8, frameon=False)
  fig.text(0.5, 1 - 0.62 / fig.get_figheight(),
           'Bands: 95 % intervals of a stratified bootstrap over subjects (and seeds, where '
           'several ran); '
           'scores of the out-of-fold predictions pooled over folds.',
           ha='center', va='top', fontsize=8, color='dimgray')
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / fig.get_figheight()))
  return save_figure(fig, path)


CURVE_PANELS = (('loss', 'NT-Xent loss (training batches)', 1),
                ('knn', 'kNN (k = 1) balanced accuracy (%)', 100),
                ('probe', 'linear-probe balanced accuracy (%)', 100))


def plot_pretraining_curves(curves, path=None):
  """Each pretraining's curves: its NT-Xent loss and its embeddings' monitors, per fold.

  One row per protocol; columns: the training loss, the kNN (k = 1) and the
  linear-probe balanced accuracy on the selection split (the fold's validation
  subjects under cross-validation); one line per fold, a dash-dotted line at chance.

  Args:
    curves: [{'protocol', 'fold' (None: one split), 'split', 'chance' (a fraction, or
      None), 'lines': [{'step', and some of 'loss', 'knn', 'probe' (fractions)}]}].
    path: PNG to write, or None.

  Returns:
    The figure as an RGB uint8 array.
  """
  protocols = list(dict.fromkeys(c['protocol'] for c in curves)) or [None]
  fig, axes = plt.subplots(len(protocols), len(CURVE_PANELS), squeeze=False, dpi=100,
                           figsize=(4.6 * len(CURVE_PANELS), 3.1 * len(protocols) + 0.4))
  for row, protocol in enumerate(protocols):
    runs = [c for c in curves if c['protocol'] == protocol]
    for index, curve in enumerate(runs):
      label = 'one split' if curve['fold'] is None else f'fold {curve["fold"]}'
      for col, (key, _, scale) in enumerate(CURVE_PANELS):
        points = [(line['step'], scale * line[key]) for line in curve['lines'] if key in line]
        if points:
          axes[row, col].plot(*zip(*points), color=plt.cm.tab10(index % 10), label=label,
                              marker=None if key == 'loss' else 'o', markersize=3,
                              linewidth=1)
    for col, (key, title, _) in enumerate(CURVE_PANELS):
      ax = axes[row, col]
      split = f', {runs[0]["split"]} split' if runs and key != 'loss' else ''
      ax.set_title(f'{protocol}: {title}{split}' if protocol else title, fontsize=9)
      ax.set_xlabel('step', fontsize=8)
      ax.tick_params(labelsize=8)
      ax.grid(alpha=0.3)
      chance = runs[0].get('chance') if runs else None
      if key != 'loss':
        ax.set_ylim(0, 100)
        if chance is not None:
          ax.axhline(100 * chance, color='k', linestyle='-.', linewidth=1, label='chance')
      if not runs:
        ax.text(0.5, 0.5, 'no curves', ha='center', transform=ax.transAxes)
    if runs:
      axes[row, -1].legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  return save_figure(fig, path)


def plot_confusion_grid(grid, class_names, path=None, title=None):
  """A grid of confusion matrices (e.g. label fractions x arms).

  Args:
    grid: rows of cells; a cell is (matrix, title), (matrix, title, class_names)
      for a cell with its own classes (another label task), or None (left blank).
    class_names: names of the classes, indexed by label (cells without their own).
    path: PNG to write, or None.
    title: title of the figure.

  Returns:
    The figure as an RGB uint8 array.
  """
  num_rows, num_cols = len(grid), max(len(row) for row in grid)
  fig, axes = plt.subplots(num_rows, num_cols, squeeze=False, dpi=100,
                           figsize=(3.4 * num_cols, 3.3 * num_rows + 0.5))
  for row, cells in enumerate(grid):
    for col in range(num_cols):
      cell = cells[col] if col < len(cells) else None
      if cell is None:
        axes[row, col].axis('off')
        continue
      matrix, cell_title, *own_classes = cell
      draw_confusion_matrix(axes[row, col], matrix,
                            own_classes[0] if own_classes else class_names, cell_title)
      if col:
        axes[row, col].set_ylabel('')
      if row < num_rows - 1:
        axes[row, col].set_xlabel('')
  if title:
    fig.suptitle(title, fontsize=11)
  # Room at the top for the title above the first row's titles.
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
  return save_figure(fig, path)


# ----------------------------------------------------------------------------- Grad-CAM

CAM_COLORMAP = 'jet'  # Heatmap colours over the gray image, as in the reference's figure.
CAM_ALPHA = 0.4  # Heatmap opacity: the anatomy stays visible underneath.


def class_label(name):
  """'Very_Mild_Demented' -> 'Very Mild Demented'."""
  return str(name).replace('_', ' ')


def draw_cam_overlay(ax, image, heatmap, title=None):
  """Gray image with a heatmap on top, both stretched over the same extent.

  Args:
    ax: matplotlib axes.
    image: [h, w] gray image, uint8 or float in [0, 1], at any resolution.
    heatmap: [H, W] in [0, 1], None for the image alone.
    title: axes title.

  Returns:
    The heatmap's AxesImage (for a colour bar), or None.
  """
  image = np.asarray(image)
  extent = (0, 1, 1, 0)  # Image and heatmap may differ in resolution.
  ax.imshow(image, cmap='gray', vmin=0, vmax=255 if image.dtype == np.uint8 else 1,
            extent=extent, interpolation='bilinear')
  shown = None
  if heatmap is not None:
    shown = ax.imshow(heatmap, cmap=CAM_COLORMAP, vmin=0, vmax=1, alpha=CAM_ALPHA,
                      extent=extent, interpolation='bilinear')
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=9)
  return shown


def _cam_colorbar(fig, **kwargs):
  """An opaque colour bar of the heatmap scale (the overlay itself is translucent)."""
  mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), CAM_COLORMAP)
  colorbar = fig.colorbar(mappable, **kwargs)
  colorbar.set_label('relevance (1 = most)', fontsize=8)
  colorbar.ax.tick_params(labelsize=7)
  return colorbar


def plot_cam_overlay(image, heatmap, probabilities, class_names, path, title=None,
                     cam_name='Grad-CAM'):
  """Writes one image's figure: the image, its heatmap overlay, the class probabilities.

  Predict mode writes one per input image, so the layout is fixed (no layout
  engine) and the figure is drawn once, straight to `path`, instead of the
  three draws of `save_figure` (array, tight box, file).

  Args:
    image: [h, w] gray image (uint8 or float in [0, 1]).
    heatmap: [H, W] in [0, 1] of the predicted class.
    probabilities: [K] softmax probabilities.
    class_names: K names.
    path: PNG to write.
    title: figure title (e.g. the file name).
    cam_name: name of the heatmap method for the labels.
  """
  probabilities = np.asarray(probabilities)
  predicted = int(np.argmax(probabilities))
  fig = plt.figure(figsize=(9.5, 3.4), dpi=100)
  # Rectangles (left, bottom, width, height) in figure fractions; the image
  # axes are square (0.26 * 9.5 in ~ 0.72 * 3.4 in).
  draw_cam_overlay(fig.add_axes((0.02, 0.04, 0.26, 0.72)), image, None, 'input')
  draw_cam_overlay(fig.add_axes((0.31, 0.04, 0.26, 0.72)), image, heatmap,
                   f'{cam_name} of {class_label(class_names[predicted])}')
  _cam_colorbar(fig, cax=fig.add_axes((0.58, 0.04, 0.012, 0.72)))
  ax = fig.add_axes((0.80, 0.16, 0.18, 0.6))
  names = [class_label(name) for name in class_names]
  colors = ['tab:red' if k == predicted else 'tab:gray' for k in range(len(names))]
  ax.barh(range(len(names)), probabilities, color=colors)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlim(0, 1)
  ax.set_xlabel('probability', fontsize=8)
  ax.tick_params(axis='x', labelsize=7)
  for k, p in enumerate(probabilities):
    ax.text(min(p + 0.02, 0.8), k, f'{p:.2f}', va='center', fontsize=8)
  ax.set_title('class probabilities', fontsize=9)
  for side in ('top', 'right'):
    ax.spines[side].set_visible(False)
  headline = (f'predicted {class_label(class_names[predicted])} '
              f'(p = {probabilities[predicted]:.2f})')
  fig.suptitle(f'{title}\n{headline}' if title else headline, fontsize=10, y=0.98)
  fig.savefig(path)
  plt.close(fig)


def plot_cam_grid(images, heatmaps, titles, path=None, title=None, cam_name='Grad-CAM'):
  """Columns side by side (e.g. one per class): image above, heatmap overlay below.

  Args:
    images: per column a [h, w] gray image, or None for an empty column.
    heatmaps: per column a [H, W] heatmap in [0, 1], or None.
    titles: per column a title (for an empty column, the text shown instead).
    path: PNG to write, or None.
    title: figure title.
    cam_name: name of the heatmap method for the labels.
  """
  columns = len(images)
  fig, axes = plt.subplots(2, columns, figsize=(2.3 * columns + 1.0, 5.6), dpi=100,
                           squeeze=False, layout='constrained')
  for j, (image, heatmap, column_title) in enumerate(zip(images, heatmaps, titles)):
    if image is None:
      for ax in axes[:, j]:
        ax.set_facecolor('whitesmoke')
        ax.set_xticks([])
        ax.set_yticks([])
      axes[0, j].text(0.5, 0.5, column_title, ha='center', va='center', fontsize=8,
                      color='dimgray', transform=axes[0, j].transAxes)
      continue
    draw_cam_overlay(axes[0, j], image, None, column_title)
    draw_cam_overlay(axes[1, j], image, heatmap)
  axes[0, 0].set_ylabel('input', fontsize=9)
  axes[1, 0].set_ylabel(cam_name, fontsize=9)
  _cam_colorbar(fig, ax=axes[1, :], shrink=0.9, aspect=15, pad=0.01)
  if title:
    fig.suptitle(title, fontsize=10)
  return save_figure(fig, path)


def plot_cam_quality(quality, path=None, title=None):
  """Mask energy of CAMs against baselines, and deletion drops against random removal.

  Args:
    quality: the dict of `gradcam.evaluate_heatmaps`.
    path: PNG to write, or None.
    title: figure title.
  """
  has_masks = 'mask_energy' in quality
  fig, axes = plt.subplots(1, 2 if has_masks else 1, figsize=(10 if has_masks else 4.5, 3.8),
                           dpi=100, squeeze=False)
  axes = axes[0]
  if has_masks:
    energy = quality['mask_energy']
    labels = ('heatmaps', 'uniform map\n(= mask area)', 'random\nsmooth maps',
              'same CAM,\nuntrained\nmodel', 'the mask seen\nat the map\nresolution')
    values = (energy['cam'], energy['uniform'], energy['random'], energy['untrained_model'],
              energy['coarse_mask'])
    axes[0].bar(labels, values, color=('tab:red', 'tab:gray', 'tab:gray', 'tab:gray',
                                       'lightsteelblue'))
    axes[0].errorbar([0], [energy['cam']], yerr=[energy['cam_std']], color='black',
                     capsize=4)
    for k, value in enumerate(values):
      axes[0].text(k, value / 2, f'{value:.2f}', ha='center', va='center', fontsize=8,
                   color='black' if k == len(values) - 1 else 'white')
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel('share of heatmap inside the mask', fontsize=8)
    axes[0].set_title(f'mask energy ({quality["num_images"]} images)', fontsize=9)
    axes[0].tick_params(labelsize=7)
  ax = axes[-1]
  deletion = quality['deletion']
  fractions = [100 * d['fraction'] for d in deletion]
  ax.plot(fractions, [d['top_drop'] for d in deletion], 'o-', color='tab:red',
          label='most relevant pixels')
  ax.plot(fractions, [d['random_drop'] for d in deletion], 's--', color='tab:gray',
          label='random pixels')
  ax.axhline(0, color='black', linewidth=0.5)
  ax.set_xlabel('pixels removed (%)', fontsize=8)
  ax.set_ylabel('drop in predicted-class probability', fontsize=8)
  ax.set_title('deletion faithfulness', fontsize=9)
  ax.legend(fontsize=8)
  ax.tick_params(labelsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)
