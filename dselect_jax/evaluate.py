"""Evaluation: a whole split at once, the final test, and eval.py's workdirs.

``Evaluator`` computes each task's metric and loss over every example of a
split once (padded batches, masked), with each task's expert weights;
``final_test`` evaluates the best-on-validation checkpoint of a run;
``restore_workdir`` restores any checkpoint of a train.py workdir and
``evaluate_workdir`` evaluates it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from dselect_jax import checkpointing
from dselect_jax import config_schema
from dselect_jax import datasets
from dselect_jax import factory
from dselect_jax import files
from dselect_jax import metric_writers
from dselect_jax import models
from dselect_jax import steps
from dselect_jax import tasks
from dselect_jax.datasets import batching
from dselect_jax.datasets.spec import DataSpec

# The metrics-file split of the test passes after each epoch.
TEST_EPOCH = 'test_epoch'


class Evaluator:
  """Each task's metric and mean loss over every example of a split once,
  and each task's expert weights (mean over examples per-example).

  The outputs of all examples (of every process) are gathered and each
  task gets its kind's metric (``tasks.metric``: accuracy, AUC, RMSE) and
  weighted loss: ``per_task`` ``{'metric': (T,), 'loss': (T,)}`` with the
  metrics' names in ``metric_names``, as ``metric_writers.flatten``
  writes them. ``selection_score`` (``tasks.selection_score``, higher is
  better) is what the trainer keeps its best checkpoint on.

  With ``sparse`` and static gates, only the experts that some task still
  weighs are computed (``MultiTaskMoE.active_experts``): the others have
  weight exactly 0, so the outputs are the dense ones. Once DSelect-k has
  converged to k experts per task, evaluation is that much cheaper. One
  compiled step is kept per set of active experts. With ``dispatch`` and
  per-example gates (``models.dispatches``), each batch is dispatched:
  each expert computes only the examples routed to it
  (``steps.Dispatcher``), again the dense outputs.
  """

  def __init__(
    self,
    model: models.MultiTaskMoE | models.RecommenderMoE,
    num_devices: int,
    task_kinds: tuple[str, ...],
    sparse: bool = True,
    dispatch: bool = False,
  ):
    self.model = model
    self.num_devices = num_devices
    self.sparse = sparse and not model.per_example
    self.task_kinds = tuple(task_kinds)
    self._steps = {}
    self.dispatcher = None
    if dispatch and models.dispatches(model, train=False):
      self.dispatcher = steps.Dispatcher(
        model,
        lambda m: steps.parallel(functools.partial(steps.eval_step, m)),
      )

  def _step(self, active):
    if active not in self._steps:
      model = (
        self.model
        if active is None
        else self.model.clone(active_experts=active)
      )
      self._steps[active] = steps.parallel(
        functools.partial(steps.eval_step, model)
      )
    return self._steps[active]

  def active(self, state) -> Optional[tuple[int, ...]]:
    return steps.used_experts(self.model, state) if self.sparse else None

  def __call__(self, state, split, batch_size: int) -> dict[str, Any]:
    p_eval_step = self._step(self.active(state))
    totals, gate_weights, gathered = None, None, []
    for batch in batching.eval_batches(
      split,
      batch_size,
      self.num_devices,
      jax.process_index(),
      jax.process_count(),
    ):
      if self.dispatcher is not None:
        p_eval_step = self.dispatcher(state, batch)
      sums, weights, outputs = p_eval_step(state, batch)
      if self.dispatcher is not None:
        self.dispatcher.observe(
          {n: sums.pop(n) for n in steps.DISPATCH_REPORT if n in sums}
        )
      sums = jax.tree.map(lambda x: np.asarray(x, np.float64)[0], sums)
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
      if np.ndim(weights) == 3:  # (devices, T, E): static weights.
        gate_weights = np.asarray(weights)[0]
      gathered.append(_examples(outputs, batch))
    return {
      **_task_scores(self.task_kinds, gathered),
      **_gate_summary(totals, gate_weights),
    }


def _examples(outputs, batch) -> tuple[np.ndarray, ...]:
  """A batch's real examples: outputs (N, T, ...), targets and weights
  (N, T), from the devices' (devices, T, b, ...) and (devices, b, T)."""
  outputs = np.asarray(outputs)
  num_tasks = outputs.shape[1]
  keep = np.asarray(batch['mask']).reshape(-1) > 0
  outputs = np.moveaxis(outputs, 1, 2)
  outputs = outputs.reshape(-1, num_tasks, *outputs.shape[3:])
  target = np.asarray(batch['target']).reshape(-1, num_tasks)
  weight = np.asarray(batch['weight']).reshape(-1, num_tasks)
  return outputs[keep], target[keep], weight[keep]


