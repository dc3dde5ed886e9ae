"""Procedurally generated axial brain slices: the embedded default data set.

`generate` draws subjects whose anatomy varies (head size and shape, position,
rotation, intensity, contrast, noise, bias field, slice levels) and whose class
sets the severity of atrophy-like changes: Non_Demented 0 < Very_Mild_Demented
1 < Mild_Demented 2 < Moderate_Demented 3. Severity enlarges the ventricles,
thins the cortex, widens the sulci and the interhemispheric fissure, and
shrinks the hippocampi (enlarging the temporal horns around them). Every
severity step is about as large as the spread between subjects of one class,
so the classes overlap: the task is learnable but not trivial. Each subject
contributes several neighbouring slices that look alike, as in the real data,
so a slice-level split leaks subjects here too.

The `mask` feature is 1 where the class signal lies: the region the ventricles
occupy at the highest severity, the cortical rim the sulci cut into, and the
hippocampi with their temporal horns. Grad-CAM quality is measured against it.

Build with `tfds.builder('synthetic_mri')` (100 subjects x 24 slices) or
`tfds.builder('synthetic_mri/small')` (24 x 8, for tests) once this module is
imported; no download is needed. `write_nifti_volumes` writes the same
subjects as 3D NIfTI volumes, one per subject, for the nifti_folder data set:

  python -m simclr_jax.data.datasets --nifti_dir=runs/volumes
"""

import argparse
import dataclasses
import os

import nibabel
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from simclr_jax.data.datasets import alzheimer_mri
from simclr_jax.data.datasets import features

CLASS_NAMES = alzheimer_mri.CLASS_NAMES
# Severity of each class in CLASS_NAMES order (Mild, Moderate, Non, Very mild).
SEVERITY = (2, 3, 0, 1)
# Share of subjects per class in CLASS_NAMES order, as in the Kaggle data.
CLASS_FRACTIONS = (0.14, 0.01, 0.50, 0.35)
# Every class gets at least this many subjects so that a subject split can put
# one in train and one in test.
MIN_SUBJECTS_PER_CLASS = 2


def subjects_per_class(num_subjects):
  """Returns how many subjects each class gets (CLASS_NAMES order).

  Counts follow CLASS_FRACTIONS (largest remainders), then every class is
  raised to MIN_SUBJECTS_PER_CLASS by taking subjects from the largest class.

  Args:
    num_subjects: total number of subjects.

  Returns:
    int array [num_classes] summing to num_subjects.
  """
  num_classes = len(CLASS_NAMES)
  if num_subjects < MIN_SUBJECTS_PER_CLASS * num_classes:
    raise ValueError(
        f'synthetic_mri needs at least {MIN_SUBJECTS_PER_CLASS * num_classes} '
        f'subjects ({MIN_SUBJECTS_PER_CLASS} per class), got {num_subjects}; '
        'raise num_subjects.')
  shares = np.asarray(CLASS_FRACTIONS) * num_subjects
  counts = np.floor(shares).astype(int)
  by_remainder = np.argsort(-(shares - counts), kind='stable')
  counts[by_remainder[:num_subjects - counts.sum()]] += 1
  for label in range(num_classes):
    while counts[label] < MIN_SUBJECTS_PER_CLASS:
      counts[np.argmax(counts)] -= 1
      counts[label] += 1
  return counts


def _ramp(signed_distance, width):
  """Anti-aliased edge: 0 outside, 1 inside, linear across `width`.

  A clipped line instead of a sigmoid: ten times cheaper, and as smooth as a
  pixel grid can show.
  """
  return np.clip(0.5 + signed_distance / width, 0.0, 1.0)


def _ellipses(u, v, ellipses):
  """Returns the union of ellipses as a depth field on the 2-D grid.

  The field is about the distance inside the nearest ellipse's edge (positive
  inside, negative outside), in the units of u and v, so that thresholding it
  above zero erodes the shapes: `_at_levels` uses that to shrink a structure
  towards the ends of its slice range without redrawing it per slice.

  Args:
    u, v: coordinate grids, float32 [H, W].
    ellipses: (centre_u, centre_v, semi_axis_u, semi_axis_v, angle) tuples.

  Returns:
    (field float32 [H, W], its largest possible value).
  """
  field, depth = None, 0.0
  for centre_u, centre_v, axis_u, axis_v, angle in ellipses:
    cos, sin = np.cos(angle), np.sin(angle)
    du, dv = u - centre_u, v - centre_v
    along = (cos * du + sin * dv) / axis_u
    across = (-sin * du + cos * dv) / axis_v
    inside = (1.0 - np.sqrt(along**2 + across**2)) * min(axis_u, axis_v)
    field = inside if field is None else np.maximum(field, inside)
    depth = max(depth, min(axis_u, axis_v))
  return field.astype(np.float32), depth


