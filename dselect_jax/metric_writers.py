"""Metrics to a JSON-lines file and TensorBoard event files (no TensorFlow)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Appends ``{'step', 'split', ...}`` records to ``workdir/metrics.jsonl``
  and writes every scalar (and each expert weight) to TensorBoard under
  ``workdir/tensorboard`` as ``split/name``.

  Disabled writers (processes other than 0) write nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self._path = os.path.join(workdir, METRICS_FILE)
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir,
                                                         'tensorboard'))
    except ImportError:
      pass

  def write(self, step: int, split: str, values: Mapping[str, Any]):
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: _plain(v) for k, v in values.items()})
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
            self._tb.add_scalar(f'{split}/expert_weight_task{t + 1}/{e}', w,
                                step)

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
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _plain(value):
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  if hasattr(value, 'tolist'):  # jax arrays
    return np.asarray(value).tolist()
  return value
