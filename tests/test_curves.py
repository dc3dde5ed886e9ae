"""curves.jsonl: every metric written, in order; a resumed run drops what it replays."""

from simclr_jax.train import curves


def test_curves_keep_metrics_in_order_and_drop_what_a_resumed_run_replays(tmp_path):
  writer = curves.CurveWriter(str(tmp_path))
  for step in (4, 8, 12):
    writer.write_scalars(step, {'train/loss': 1.0 / step, 'steps_per_sec': 3.0})
  writer.write_scalars(8, {'val/knn1_accuracy': 0.5})
  assert [line['step'] for line in curves.read_curves(str(tmp_path))] == [4, 8, 12, 8]
  assert all('steps_per_sec' not in line for line in curves.read_curves(str(tmp_path)))
  # A new writer (a resumed process) reads the file and drops the steps after its checkpoint.
  resumed = curves.CurveWriter(str(tmp_path))
  resumed.truncate_after(8)
  resumed.write_scalars(12, {'train/loss': 0.25})
  lines = curves.read_curves(str(tmp_path))
  assert [line['step'] for line in lines] == [4, 8, 8, 12]
  assert lines[-1] == {'step': 12, 'train/loss': 0.25}
  assert curves.read_curves(str(tmp_path / 'none')) == []
