"""metrics.jsonl across a kill and a resume: the records read back are the
ones an uninterrupted run would have written."""

import json

import numpy as np

from dselect_jax import metric_writers


def _append(path, *records):
  with open(path, 'a') as f:
    for step, split, loss in records:
      f.write(json.dumps({'step': step, 'split': split, 'loss': loss}) + '\n')


def test_a_resumed_run_supersedes_the_killed_runs_records(tmp_path):
  path = tmp_path / metric_writers.METRICS_FILE
  # The killed run: logs every 2 steps, validates every 4, and dies while
  # writing its step-8 record; its newest good checkpoint is step 2.
  _append(
    path,
    (2, 'train', 'old'),
    (4, 'train', 'old'),
    (4, 'validation', 'old'),
    (6, 'train', 'old'),
  )
  with open(path, 'a') as f:
    f.write('{"step": 8, "split": "tr')
  # The resumed run opens the file and logs steps 4 to 8 again, then tests.
  writer = metric_writers.MetricWriter(str(tmp_path))
  for step in (4, 6, 8):
    writer.write(step, 'train', {'loss': 'new'})
    if step % 4 == 0:
      writer.write(step, 'validation', {'loss': 'new'})
  writer.write(8, 'test', {'loss': 'new'})
  writer.write(8, 'test', {'loss': 'again'})  # train.py run once more.
  writer.close()

  got = [
    (r['step'], r['split'], r['loss'])
    for r in metric_writers.read_metrics(str(tmp_path))
  ]
  assert got == [
    (2, 'train', 'old'),
    (4, 'train', 'new'),
    (4, 'validation', 'new'),
    (6, 'train', 'new'),
    (8, 'train', 'new'),
    (8, 'validation', 'new'),
    (8, 'test', 'again'),
  ]
  # The cut line is on a line of its own; every other line is a record.
  lines = path.read_text().splitlines()
  assert lines[4] == '{"step": 8, "split": "tr'
  assert len(lines) == 4 + 1 + 7


def test_test_records_survive_a_resume(tmp_path):
  # A finished run (tested at its best step, 4), trained again for longer
  # and killed before its step-8 checkpoint: resumed from step 4.
  path = tmp_path / metric_writers.METRICS_FILE
  _append(
    path,
    (2, 'train', 'a'),
    (4, 'train', 'a'),
    (4, 'test', 'a'),
    (6, 'train', 'b'),
    (8, 'train', 'b'),
    (6, 'train', 'c'),
  )
  got = [
    (r['step'], r['split'], r['loss'])
    for r in metric_writers.read_records(str(path))
  ]
  assert got == [
    (2, 'train', 'a'),
    (4, 'train', 'a'),
    (4, 'test', 'a'),
    (6, 'train', 'c'),
  ]


def test_no_file_reads_as_no_records(tmp_path):
  assert metric_writers.read_metrics(str(tmp_path)) == []


def test_lines_that_are_not_whole_records_are_skipped_with_a_warning(
  tmp_path, monkeypatch
):
  path = tmp_path / metric_writers.METRICS_FILE
  _append(path, (1, 'train', 'a'))
  with open(path, 'ab') as f:
    f.write(b'{"step": 2, "spl\n')  # Cut short.
    f.write(b'\xf8\xff garbage\n')  # Not UTF-8.
    f.write(b'[1, 2]\n')  # JSON, not a record.
    f.write(b'{"split": "train"}\n')  # A record without its step.
    f.write(b'\n')  # Blank: not counted.
  _append(path, (3, 'train', 'b'))
  warnings = []
  monkeypatch.setattr(
    metric_writers.logging,
    'warning',
    lambda msg, *args: warnings.append(msg % args),
  )
  records = metric_writers.read_records(str(path))
  assert [(r['step'], r['loss']) for r in records] == [(1, 'a'), (3, 'b')]
  assert len(warnings) == 1 and 'skipped 4 line(s)' in warnings[0]
  assert str(path) in warnings[0]


def test_per_task_arrays_are_flattened_once_where_written(tmp_path):
  result = {
    'num_examples': 10,
    'metric_names': ['auc', 'rmse'],
    metric_writers.PER_TASK: {
      'metric': np.array([0.75, 1.5]),
      'loss': np.array([0.5, 2.25]),
    },
    'expert_weights': np.array([[0.5, 0.5], [1.0, 0.0]]),
  }
  want = {
    'num_examples': 10,
    'auc_1': 0.75,
    'rmse_2': 1.5,
    'loss_1': 0.5,
    'loss_2': 2.25,
    'expert_weights': [[0.5, 0.5], [1.0, 0.0]],
  }
  assert metric_writers.flatten(result) == want
  writer = metric_writers.MetricWriter(str(tmp_path))
  writer.write(3, 'validation', result)
  writer.close()
  (record,) = metric_writers.read_metrics(str(tmp_path))
  assert record == {'step': 3, 'split': 'validation', **want}
  # Either form reads back the same, in task order.
  for form in (result, record):
    assert metric_writers.task_metrics(form) == [('auc', 0.75), ('rmse', 1.5)]
    assert metric_writers.task_values(form, 'loss') == [0.5, 2.25]
  assert metric_writers.task_values(record, 'accuracy') == []