def _at_levels(field, depth, visibility, edge):
  """Renders a depth field per slice, eroded where visibility is below 1.

  Args:
    field, depth: from `_ellipses`.
    visibility: float32 [S, 1, 1], 1 where the structure shows fully, 0 where
      it is gone.
    edge: anti-aliasing width.

  Returns:
    float32 [S, H, W] in [0, 1].
  """
  return _ramp(field[None] - (1.0 - visibility) * depth, edge)


def _visibility(z, centre, half_range):
  """How much of a structure shows at slice level z: 1 at centre, 0 outside."""
  return np.sqrt(np.clip(1.0 - ((z - centre) / half_range)**2, 0.0, 1.0))


def _render_subject(rng, severity, slices_per_subject, image_size):
  """Draws one subject and renders its slices.

  Args:
    rng: the subject's own numpy Generator.
    severity: 0 (Non_Demented) to 3 (Moderate_Demented).
    slices_per_subject: number of neighbouring axial slices.
    image_size: output height and width in pixels.

  Returns:
    (images float32 [S, H, W] in [0, 1], masks bool [S, H, W]). What is drawn
    from rng does not depend on severity, so one rng state renders the same
    subject at every severity.
  """
  def lognormal(sigma):
    return float(np.exp(rng.normal(0.0, sigma)))

  # Each atrophy effect changes by about one between-subject spread (the
  # lognormal sigma) per severity step, so neighbouring classes overlap. The
  # mask covers what any severity would draw differently, hence the *_max.
  most_severe = max(SEVERITY)
  ventricle_base = lognormal(0.25)

  def ventricle_scale(level):
    return ventricle_base * (1.0 + 0.3 * level)

  cortex_baseline = 0.11 * lognormal(0.08)
  cortex_thickness = cortex_baseline * (1.0 - 0.1 * severity)
  sulcus_base = 0.25 * lognormal(0.2)
  sulcus_width = sulcus_base * (1.0 + 0.35 * severity)
  sulcus_width_max = sulcus_base * (1.0 + 0.35 * most_severe)
  sulcus_depth = cortex_baseline * 1.3
  fissure_base = 0.012 * lognormal(0.2)
  fissure_width = fissure_base * (1.0 + 0.35 * severity)
  fissure_width_max = fissure_base * (1.0 + 0.35 * most_severe)
  hippocampus_base = lognormal(0.08)
  horn_base = 0.35 * lognormal(0.15)

  def temporal_horn_scale(level):
    # The hippocampus shrinks while its temporal horn widens.
    return hippocampus_base * (1.0 - 0.1 * level) * (
        1.0 + horn_base * (1.0 + 0.25 * level))

  hippocampus_scale = hippocampus_base * (1.0 - 0.1 * severity)

  # Head geometry and pose, in image coordinates spanning [-1, 1].
  centre = rng.normal(0.0, 0.03, size=2)
  rotation = rng.normal(0.0, 0.08)
  # Brain size does not change with severity (that would move every
  # structure and spread the class signal outside the mask).
  semi_axes = np.array([0.76, 0.9]) * np.exp(rng.normal(0.0, 0.05, size=2))
  num_sulci = int(rng.integers(18, 26))
  # Folding pattern: low-frequency waves in angle that vary sulcal depth and
  # cortical thickness around the brain, different in every subject.
  folding_frequencies = rng.integers(2, 7, size=3)
  folding_phases = rng.uniform(0.0, 2.0 * np.pi, size=3)
  sulcus_phase = rng.uniform(0.0, 2.0 * np.pi)
  # Intensities of a T1-like contrast: white matter > gray matter > CSF.
  gain = lognormal(0.1)
  white = 0.8 * gain
  gray = white * (0.64 + rng.normal(0.0, 0.04))
  csf = 0.1 * gain
  noise_std = rng.uniform(0.015, 0.04)
  bias = rng.normal(0.0, 0.06, size=2)
  # Slice levels: neighbouring slices are close, so they look alike.
  level_centre = rng.normal(0.0, 0.08)
  level_span = rng.uniform(0.9, 1.2)
  steps = (np.linspace(-0.5, 0.5, slices_per_subject)
           if slices_per_subject > 1 else np.zeros(1))
  z = (level_centre + level_span * steps).astype(np.float32)[:, None, None]

  pixel = (np.arange(image_size) + 0.5) / image_size * 2.0 - 1.0
  y, x = np.meshgrid(pixel, pixel, indexing='ij')
  cos, sin = np.cos(rotation), np.sin(rotation)
  x_head = cos * (x - centre[0]) + sin * (y - centre[1])
  y_head = -sin * (x - centre[0]) + cos * (y - centre[1])
  # Brain coordinates: the outline at the widest level is the unit circle.
  u = x_head / semi_axes[0]
  v = y_head / semi_axes[1]
  edge = float(1.5 * (2.0 / image_size) / semi_axes.min())  # About 1.5 pixels.

  # Everything that depends on the angle only is drawn once on the 2-D grid;
  # slices differ by the cross-section's size and by which structures show.
  angle = np.arctan2(v, u)
  folding = sum(np.cos(frequency * angle + phase) for frequency, phase
                in zip(folding_frequencies, folding_phases)) / 3.0
  gyral_phase = num_sulci * angle + sulcus_phase + 0.8 * folding
  outline = (1.0 + 0.015 * np.cos(gyral_phase)).astype(np.float32)[None]
  # Sulci: tapered clefts of CSF between the gyri, of varying depth, lined
  # with gray matter that reaches deeper than the cortex under the crowns.
  # cleft_offset is 0 on a sulcus and 1 on the crown of the gyrus beside it.
  cleft_offset = np.abs((gyral_phase + np.pi) % (2.0 * np.pi) - np.pi) / np.pi
  cleft_depth = sulcus_depth * (1.0 + 0.5 * folding)
  def near_sulcus(width):
    return np.clip(1.0 - cleft_offset / width, 0.0, 1.0)

  cleft_start = 1.0 - cleft_depth * near_sulcus(sulcus_width)
  gray_start = (1.0 - cortex_thickness * (1.0 + 0.2 * folding)
                - cleft_depth * near_sulcus(sulcus_width + 0.35))
  # How deep severity reaches: the healthy cortex along the widest sulci.
  rim_start = (1.0 - cortex_baseline * (1.0 + 0.2 * folding)
               - cleft_depth * near_sulcus(sulcus_width_max + 0.35))
  rim_start = rim_start.astype(np.float32)[None] - edge
  cleft_start = cleft_start.astype(np.float32)[None]
  gray_start = gray_start.astype(np.float32)[None]
  # The interhemispheric fissure shows in front of and behind the ventricles.
  def fissure_at(width):
    return (_ramp(width - np.abs(u), 0.5 * edge)
            * _ramp(np.abs(v) - 0.45, edge)).astype(np.float32)[None]

  fissure = fissure_at(fissure_width)

  # The axial cross-section narrows above and below the widest level.
  section = np.sqrt(np.clip(1.0 - (z / 1.3)**2, 0.05, 1.0))
  radius = np.sqrt(u**2 + v**2).astype(np.float32)[None] / section
  brain = _ramp(outline - radius, edge)
  cortex = _ramp(radius - gray_start, edge)
  sulci = _ramp(radius - cleft_start, edge)

  def ventricles(scale):
    # Bodies beside the midline, and frontal and occipital horns that spread
    # out from their ends.
    width = 0.045 * scale
    length = 0.24 * (0.75 + 0.25 * scale)
    offset = 0.02 + width
    shapes = []
    for side in (-1.0, 1.0):
      shapes += [
          (side * offset, -0.02, width, length, 0.0),
          (side * (offset + 0.5 * width), -0.02 - 0.9 * length,
           0.7 * width, 0.35 * length, side * 0.7),
          (side * (offset + 0.6 * width), -0.02 + 0.9 * length,
           0.7 * width, 0.35 * length, -side * 0.6),
      ]
    return _ellipses(u, v, shapes)

  def temporal_lobes(scale):
    # Hippocampi in the medial temporal lobes of the lower slices.
    return _ellipses(u, v, [(-0.45, 0.2, 0.09 * scale, 0.15 * scale, 0.4),
                            (0.45, 0.2, 0.09 * scale, 0.15 * scale, -0.4)])

  ventricle_show = _visibility(z, 0.1, 0.45)
  hippocampus_show = _visibility(z, -0.4, 0.3)
  nuclei_show = _visibility(z, 0.0, 0.35)
  ventricle_csf = _at_levels(
      *ventricles(ventricle_scale(severity)), ventricle_show, edge)
  hippocampi = _at_levels(
      *temporal_lobes(hippocampus_scale), hippocampus_show, edge)
  # Each hippocampus is wrapped in its temporal horn of CSF.
  horns = _at_levels(*temporal_lobes(temporal_horn_scale(severity)),
                     hippocampus_show, edge)
  # Deep gray nuclei: unaffected by severity, they make the centre less plain.
  nuclei = _at_levels(*_ellipses(u, v, [(-0.25, 0.12, 0.1, 0.16, 0.2),
                                        (0.25, 0.12, 0.1, 0.16, -0.2)]),
                      nuclei_show, edge)

  tissue = white + (gray - white) * np.maximum(cortex, nuclei)
  fluid = np.maximum(np.maximum(sulci, fissure),
                     np.maximum(ventricle_csf, horns))
  tissue += (csf - tissue) * fluid
  tissue += (gray - tissue) * hippocampi
  bias_field = (1.0 + bias[0] * x + bias[1] * y).astype(np.float32)
  images = brain * tissue * bias_field
  noise = rng.standard_normal(size=images.shape, dtype=np.float32)
  images += np.float32(noise_std) * noise * (0.2 + 0.8 * brain)
  images = np.clip(images, 0.0, 1.0)

  # The mask: wherever some severity draws differently. That is the cortical
  # rim and the fissure at their widest, and the ventricles and temporal horns
  # as drawn at every severity.
  rim = radius > rim_start
  changing = rim | (fissure_at(fissure_width_max) > 0.0)
  for level in range(most_severe + 1):
    changing |= _at_levels(
        *ventricles(ventricle_scale(level)), ventricle_show, edge) > 0.0
    changing |= _at_levels(*temporal_lobes(temporal_horn_scale(level)),
                           hippocampus_show, edge) > 0.0
  masks = changing & (brain > 0.0)
  return images, masks


