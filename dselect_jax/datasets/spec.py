"""What a model, its losses and its metrics need to know of a data set."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A data set's tasks and inputs.

  ``task_names`` and ``task_kinds`` (``tasks.KINDS``) name each task and
  decide its output, loss and metric. Image data sets give ``num_classes``
  per task and ``image_shape`` (H, W, channels); feature data sets give
  ``cardinalities`` ((name, number of ids) of each categorical feature) and
  ``num_dense`` (the dense features per example). ``fresh_train``: the
  train split can be re-drawn every epoch (``Dataset.fresh_train``).
  """

  task_names: tuple[str, ...]
  task_kinds: tuple[str, ...]
  num_classes: int = 1
  image_shape: Optional[tuple[int, int, int]] = None
  cardinalities: tuple[tuple[str, int], ...] = ()
  num_dense: int = 0
  fresh_train: bool = False

  @property
  def num_tasks(self) -> int:
    return len(self.task_kinds)

  @property
  def is_image(self) -> bool:
    return self.image_shape is not None
