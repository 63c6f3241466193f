"""Orbax checkpoints of a run: the latest few for resuming, the best apart.

``workdir/checkpoints/<step>``: periodic saves, ``max_to_keep`` newest kept;
training resumes from the newest. ``workdir/best/<step>``: the one checkpoint
with the highest validation ``accuracy_mean``, used for the final test.
Both use Orbax's ``CheckpointManager`` with ``ocp.args.StandardSave`` /
``StandardRestore`` into the structure the config defines.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp

BEST_METRIC = 'accuracy_mean'


class CheckpointError(Exception):
  """A checkpoint is missing or does not fit the model. Says what there is."""


class Checkpoints:
  """The two checkpoint managers of a workdir."""

  def __init__(self, workdir: str, max_to_keep: int = 2, create: bool = True):
    self.workdir = os.path.abspath(workdir)
    self._latest = ocp.CheckpointManager(
        os.path.join(self.workdir, 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=create))
    self._best = ocp.CheckpointManager(
        os.path.join(self.workdir, 'best'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=create,
            best_fn=lambda metrics: metrics[BEST_METRIC], best_mode='max'))

  def latest_step(self) -> Optional[int]:
    return self._latest.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._latest.all_steps())

  def best_step(self) -> Optional[int]:
    return self._best.best_step()

  def save(self, step: int, state: Any):
    self._latest.save(step, args=ocp.args.StandardSave(state))

  def save_best(self, step: int, state: Any, metric: float):
    self._best.save(step, args=ocp.args.StandardSave(state),
                    metrics={BEST_METRIC: float(metric)})

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """The periodic checkpoint at ``step`` (default: newest)."""
    return self._restore(self._latest, abstract_state,
                         self.latest_step() if step is None else step,
                         'periodic')

  def restore_best(self, abstract_state: Any) -> Any:
    return self._restore(self._best, abstract_state, self.best_step(), 'best')

  def _restore(self, manager, abstract_state, step, kind):
    steps = list(manager.all_steps())
    if step is None or step not in steps:
      raise CheckpointError(
          f'no {kind} checkpoint at step {step} in {self.workdir}; its {kind} '
          f'checkpoints are at steps {steps or "none"}.')
    try:
      return manager.restore(step,
                             args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f'{kind} checkpoint {step} in {self.workdir} does not fit the model '
          f'of this config: {str(e).splitlines()[0][:300]}') from None

  def wait(self):
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self):
    self._latest.close()
    self._best.close()