def generate(num_subjects=100, slices_per_subject=24, image_size=128, seed=0):
  """Generates the synthetic data set in memory, without TFDS.

  Args:
    num_subjects: number of subjects, split over the classes as
      `subjects_per_class` says.
    slices_per_subject: neighbouring axial slices per subject.
    image_size: height and width of the square images.
    seed: the same seed gives the same arrays.

  Returns:
    A dict of numpy arrays over N = num_subjects * slices_per_subject images,
    subject after subject: 'image' uint8 [N, H, W, 1], 'mask' uint8
    [N, H, W, 1] (1 where the class signal lies), 'label' int32 [N] (index into
    CLASS_NAMES), 'subject_id' int64 [N], 'slice_index' int32 [N] and
    'file_name' str [N].
  """
  counts = subjects_per_class(num_subjects)
  subject_labels = np.random.default_rng(seed).permutation(
      np.repeat(np.arange(len(CLASS_NAMES)), counts))
  images, masks = [], []
  for subject_id, label in enumerate(subject_labels):
    # A generator per subject keeps each subject the same whatever is drawn
    # for the others.
    rng = np.random.default_rng([seed, subject_id])
    subject_images, subject_masks = _render_subject(
        rng, SEVERITY[label], slices_per_subject, image_size)
    images.append(np.round(subject_images * 255.0).astype(np.uint8))
    masks.append(subject_masks.astype(np.uint8))
  labels = np.repeat(subject_labels, slices_per_subject).astype(np.int32)
  subject_ids = np.repeat(np.arange(num_subjects), slices_per_subject)
  slice_index = np.tile(np.arange(slices_per_subject), num_subjects)
  file_names = np.array([
      f'{CLASS_NAMES[label]}/subject{subject:04d}_slice{index:02d}.png'
      for label, subject, index in zip(labels, subject_ids, slice_index)])
  return {
      'image': np.concatenate(images)[..., None],
      'mask': np.concatenate(masks)[..., None],
      'label': labels,
      'subject_id': subject_ids.astype(np.int64),
      'slice_index': slice_index.astype(np.int32),
      'file_name': file_names,
  }


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticMriConfig(tfds.core.BuilderConfig):
  """Size of the generated data set.

  Attributes:
    num_subjects: number of subjects.
    slices_per_subject: slices per subject.
    image_size: height and width of the images.
    seed: seed of `generate`.
  """
  num_subjects: int = 100
  slices_per_subject: int = 24
  image_size: int = 128
  seed: int = 0


