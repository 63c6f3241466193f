"""The training loop: resume, train, validate, test, checkpoint; read it top
to bottom.

``train_and_evaluate(config, workdir)`` is all of it: the config's data set
is resolved (``datasets``), the config checked (``config_schema``) and turned
into a model, an optimizer and a state (``factory``), the mapped steps
(``steps``) run over the batches of ``datasets.batching``, the
``evaluate.Evaluator`` measures validation (and, with ``test_every_epoch``,
test) after each epoch, ``checkpointing`` saves the latest and the best
state, and the best checkpoint is tested at the end
(``evaluate.final_test``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import threading
import time
from typing import Any

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from dselect_jax import checkpointing
from dselect_jax import config_schema
from dselect_jax import datasets
from dselect_jax import evaluate
from dselect_jax import factory
from dselect_jax import files
from dselect_jax import metric_writers
from dselect_jax import provenance
from dselect_jax import steps
from dselect_jax.datasets import batching


class TrainingError(Exception):
  """Training cannot go on (NaN loss...). The message says why."""


class Interrupted(Exception):
  """SIGTERM or Ctrl-C: a checkpoint was saved at the current step."""


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` when it holds checkpoints), then
  evaluates the best-on-validation checkpoint on the test split.

  Returns the test metrics, also written to ``workdir/test_metrics.json``.
  """
  config_schema.check_fields(config)  # First: a bad data.name is a field's.
  dataset = datasets.resolve(config.data)
  config_schema.validate(config, jax.device_count(), dataset.spec)
  is_chief = jax.process_index() == 0
  _check_writable(workdir)
  # Every process of a multi-host run shares the workdir: process 0 holds
  # the lock for them all.
  lock = checkpointing.WorkdirLock(workdir) if is_chief else None
  try:
    return _train_and_evaluate(config, dataset, workdir, is_chief)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, dataset, workdir, is_chief):
  """The loop proper; train_and_evaluate holds the workdir lock around it."""
  num_devices = jax.local_device_count()
  train_split, valid_split, test_split = (
    dataset.train,
    dataset.validation,
    dataset.test,
  )
  spec = dataset.spec
  config_schema.validate_against_data(config, len(train_split), len(test_split))
  steps_per_epoch = len(train_split) // config.batch_size
  num_train_steps = factory.num_train_steps(config, len(train_split))
  eval_every = _cadence(config.eval_every_steps, steps_per_epoch)
  ckpt_every = _cadence(config.checkpoint_every_steps, eval_every)
  logging.info(
    'data %s: tasks %s; %d train, %d validation, %d test; %d steps of '
    'batch %d on %d devices',
    config.data.name + (f'/{config.data.recipe}' if spec.is_image else ''),
    ', '.join(f'{n} ({k})' for n, k in zip(spec.task_names, spec.task_kinds)),
    len(train_split),
    len(valid_split),
    len(test_split),
    num_train_steps,
    config.batch_size,
    num_devices,
  )

  model = factory.create_model(config, spec, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, num_train_steps)
  abstract = factory.abstract_state(model, tx, spec)
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  if spec.is_image:
    logging.info(
      'model: %d parameters; experts with %s convolutions and %s BatchNorm',
      num_params,
      factory.conv_impl(config),
      factory.norm_impl(config),
    )
  else:
    logging.info('model: %d parameters; MLP experts', num_params)

  # Every write checks that the file system keeps room for two checkpoints.
  ckpts = checkpointing.Checkpoints(
    workdir,
    config.max_to_keep,
    state_bytes=sum(
      x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract)
    ),
  )
  ckpts.check_space('checkpoints')
  if ckpts.latest_step() is None:
    state = factory.initial_state(model, tx, jax.random.key(config.seed), spec)
    start_step = 0
  else:
    try:
      start_step, state = ckpts.restore_latest_good(abstract)
    except checkpointing.CheckpointError as e:
      raise checkpointing.CheckpointError(
        f'{e}{_config_difference(workdir, config)}'
      ) from None
    logging.info('resumed from step %d', start_step)
  ckpts.set_aside_foreign_best(start_step, abstract)
  # Written once the data and any checkpoint have loaded, so a run that fails
  # on bad input leaves the workdir's config.json as it was.
  if is_chief:
    files.write_atomically(
      os.path.join(workdir, 'config.json'),
      config.to_json_best_effort(indent=2) + '\n',
    )
    provenance.record(workdir, start_step)
  state = steps.replicate(state)
  rng = jax.random.key(config.seed + 1)

  evaluator = evaluate.make_evaluator(config, model, spec)
  train_steps = steps.SparseTrainSteps(model, config, spec.task_kinds)
  p_train_step = train_steps(state, start_step)
  # Multi-host, only process 0 writes metrics: it cannot stop alone, so there
  # the collective check before each save is the only one.
  writer = metric_writers.MetricWriter(
    workdir,
    enabled=is_chief,
    check_space=ckpts.check_space if jax.process_count() == 1 else None,
  )
  batches = batching.train_batches(
    train_split,
    config.batch_size,
    num_devices,
    config.seed,
    start_step=start_step,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    shuffle=config.data.shuffle,
    epoch_split=dataset.fresh_train() if config.data.fresh_train else None,
  )

  history, last_good = [], ckpts.latest_step()
  interval_start, timer = start_step, time.perf_counter()
  try:
    with _StopRequest() as stop:
      for step in range(start_step + 1, num_train_steps + 1):
        state, metrics = p_train_step(state, next(batches), rng)
        history.append(metrics)
        is_last = step == num_train_steps
        if (
          step % config.log_every_steps == 0
          or step % eval_every == 0
          or is_last
          or stop.signal
        ):
          history = [
            jax.tree.map(lambda x: np.asarray(x)[0], m) for m in history
          ]
          _check_finite(history, interval_start + 1, step, last_good)
          _log_train(
            writer,
            history,
            step,
            num_train_steps,
            time.perf_counter() - timer,
            interval_start,
            config.batch_size,
            steps.static_weights(model, state),
          )
          history, interval_start, timer = [], step, time.perf_counter()
          p_train_step = train_steps(state, step)
        if (step % eval_every == 0 or is_last) and len(valid_split):
          valid = evaluator(state, valid_split, config.eval_batch_size)
          writer.write(step, 'validation', valid)
          logging.info(
            'validation at step %d: %s, experts %s',
            step,
            evaluate.headline(valid),
            valid['selected_experts'],
          )
          ckpts.save_best(
            step, flax.jax_utils.unreplicate(state), valid['selection_score']
          )
        if config.test_every_epoch and step % steps_per_epoch == 0:
          # PaddleRec's statistic pools these passes (evaluate.test_statistics).
          test = evaluator(state, test_split, config.eval_batch_size)
          writer.write(step, evaluate.TEST_EPOCH, test)
          logging.info(
            'test at step %d (epoch %d): %s',
            step,
            step // steps_per_epoch,
            evaluate.headline(test),
          )
        if step % ckpt_every == 0 or is_last or stop.signal:
          ckpts.save(step, flax.jax_utils.unreplicate(state))
          last_good = step
        if stop.signal and not is_last:
          ckpts.wait()
          raise Interrupted(_stopped_message(stop.signal, step, ckpts))
  except BaseException:
    writer.close()
    raise
  finally:
    ckpts.wait()

  try:
    return evaluate.final_test(
      config, workdir, abstract, test_split, ckpts, evaluator, writer
    )
  finally:
    writer.close()
    for dispatcher in (train_steps.dispatcher, evaluator.dispatcher):
      if dispatcher is not None:  # Its compilation ahead, if any, ends.
        dispatcher.close()