def _task_scores(task_kinds, gathered) -> dict[str, Any]:
  """Each task's metric and loss over all examples of every process."""
  outputs, target, weight = (np.concatenate(a) for a in zip(*gathered))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    outputs, target, weight = (
      np.asarray(multihost_utils.process_allgather(a, tiled=True))
      for a in (outputs, target, weight)
    )
  metric, loss = [], []
  for t, kind in enumerate(task_kinds):
    args = (outputs[:, t], target[:, t], weight[:, t])
    metric.append(tasks.metric(kind, *args))
    loss.append(float(tasks.loss(kind, *args)))
  return {
    'num_examples': len(outputs),
    'metric_names': [tasks.METRIC[kind] for kind in task_kinds],
    metric_writers.PER_TASK: {
      'metric': np.array(metric),
      'loss': np.array(loss),
    },
    'selection_score': tasks.selection_score(task_kinds, metric, loss),
  }


def headline(result: dict[str, Any]) -> str:
  """Each task's metric in one line, from a result or a stored record:
  ``accuracy 0.9412 / 0.9301`` or ``auc 0.9102, rmse 0.9431``."""
  pairs = metric_writers.task_metrics(result)
  if len({name for name, _ in pairs}) == 1:
    return f'{pairs[0][0]} ' + ' / '.join(f'{v:.4f}' for _, v in pairs)
  return ', '.join(f'{name} {v:.4f}' for name, v in pairs)


def _gate_summary(totals, gate_weights) -> dict[str, Any]:
  """Each task's expert weights, non-zero count and selected experts."""
  count = totals['count']
  result = {}
  if gate_weights is not None:
    expert_weights = gate_weights
    nonzero = (gate_weights > 0).sum(-1)
  else:
    expert_weights = totals['weight_sum'] / count[:, None]
    nonzero = totals['nonzero_sum'] / count
  result['expert_weights'] = np.asarray(expert_weights).tolist()
  result['num_nonzero'] = np.asarray(nonzero).tolist()
  result['selected_experts'] = [
    [int(e) for e in np.flatnonzero(np.asarray(w) > 0)] for w in expert_weights
  ]
  return result


def make_evaluator(config, model, spec: DataSpec) -> Evaluator:
  """The Evaluator of a data set (``spec``) on the local devices."""
  return Evaluator(
    model,
    jax.local_device_count(),
    spec.task_kinds,
    config.model.sparse_eval,
    config.model.sparse_dispatch,
  )


def final_test(config, workdir, abstract, test_split, ckpts, evaluator, writer):
  """Evaluates the best-on-validation checkpoint on the test split (the
  last one when there is no validation split), with the statistics of the
  test passes after each epoch when the run made them; ``abstract``: the
  state's shapes (``factory.abstract_state``)."""
  if ckpts.best_step() is not None:
    step, kind = ckpts.best_step(), 'best'
    state = ckpts.restore_best(abstract)
  else:
    step, kind = ckpts.latest_step(), 'last'
    state = ckpts.restore(abstract, step)
  result = test_checkpoint(
    evaluator, state, test_split, config.eval_batch_size, step, kind
  )
  logging.info(
    'test (%s checkpoint, step %d): %s', kind, step, headline(result)
  )
  writer.write(step, 'test', result)
  writer.flush()
  result = with_test_statistics(result, workdir)
  if jax.process_index() == 0:
    files.write_atomically(
      os.path.join(workdir, 'test_metrics.json'),
      json.dumps(result, indent=2),
    )
  return result


def test_checkpoint(
  evaluator: Evaluator, state, split, batch_size: int, step: int, kind: str
) -> dict[str, Any]:
  """The evaluator's result of one checkpoint's (unreplicated) ``state`` on
  ``split`` as it is written (``metric_writers.flatten``), with the
  checkpoint's ``step`` and ``kind`` ('best', 'last', 'periodic' or
  'params')."""
  result = evaluator(steps.replicate(state), split, batch_size)
  return {**metric_writers.flatten(result), 'step': step, 'checkpoint': kind}