class SyntheticMri(tfds.core.GeneratorBasedBuilder):
  """Procedurally generated brain slices in the Alzheimer MRI classes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SyntheticMriConfig(
          name='default', num_subjects=100, slices_per_subject=24,
          description='100 subjects x 24 slices = 2,400 images of 128 x 128.'),
      SyntheticMriConfig(
          name='small', num_subjects=24, slices_per_subject=8,
          description='24 subjects x 8 slices = 192 images, for tests.'),
  ]

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=features.slice_features(self.builder_config.image_size, CLASS_NAMES,
                                         with_mask=True),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    data = generate(config.num_subjects, config.slices_per_subject,
                    config.image_size, config.seed)
    for i, file_name in enumerate(data['file_name']):
      example = {name: values[i] for name, values in data.items()}
      # TFDS encodes PIL images with PIL, much faster than its TF encoder.
      example['image'] = PIL.Image.fromarray(example['image'][..., 0])
      example['mask'] = PIL.Image.fromarray(example['mask'][..., 0])
      yield file_name, example


def write_volume(path, slices):
  """Writes display-convention axial slices as one 1 mm isotropic volume.

  The inverse of nifti_folder's display rotation: slice k of the volume is
  slices[k] with rows anterior to posterior and columns patient right to
  left, and k runs inferior to superior.

  Args:
    path: ends in .nii or .nii.gz (NIfTI-1, RAS affine), or .hdr (an Analyze
      .hdr/.img pair, stored LAS as nibabel reads Analyze).
    slices: uint8 [S, H, W] (or [S, H, W, 1]).
  """
  slices = np.asarray(slices)
  slices = slices[..., 0] if slices.ndim == 4 else slices
  volume = np.ascontiguousarray(slices[:, ::-1, ::-1].transpose(2, 1, 0))
  affine = np.eye(4)
  affine[:3, 3] = -(np.array(volume.shape) - 1) / 2.0  # Origin at the centre.
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if str(path).lower().endswith('.hdr'):
    # Analyze cannot store an orientation; nibabel reads it as x-flipped LAS.
    affine[0] *= -1
    nibabel.save(nibabel.AnalyzeImage(volume[::-1], affine), path)
  else:
    nibabel.save(nibabel.Nifti1Image(volume, affine), path)


def write_nifti_volumes(folder, num_subjects=24, slices_per_subject=32,
                        image_size=128, seed=0, extension='.nii.gz'):
  """Writes `generate`'s subjects as volumes in folder/<class>/, one each.

  Args:
    folder: root folder, created if needed.
    num_subjects, slices_per_subject, image_size, seed: as `generate`.
    extension: '.nii.gz', '.nii' or '.hdr' (Analyze pairs).

  Returns:
    The written paths relative to folder, '<class>/subject<id>' + extension,
    in subject order.
  """
  data = generate(num_subjects, slices_per_subject, image_size, seed)
  images = data['image'].reshape(
      num_subjects, slices_per_subject, image_size, image_size)
  labels = data['label'][::slices_per_subject]
  paths = []
  for subject, (label, slices) in enumerate(zip(labels, images)):
    paths.append(f'{CLASS_NAMES[label]}/subject{subject:04d}{extension}')
    write_volume(os.path.join(folder, paths[-1]), slices)
  return paths


def main(argv=None):
  """Writes the synthetic volumes; argv: the command-line arguments."""
  parser = argparse.ArgumentParser(description=(
      'Writes the synthetic subjects as 3D volumes for '
      '--config.data.name=nifti_folder --config.data.path=NIFTI_DIR.'))
  parser.add_argument('--nifti_dir', required=True, help='output folder')
  parser.add_argument('--num_subjects', type=int, default=24)
  parser.add_argument('--slices_per_subject', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--extension', default='.nii.gz',
                      choices=('.nii.gz', '.nii', '.hdr'))
  args = parser.parse_args(argv)
  paths = write_nifti_volumes(
      args.nifti_dir, args.num_subjects, args.slices_per_subject,
      args.image_size, args.seed, args.extension)
  print(f'Wrote {len(paths)} volumes to {args.nifti_dir}.')

