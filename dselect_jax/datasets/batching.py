"""Batches of any split, spread over the local devices. NumPy only.

A split is anything with ``len`` and ``batch(rows)`` (``multimnist.Split``,
``movielens.Split``); its batch is a dict of arrays, nested for categorical
features, and every array gets a leading devices axis here. Training reads
endless shuffled batches from any global step, so a resumed run sees the
batches an uninterrupted one would have; evaluation reads every example
once, the last batch padded and masked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

import numpy as np


def check_batch_size(global_batch: int, num_devices: int) -> int:
  """The per-device batch; a clear error when the division is not exact."""
  if global_batch < 1 or global_batch % num_devices:
    raise ValueError(
      f'batch_size={global_batch} must be a positive multiple of the '
      f'{num_devices} devices; set --config.batch_size to a multiple '
      f'of {num_devices}.'
    )
  return global_batch // num_devices


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffle order of one epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _local_rows(global_batch, num_devices, process_index, process_count):
  """(per_device, this process's slice of a global batch)."""
  per_device = check_batch_size(global_batch, num_devices * process_count)
  local = per_device * num_devices
  return per_device, slice(process_index * local, (process_index + 1) * local)


def _map(fn, tree):
  """``fn`` on every array of a batch (a dict, nested for categorical
  features)."""
  if isinstance(tree, dict):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(tree)


def _per_device(batch, num_devices: int, per_device: int):
  """(N, ...) leaves -> (devices, per_device, ...)."""
  return _map(lambda x: x.reshape(num_devices, per_device, *x.shape[1:]), batch)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  """Zero rows appended to reach ``size``."""
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def train_batches(
  split,
  global_batch: int,
  num_devices: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  shuffle: bool = True,
  epoch_split: Optional[Callable[[int], Any]] = None,
) -> Iterator[dict]:
  """Endless shuffled batches, from global step ``start_step`` on.

  ``split``: any split with ``len`` and ``batch(rows)`` (a ``Split``, a
  ``movielens.Split``). Step s reads batch ``s % steps_per_epoch`` of epoch
  ``s // steps_per_epoch`` (a partial last batch is dropped), so a resumed
  run sees exactly the batches an uninterrupted one would have. With
  several processes, each yields its own slice of the same global batch for
  its local devices. ``shuffle=False`` reads the split in stored order
  every epoch (as PaddleRec does); ``epoch_split(e)``, when given, is epoch
  e's split (of ``len(split)`` examples; ``FreshTrainSplits``).

  Yields:
    ``split.batch(rows)`` with every array shaped (devices, per_device,
    ...); for images ``{'image': float32 (devices, per_device, 36, 36, 1),
    'target': int32 (devices, per_device, 2), 'weight': ...}``.
  """
  per_device, local = _local_rows(
    global_batch, num_devices, process_index, process_count
  )
  steps_per_epoch = len(split) // global_batch
  if steps_per_epoch == 0:
    raise ValueError(
      f'batch_size={global_batch} is larger than the '
      f'{len(split)} training examples; lower it.'
    )
  step = start_step
  while True:
    epoch, index = divmod(step, steps_per_epoch)
    if epoch_split is not None:
      split = epoch_split(epoch)
    order = (
      epoch_permutation(len(split), seed, epoch)
      if shuffle
      else np.arange(len(split))
    )
    while index < steps_per_epoch:
      # Sorted before slicing: device d of the global batch reads the same
      # rows whatever the number of processes.
      rows = np.sort(order[index * global_batch : (index + 1) * global_batch])
      yield _per_device(split.batch(rows[local]), num_devices, per_device)
      index += 1
      step += 1


def eval_batches(
  split,
  global_batch: int,
  num_devices: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict]:
  """Every example exactly once, in order; the last batch padded with zeros.

  Yields the train batches' keys plus ``mask``: float32 (devices,
  per_device), 1 for real examples and 0 for padding.
  """
  per_device, local = _local_rows(
    global_batch, num_devices, process_index, process_count
  )
  for start in range(0, len(split), global_batch):
    batch = split.batch(np.arange(start, min(start + global_batch, len(split))))
    mask = np.zeros(global_batch, np.float32)
    mask[: len(split) - start] = 1
    if len(split) - start < global_batch:
      batch = _map(lambda x: _pad(x, global_batch), batch)
    batch = _map(lambda x: x[local], batch)
    batch['mask'] = mask[local]
    yield _per_device(batch, num_devices, per_device)
