"""A run's learning curves as JSON lines (`curves.jsonl`): the scalars TensorBoard shows.

`create_writer(workdir)` is clu's default writer (logs and TensorBoard) plus a
`CurveWriter` that keeps every metric a run writes (train loss at summaries, the
selection split's metrics at evaluations, the test metrics at the end) in
`curves.jsonl`, one line per write: {"step": s, "train/loss": ..., ...}. A report
reads it with `read_curves` (TensorBoard's event files need TensorFlow to read).

Resumption: the file is rewritten whole at every write (it is small: one line per
summary or evaluation), so it holds exactly what was written; a run resumed from
step s first drops the lines after s (`truncate_after`), which it replays.
"""

import json

from clu import metric_writers
from etils import epath
import jax

from simclr_jax.train import workdirs

CURVES_FILE = 'curves.jsonl'


class CurveWriter(metric_writers.MetricWriter):
  """Keeps the scalars written to it in `workdir/curves.jsonl` (process 0 only)."""

  def __init__(self, workdir):
    self.path = workdirs.output_path(workdir, CURVES_FILE)
    self.lines = read_curves(workdir)

  def truncate_after(self, step):
    """Drops what was written after `step` (a resumed run replays those steps)."""
    kept = [line for line in self.lines if line['step'] <= step]
    if len(kept) != len(self.lines):
      self.lines = kept
      self._write()

  def _write(self):
    workdirs.write_text(self.path, ''.join(json.dumps(line, sort_keys=True) + '\n'
                                           for line in self.lines))

  def write_scalars(self, step, scalars):
    # Metrics of a split ('train/loss', 'val/...', 'test/...'); not the timings of
    # clu's progress reports, which a resumed run writes at other steps.
    line = {name: float(value) for name, value in scalars.items() if '/' in name}
    if line:
      self.lines.append({'step': int(step), **line})
      self._write()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class RunWriter(metric_writers.MultiWriter):
  """clu's default writer and, on process 0, the run's `CurveWriter`."""

  def __init__(self, workdir):
    first = jax.process_index() == 0
    writers = [metric_writers.create_default_writer(workdir, just_logging=not first)]
    self.curves = CurveWriter(workdir) if first else None
    super().__init__(writers + ([self.curves] if first else []))

  def truncate_after(self, step):
    if self.curves is not None:
      self.curves.truncate_after(step)


def create_writer(workdir):
  """The run's metric writer: logs, TensorBoard and `curves.jsonl`."""
  return RunWriter(workdir)


def read_curves(workdir):
  """The lines of a run's `curves.jsonl` ([] when it has none), in the order written."""
  path = epath.Path(workdirs.workdir_path(workdir)) / CURVES_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