def with_test_statistics(result: dict[str, Any], workdir: str):
  """``result`` with ``test_statistics`` added when the run in ``workdir``
  made test passes after its epochs."""
  statistics = test_statistics(metric_writers.read_metrics(workdir), result)
  return {**result, 'test_statistics': statistics} if statistics else result


def test_statistics(records, selected: dict[str, Any]) -> dict[str, Any]:
  """Four test figures side by side, from the test passes after each epoch.

  ``selected``: the test result of the checkpoint chosen on validation.
  Returns {} when the run made no such passes. Each figure has
  ``accuracy_<t>`` per task:
    ``best_validation``: ``selected`` (a fair estimate);
    ``last_epoch``: the pass after the last epoch;
    ``max_over_epochs``: each task's best pass (``epoch_<t>`` says which):
      selected on the test split itself, so not a fair estimate;
    ``pooled_over_epochs``: correct answers over all passes / examples over
      all passes, PaddleRec's reported statistic (its tools/infer.py never
      reset its accuracy metric across the epochs' checkpoints).
  """
  by_step = {r['step']: r for r in records if r.get('split') == TEST_EPOCH}
  if not by_step:  # A resumed run may have written a step twice: the last.
    return {}
  passes = [by_step[s] for s in sorted(by_step)]
  accuracy = np.array(
    [metric_writers.task_values(p, 'accuracy') for p in passes]
  )  # (passes, T)
  count = np.array([p['num_examples'] for p in passes], np.float64)
  best = np.argmax(accuracy, axis=0)  # (T,)

  def per_task(values):
    return {f'accuracy_{t + 1}': float(v) for t, v in enumerate(values)}

  return {
    'num_passes': len(passes),
    'best_validation': {
      'step': selected['step'],
      'checkpoint': selected['checkpoint'],
      **per_task(metric_writers.task_values(selected, 'accuracy')),
    },
    'last_epoch': {'step': passes[-1]['step'], **per_task(accuracy[-1])},
    'max_over_epochs': {
      'note': 'chosen on the test split: not a fair estimate',
      **per_task(np.max(accuracy, axis=0)),
      **{f'step_{t + 1}': passes[b]['step'] for t, b in enumerate(best)},
    },
    'pooled_over_epochs': {
      'note': "PaddleRec's statistic: correct / examples over every pass",
      **per_task(count @ accuracy / np.sum(count)),
    },
  }


def _listing(workdir: str) -> str:
  entries = sorted(os.listdir(workdir))
  return ', '.join(entries) if entries else 'nothing'


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config train.py wrote into ``workdir/config.json``, made
  whole (``config_schema.complete``) and checked; every problem with the
  workdir or the file is one line that names it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise checkpointing.CheckpointError(
      f'{workdir} is a file, not a workdir; pass the --workdir given to '
      'train.py.'
    )
  if not os.path.isdir(workdir):
    raise checkpointing.CheckpointError(
      f'workdir {workdir} does not exist; pass the --workdir given to train.py.'
    )
  checkpointing.check_layout(workdir)
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise checkpointing.CheckpointError(
      f'{workdir} holds no config.json, so no training run wrote it (it '
      f'holds: {_listing(workdir)}); run train.py with --workdir={workdir} '
      'first.'
    )
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError.
    raise checkpointing.CheckpointError(
      f'{path} cannot be read as the JSON train.py writes ({e}); it was cut '
      'short or edited: restore it from a copy, or train again in a new '
      'workdir.'
    ) from None
  if not isinstance(saved, dict):
    raise checkpointing.CheckpointError(
      f'{path} holds a JSON {type(saved).__name__}, not a config; restore '
      'it from a copy, or train again in a new workdir.'
    )
  return config_schema.complete(ml_collections.ConfigDict(saved), path)


class Restored(NamedTuple):
  """A checkpoint of a workdir, ready to evaluate (``restore_workdir``)."""

  config: ml_collections.ConfigDict
  model: models.MultiTaskMoE | models.RecommenderMoE
  dataset: datasets.Dataset  # Its splits are read on first use.
  state: factory.TrainState
  kind: str  # 'best', 'periodic' or 'params'.
  step: int