# ---------------------------------------------------------------------------
# Helpers of the loop.
# ---------------------------------------------------------------------------


def _check_writable(workdir: str):
  """Before any training: a read-only or full file system is one line, not
  an error hours later."""
  if os.path.isdir(workdir):
    checkpointing.check_layout(workdir)
  why = checkpointing.unwritable(workdir)
  if why:
    raise checkpointing.CheckpointError(
      f'cannot write the workdir {workdir}: {why}; give a --workdir on a '
      'writable file system with free space.'
    )


def _config_difference(workdir: str, config) -> str:
  """The config fields in which ``config`` differs from the workdir's
  ``config.json`` (the config its checkpoints were made with), as a
  sentence to end an error with; empty when there is nothing to compare."""
  try:
    saved = config_schema.flat_fields(evaluate.load_workdir_config(workdir))
  except (checkpointing.CheckpointError, OSError, ValueError):
    return ''
  # Through JSON as config.json went, so that tuples compare as lists.
  here = config_schema.flat_fields(
    ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  )
  fields = [
    f'{key} ({saved.get(key, "unset")!r} there, {here.get(key, "unset")!r} '
    'here)'
    for key in sorted(set(saved) | set(here))
    if saved.get(key) != here.get(key)
  ]
  if not fields:
    return ''
  return f" The workdir's config.json differs in {', '.join(fields)}."


