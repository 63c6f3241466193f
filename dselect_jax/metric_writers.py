"""Metrics to a JSON-lines file and TensorBoard event files (no TensorFlow).

Inside the code a result keeps its per-task values as arrays over tasks,
under ``per_task`` (``{'loss': (T,), 'metric': (T,), ...}``, each task's
metric named in ``metric_names``); the files keep one scalar per task and
name, ``loss_1``, ``accuracy_2``, ``auc_1``. ``flatten`` turns the first
into the second wherever a result is written, and ``task_values`` /
``task_metrics`` read either form back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import gzip
import json
import os
from typing import Any, Optional

from absl import logging
import numpy as np

from dselect_jax import tasks

METRICS_FILE = 'metrics.jsonl'
PER_TASK = 'per_task'


def flatten(values: Mapping[str, Any]) -> dict[str, Any]:
  """A result as the files store it: each array of ``values['per_task']``
  becomes one plain value per task, ``name_<t>`` from 1, the ``'metric'``
  array under each task's own metric name (``values['metric_names']``).
  Other values are kept, as plain Python values."""
  record = {
    k: _plain(v)
    for k, v in values.items()
    if k not in (PER_TASK, 'metric_names')
  }
  for name, array in values.get(PER_TASK, {}).items():
    for t, value in enumerate(_plain(array)):
      key = values['metric_names'][t] if name == 'metric' else name
      record[f'{key}_{t + 1}'] = value
  return record


def task_values(values: Mapping[str, Any], name: str) -> list:
  """One per-task value per task, in task order, from a result or a stored
  record: ``per_task[name]``, or ``name_1``, ``name_2``, ..."""
  if PER_TASK in values:
    return list(_plain(values[PER_TASK].get(name, [])))
  found, t = [], 1
  while f'{name}_{t}' in values:
    found.append(values[f'{name}_{t}'])
    t += 1
  return found


def task_metrics(values: Mapping[str, Any]) -> list[tuple[str, float]]:
  """Each task's (metric, value), in task order, from a result or a stored
  record: ``[('accuracy', 0.94), ...]`` or ``[('auc', 0.91), ('rmse',
  0.94)]``."""
  if PER_TASK in values:
    return list(zip(values['metric_names'], _plain(values[PER_TASK]['metric'])))
  pairs, t = [], 1
  while True:
    names = [m for m in tasks.HIGHER_IS_BETTER if f'{m}_{t}' in values]
    if not names:
      return pairs
    pairs.append((names[0], values[f'{names[0]}_{t}']))
    t += 1


class MetricWriter:
  """Appends ``{'step', 'split', ...}`` records to ``workdir/metrics.jsonl``
  and writes every scalar (and each expert weight) to TensorBoard under
  ``workdir/tensorboard`` as ``split/name``.

  Disabled writers (processes other than 0) write nothing. ``check_space``,
  when given, is called with what is about to be written before each write
  and raises to stop a run whose disk is nearly full (TensorBoard's writer
  thread would otherwise die on a full disk and block the run for good).
  """

  def __init__(
    self,
    workdir: str,
    enabled: bool = True,
    check_space: Optional[Callable[[str], None]] = None,
  ):
    self.enabled = enabled
    self._check_space = check_space
    self._tb = None
    if not enabled:
      return
    self._path = os.path.join(workdir, METRICS_FILE)
    # A killed run may have cut its last line short: end that line, so that
    # this run's records start on lines of their own.
    if os.path.exists(self._path) and os.path.getsize(self._path):
      with open(self._path, 'rb+') as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b'\n':
          f.write(b'\n')
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._tb = tensorboardX.SummaryWriter(
        os.path.join(workdir, 'tensorboard')
      )
    except ImportError:
      pass

  def write(self, step: int, split: str, values: Mapping[str, Any]):
    if not self.enabled:
      return
    if self._check_space is not None:
      self._check_space(f'the {split} metrics of step {step}')
    record = {'step': int(step), 'split': split, **flatten(values)}
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is None:
      return
    for key, value in record.items():
      if key in ('step', 'split'):
        continue
      array = np.asarray(value, dtype=object)
      if array.ndim == 0 and isinstance(value, (int, float)):
        self._tb.add_scalar(f'{split}/{key}', value, step)
      elif key == 'expert_weights':
        for t, row in enumerate(value):
          for e, w in enumerate(row):
            self._tb.add_scalar(
              f'{split}/expert_weight_task{t + 1}/{e}', w, step
            )

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    """Flushes and stops TensorBoard's background writer thread, so that
    nothing is written into the workdir after the run has returned."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` (or of its gzipped copy,
  ``metrics.jsonl.gz``, as results folders keep it); see
  :func:`read_records`."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path) and os.path.exists(path + '.gz'):
    path += '.gz'
  return read_records(path)


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a metrics file in the order they were written, without
  the ones a resumed run superseded; [] if there is no file.

  A run killed between two checkpoints resumes from the older one and logs
  the steps after it again. So a train record whose step is not past the
  last train step seen starts the resumed run: the earlier train and
  validation records from that step on are dropped. Test records name the
  best step, not the current one, so they stay; a test record replaces an
  earlier one of the same step (train.py run again on a finished workdir
  tests it again). A line that is not a whole record (a record a killed run
  cut short, or damage) is skipped, and a warning says how many were.
  """
  if not os.path.exists(path):
    return []
  records, last_train_step, skipped = [], None, 0
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8', errors='replace') as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        skipped += bool(line.strip())  # Blank lines are not records.
        continue
      if not (
        isinstance(record, dict)
        and isinstance(record.get('step'), int)
        and isinstance(record.get('split'), str)
      ):
        skipped += 1
        continue
      step = record['step']
      if record['split'] == 'train':
        if last_train_step is not None and step <= last_train_step:
          records = [
            r for r in records if r['split'] == 'test' or r['step'] < step
          ]
        last_train_step = step
      elif record['split'] == 'test':  # The same run tested again.
        records = [
          r for r in records if not (r['split'] == 'test' and r['step'] == step)
        ]
      records.append(record)
  if skipped:
    logging.warning(
      '%s: skipped %d line(s) that are not whole records (a run killed '
      'while writing, or damage)',
      path,
      skipped,
    )
  return records


def _plain(value):
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  if hasattr(value, 'tolist'):  # jax arrays
    return np.asarray(value).tolist()
  return value