def restore_workdir(
  workdir: str,
  step: Optional[int] = None,
  best: bool = False,
  data_dir: Optional[str] = None,
) -> Restored:
  """Restores a checkpoint of ``workdir`` into the model of its config.
  Reads no data: the returned ``dataset`` reads a split when asked.

  Args:
    workdir: a train.py workdir.
    step: a periodic checkpoint's step (``workdir/checkpoints/<step>``).
    best: the best-on-validation checkpoint. Default when neither is given:
      the best one if there is one, else the newest periodic one.
    data_dir: the data folder to read instead of the config's
      ``data.data_dir`` (``data.paddlerec_dir`` for PaddleRec's pickles), for
      a workdir trained where the data lived elsewhere.
  """
  config = load_workdir_config(workdir)
  if data_dir:
    field = 'paddlerec_dir' if config.data.name == 'paddlerec' else 'data_dir'
    config.data[field] = data_dir
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  params_only = checkpointing.params_steps(workdir)
  if step is None and not best:
    best = ckpts.best_step() is not None
  if (
    step is None
    and not best
    and ckpts.latest_step() is None
    and not params_only
  ):
    raise checkpointing.CheckpointError(
      f'{workdir} holds no checkpoint yet (it holds: {_listing(workdir)}); '
      'train first, or wait for the first checkpoint.'
    )
  num_devices = jax.local_device_count()
  if config.eval_batch_size % num_devices:
    config.eval_batch_size = num_devices * (
      -(-config.eval_batch_size // num_devices)
    )
  dataset = datasets.resolve(config.data)
  model = factory.create_model(config, dataset.spec, bn_axis_name=steps.AXIS)
  # The optimizer state's structure does not depend on how long the
  # learning-rate schedule is, so restoring it needs no count of training
  # steps (and so not the train split).
  tx = factory.create_optimizer(config, num_train_steps=1)
  abstract = factory.abstract_state(model, tx, dataset.spec)
  if best:
    state, kind, step = ckpts.restore_best(abstract), 'best', ckpts.best_step()
  elif params_only and (
    step is None and ckpts.latest_step() is None or step in params_only
  ):
    # An export of scripts/export_params.py: only the tested params.
    step = params_only[-1] if step is None else step
    kind = 'params'
    state = checkpointing.restore_params(workdir, step, abstract)
  else:
    step = ckpts.latest_step() if step is None else step
    state, kind = ckpts.restore(abstract, step), 'periodic'
  ckpts.close()
  return Restored(config, model, dataset, state, kind, int(step))


def evaluate_workdir(
  workdir: str,
  step: Optional[int] = None,
  best: bool = False,
  data_dir: Optional[str] = None,
) -> dict[str, Any]:
  """Restores a checkpoint of ``workdir`` (``restore_workdir``, same
  arguments) and evaluates it on the test split.

  Returns:
    Test accuracy and loss per task, expert weights and selected experts, and
    ``step`` / ``checkpoint`` naming what was evaluated.
  """
  config, model, dataset, state, kind, step = restore_workdir(
    workdir, step, best, data_dir
  )
  result = test_checkpoint(
    make_evaluator(config, model, dataset.spec),
    state,
    dataset.test,
    config.eval_batch_size,
    step,
    kind,
  )
  return with_test_statistics(result, workdir)


def report(result: dict[str, Any]) -> list[str]:
  """A test result as lines to print: each task's metric, loss, selected
  experts and weights, then the statistics of the per-epoch test passes."""
  lines = [
    f'test split, {result["checkpoint"]} checkpoint at step '
    f'{result["step"]} ({result["num_examples"]} examples):'
  ]
  losses = metric_writers.task_values(result, 'loss')
  for t, (metric, value) in enumerate(metric_writers.task_metrics(result), 1):
    weights = [round(w, 4) for w in result['expert_weights'][t - 1]]
    lines.append(
      f'  task {t}: {metric} {value:.6f}  loss {losses[t - 1]:.6f}  '
      f'experts {result["selected_experts"][t - 1]}  weights {weights}'
    )
  stats = result.get('test_statistics')
  if stats:
    lines.append(
      f'test passes after each of {stats["num_passes"]} epochs '
      '(test_metrics.json: test_statistics):'
    )
    for name, label in (
      ('best_validation', 'best-validation checkpoint'),
      ('last_epoch', 'last epoch'),
      ('max_over_epochs', 'max over epochs (chosen on test: not fair)'),
      ('pooled_over_epochs', "pooled over epochs (PaddleRec's statistic)"),
    ):
      accs = ' / '.join(
        f'{a:.6f}' for a in metric_writers.task_values(stats[name], 'accuracy')
      )
      lines.append(f'  {label:44s} {accs}')
  return lines