def _cadence(value: int, steps_per_epoch: int) -> int:
  return steps_per_epoch if value <= 0 else value


def _check_finite(metrics_history, first_step, last_step, last_good):
  losses = [float(m['loss']) for m in metrics_history]
  if not all(math.isfinite(x) for x in losses):
    saved = (
      'no checkpoint was saved yet'
      if last_good is None
      else f'the last good checkpoint is step {last_good}'
    )
    raise TrainingError(
      f'loss became NaN or Inf between steps {first_step} and {last_step}; '
      f'stopped without saving ({saved}). Lower optimizer.learning_rate or '
      'set optimizer.grad_clip_norm.'
    )


def _stopped_message(signal_name, step, ckpts) -> str:
  """What a stop by signal left: only a checkpoint that is on disk."""
  if step in ckpts.all_steps():
    return (
      f'{signal_name} at step {step}: saved a checkpoint there; run the '
      'same command to resume.'
    )
  newest = ckpts.latest_step()
  where = (
    'no checkpoint was saved, so a new run starts from step 0'
    if newest is None
    else f'the newest complete checkpoint is step {newest}, where the same '
    'command resumes'
  )
  return (
    f'{signal_name} at step {step}: the checkpoint of that step was not '
    f'written; {where}.'
  )


class _StopRequest:
  """Turns SIGTERM and SIGINT into a flag the loop polls between steps."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def peak_rss_mb() -> float:
  """This process's peak resident memory so far, in MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == 'darwin' else peak / 2**10  # B, KiB


def _log_train(
  writer,
  history,
  step,
  num_train_steps,
  elapsed,
  interval_start,
  batch_size,
  expert_weights=None,
):
  steps_per_s = (step - interval_start) / max(elapsed, 1e-9)
  # The mean over the interval's steps, per-task values as arrays (T,).
  summary = jax.tree.map(lambda *v: np.mean(v, axis=0), *history)
  if expert_weights is not None:  # Static gates: (T, E) at this step.
    summary['expert_weights'] = expert_weights.tolist()
  summary['steps_per_second'] = steps_per_s
  summary['images_per_second'] = steps_per_s * batch_size
  summary['peak_rss_mb'] = peak_rss_mb()
  writer.write(step, 'train', summary)
  eta = (num_train_steps - step) / max(steps_per_s, 1e-9)
  # Accuracy when every task is a classification, else each task's loss.
  shown = 'accuracy' if 'accuracy' in summary['per_task'] else 'loss'
  logging.info(
    'step %d/%d  loss %.4f  %s %s  experts %s  %.2f steps/s  %.0f examples/s'
    '  ETA %s',
    step,
    num_train_steps,
    summary['loss'],
    'acc' if shown == 'accuracy' else 'task losses',
    _per_task(summary['per_task'][shown], 4),
    _per_task(summary['per_task']['num_nonzero'], 1),
    steps_per_s,
    summary['images_per_second'],
    _format_seconds(eta),
  )


def _per_task(values, digits: int) -> str:
  """One value per task as ``0.9412/0.9301``."""
  return '/'.join(f'{v:.{digits}f}' for v in values)


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
