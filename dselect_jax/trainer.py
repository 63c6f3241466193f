"""Training and evaluation of the multi-task MoE; the only module that knows
about pmap, Optax, Orbax and metric files.

Read top to bottom: config -> model and optimizer -> per-device train and eval
steps -> the loop (resume, train, validate, checkpoint) -> final test.

Data parallelism: ``train_step`` and ``eval_step`` are per-device functions
that average over the ``'batch'`` axis with ``lax.pmean``/``lax.psum``
(BatchNorm statistics too, through the model's ``bn_axis_name``), so one step
over D devices equals one step on the whole batch. They are mapped in
``_parallel``; moving to ``jax.shard_map`` changes that one function.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dselect_jax import checkpointing
from dselect_jax import factory
from dselect_jax import input_pipeline
from dselect_jax import metric_writers
from dselect_jax import models

AXIS = 'batch'


class TrainingError(Exception):
  """Training cannot go on (NaN loss...). The message says why."""


class Interrupted(Exception):
  """SIGTERM or Ctrl-C: a checkpoint was saved at the current step."""


# ---------------------------------------------------------------------------
# Per-device steps.
# ---------------------------------------------------------------------------


def task_metrics(logits, labels, mask=None) -> dict[str, jax.Array]:
  """Per-task sums: cross-entropy, correct predictions, example count.

  logits (T, B, C), labels (B, T), mask (B,) -> each value (T,).
  """
  if mask is None:
    mask = jnp.ones(labels.shape[0], logits.dtype)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                       labels.T)  # (T, B)
  correct = (jnp.argmax(logits, -1) == labels.T).astype(logits.dtype)
  return {
      'ce_sum': jnp.sum(ce * mask, axis=1),
      'correct': jnp.sum(correct * mask, axis=1),
      'count': jnp.sum(mask) * jnp.ones(logits.shape[0]),
  }


def gate_summary(expert_weights) -> dict[str, jax.Array]:
  """Per task: mean weight of each expert and experts with non-zero weight.

  expert_weights (T, E) or (T, B, E) -> weights (T, E), nonzero (T,).
  """
  if expert_weights.ndim == 3:
    nonzero = jnp.mean(jnp.sum(expert_weights > 0, -1), axis=-1)
    expert_weights = jnp.mean(expert_weights, axis=1)
  else:
    nonzero = jnp.sum(expert_weights > 0, -1)
  return {'expert_weights': expert_weights,
          'num_nonzero': nonzero.astype(jnp.float32)}


def train_step(state: factory.TrainState, batch, rng, *, loss_config, model=None):
  """One optimizer step on this device's shard; averages over AXIS.

  batch: image (b, 36, 36, 1), label (b, T). ``model`` replaces
  ``state.apply_fn`` (sparse training passes one computing fewer experts).
  Returns (state, metrics), the metrics already averaged over devices.
  """
  apply_fn = state.apply_fn if model is None else model.apply
  step_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                                jax.lax.axis_index(AXIS))
  weights = factory.aux_weights(loss_config, state.step)

  def loss_fn(params):
    (logits, aux), updates = apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'], rngs={'gating': step_rng})
    sums = task_metrics(logits, batch['label'])
    ce = sums['ce_sum'] / sums['count']  # (T,), batch mean per task
    # Each aux term summed over the gates (G,).
    terms = {name: jnp.sum(value) for name, value in aux['gate'].items()
             if name in factory.AUX_WEIGHTS}
    loss = jnp.sum(ce) + sum(weights[n] * v for n, v in terms.items())
    return loss, (updates['batch_stats'], ce, sums, terms, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (batch_stats, ce, sums, terms, aux)), grads = grad_fn(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  # BatchNorm already used cross-device statistics (bn_axis_name); this only
  # removes float noise so every replica holds identical running averages.
  batch_stats = jax.lax.pmean(batch_stats, AXIS)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)

  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
  for t in range(ce.shape[0]):
    metrics[f'ce_{t + 1}'] = ce[t]
    metrics[f'accuracy_{t + 1}'] = sums['correct'][t] / sums['count'][t]
  for name, value in terms.items():
    metrics[f'aux_{name}'] = value
    metrics[f'weight_{name}'] = jnp.asarray(weights[name], jnp.float32)
  gate = gate_summary(aux['expert_weights'])
  for t in range(ce.shape[0]):
    metrics[f'num_nonzero_{t + 1}'] = gate['num_nonzero'][t]
  metrics = jax.lax.pmean(metrics, AXIS)
  return state, metrics


def eval_step(model: models.MultiTaskMoE, state: factory.TrainState, batch):
  """Sums over this device's (masked) shard, summed over AXIS."""
  logits, aux = model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image'], train=False)
  sums = task_metrics(logits, batch['label'], batch['mask'])
  weights = aux['expert_weights']
  if weights.ndim == 3:  # Per-example: sum the masked weights and counts.
    mask = batch['mask'][None, :, None]
    sums['weight_sum'] = jnp.sum(weights * mask, axis=1)  # (T, E)
    sums['nonzero_sum'] = jnp.sum(jnp.sum(weights > 0, -1) * mask[..., 0],
                                  axis=1)  # (T,)
  return jax.lax.psum(sums, AXIS), weights


def _parallel(fn, in_axes=0, donate_argnums=()):
  """Maps a per-device step over the devices, along a leading device axis.

  ``jax.pmap`` over the local devices; on a single device (all hosts
  together), ``jax.jit(jax.vmap(...))`` over the same leading axis of size 1
  instead: the same function, but the collectives, trivial there, vanish,
  while XLA:CPU runs them as ops under pmap, at about 1/6 of the training
  step (benchmarks/data_parallel.py, results/data_parallel.txt). The one
  place to change for ``jax.shard_map`` over a ('batch',) mesh.
  """
  if jax.device_count() > 1:
    return jax.pmap(fn, axis_name=AXIS, in_axes=in_axes,
                    donate_argnums=donate_argnums)
  return _one_device(fn, in_axes, donate_argnums)


def _one_device(fn, in_axes=0, donate_argnums=()):
  return jax.jit(jax.vmap(fn, in_axes=in_axes, axis_name=AXIS),
                 donate_argnums=donate_argnums)


def replicate(tree):
  """One copy of ``tree`` per local device, stacked on a new leading axis
  and placed as the mapped steps return their outputs: sharded along that
  axis over a (``AXIS``,) mesh of the local devices.

  ``flax.jax_utils.replicate`` names its mesh axis otherwise, and JAX
  compiles a pmapped step again for inputs of another sharding: on several
  devices the train step compiled twice, once for the replicated state and
  once for its own output (tests/test_trainer.py).
  """
  devices = jax.local_devices()
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), (AXIS,)),
      jax.sharding.PartitionSpec(AXIS))
  return jax.tree.map(
      lambda x: jax.device_put(
          jnp.broadcast_to(x, (len(devices),) + jnp.shape(x)), sharding),
      tree)


# ---------------------------------------------------------------------------
# Evaluation over a whole split.
# ---------------------------------------------------------------------------


def static_weights(model, state) -> Optional[np.ndarray]:
  """Each task's expert weights (T, E) from the static gates of a replicated
  ``state``; None for per-example gates."""
  if model.per_example:
    return None
  # Copy the (small) gate params to the host before taking replica 0:
  # indexing a pmapped array eagerly runs a device gather per leaf.
  gate_params = {k: v for k, v in state.params.items() if k.startswith('gate')}
  params = jax.tree.map(lambda x: np.asarray(x)[0], gate_params)
  return models.static_expert_weights(model, params)


def used_experts(model, state) -> Optional[tuple[int, ...]]:
  """Experts some static gate of a replicated ``state`` weighs; None: all."""
  weights = static_weights(model, state)
  if weights is None:
    return None
  active = models.active_experts(weights)
  return None if len(active) == model.num_experts else active


class Evaluator:
  """Accuracy and mean cross-entropy per task over every example of a split
  once, and each task's expert weights (mean over examples per-example).

  With ``sparse`` and static gates, only the experts that some task still
  weighs are computed (``MultiTaskMoE.active_experts``): the others have
  weight exactly 0, so the logits are the dense ones. Once DSelect-k has
  converged to k experts per task, evaluation is that much cheaper. One
  compiled step is kept per set of active experts.
  """

  def __init__(self, model: models.MultiTaskMoE, num_devices: int,
               sparse: bool = True):
    self.model = model
    self.num_devices = num_devices
    self.sparse = sparse and not model.per_example
    self._steps = {}

  def _step(self, active):
    if active not in self._steps:
      model = self.model if active is None else self.model.clone(
          active_experts=active)
      self._steps[active] = _parallel(functools.partial(eval_step, model))
    return self._steps[active]

  def active(self, state) -> Optional[tuple[int, ...]]:
    return used_experts(self.model, state) if self.sparse else None

  def __call__(self, state, split, batch_size: int) -> dict[str, Any]:
    p_eval_step = self._step(self.active(state))
    totals, gate_weights = None, None
    for batch in input_pipeline.eval_batches(split, batch_size,
                                             self.num_devices,
                                             jax.process_index(),
                                             jax.process_count()):
      sums, weights = p_eval_step(state, batch)
      sums = jax.tree.map(lambda x: np.asarray(x, np.float64)[0], sums)
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
      if np.ndim(weights) == 3:  # (devices, T, E): static weights.
        gate_weights = np.asarray(weights)[0]
    return _summarize(totals, gate_weights)


def _summarize(totals, gate_weights) -> dict[str, Any]:
  count = totals['count']
  result = {'num_examples': int(count[0])}
  num_tasks = len(count)
  for t in range(num_tasks):
    result[f'accuracy_{t + 1}'] = float(totals['correct'][t] / count[t])
    result[f'loss_{t + 1}'] = float(totals['ce_sum'][t] / count[t])
  result['accuracy_mean'] = float(np.mean(
      [result[f'accuracy_{t + 1}'] for t in range(num_tasks)]))
  if gate_weights is not None:
    expert_weights = gate_weights
    nonzero = (gate_weights > 0).sum(-1)
  else:
    expert_weights = totals['weight_sum'] / count[:, None]
    nonzero = totals['nonzero_sum'] / count
  result['expert_weights'] = np.asarray(expert_weights).tolist()
  result['num_nonzero'] = np.asarray(nonzero).tolist()
  result['selected_experts'] = [
      [int(e) for e in np.flatnonzero(np.asarray(w) > 0)]
      for w in expert_weights]
  return result


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def load_data(config) -> dict[str, input_pipeline.Split]:
  return input_pipeline.load(
      config.data.name, config.data.recipe, config.data.seed,
      data_dir=config.data.data_dir or None, download=config.data.download,
      paddlerec_dir=config.data.paddlerec_dir or None)


def _cadence(value: int, steps_per_epoch: int) -> int:
  return steps_per_epoch if value <= 0 else value


def _check_finite(metrics_history, first_step, last_step, last_good):
  losses = [float(m['loss']) for m in metrics_history]
  if not all(math.isfinite(x) for x in losses):
    saved = ('no checkpoint was saved yet' if last_good is None else
             f'the last good checkpoint is step {last_good}')
    raise TrainingError(
        f'loss became NaN or Inf between steps {first_step} and {last_step}; '
        f'stopped without saving ({saved}). Lower optimizer.learning_rate or '
        'set optimizer.grad_clip_norm.')


def _stopped_message(signal_name, step, ckpts) -> str:
  """What a stop by signal left: only a checkpoint that is on disk."""
  if step in ckpts.all_steps():
    return (f'{signal_name} at step {step}: saved a checkpoint there; run the '
            'same command to resume.')
  newest = ckpts.latest_step()
  where = ('no checkpoint was saved, so a new run starts from step 0'
           if newest is None else
           f'the newest complete checkpoint is step {newest}, where the same '
           'command resumes')
  return (f'{signal_name} at step {step}: the checkpoint of that step was not '
          f'written; {where}.')


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` when it holds checkpoints), then
  evaluates the best-on-validation checkpoint on the test split.

  Returns the test metrics, also written to ``workdir/test_metrics.json``.
  """
  num_devices = jax.local_device_count()
  factory.validate_config(config, jax.device_count())
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  # Every process of a multi-host run shares the workdir: process 0 holds
  # the lock for them all.
  lock = checkpointing.WorkdirLock(workdir) if is_chief else None
  try:
    return _train_and_evaluate(config, workdir, num_devices, is_chief)
  finally:
    if lock is not None:
      lock.release()


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


def _train_and_evaluate(config, workdir, num_devices, is_chief):
  """The loop proper; train_and_evaluate holds the workdir lock around it."""
  data = load_data(config)
  train_split, valid_split, test_split = (data['train'], data['validation'],
                                          data['test'])
  steps_per_epoch = len(train_split) // config.batch_size
  num_train_steps = (config.num_train_steps if config.num_train_steps > 0 else
                     config.num_epochs * steps_per_epoch)
  eval_every = _cadence(config.eval_every_steps, steps_per_epoch)
  ckpt_every = _cadence(config.checkpoint_every_steps, eval_every)
  logging.info('data %s/%s: %d train, %d validation, %d test; %d steps of '
               'batch %d on %d devices', config.data.name, config.data.recipe,
               len(train_split), len(valid_split), len(test_split),
               num_train_steps, config.batch_size, num_devices)

  model = factory.create_model(config, bn_axis_name=AXIS)
  tx = factory.create_optimizer(config, num_train_steps)
  abstract = factory.abstract_state(config, model, tx)
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  logging.info('model: %d parameters; experts with %s convolutions and %s '
               'BatchNorm', num_params, model.expert_kwargs['conv'],
               model.expert_kwargs['norm'])

  ckpts = checkpointing.Checkpoints(workdir, config.max_to_keep)
  if ckpts.latest_step() is None:
    state = factory.initial_state(config, model, tx, jax.random.key(config.seed))
    start_step = 0
  else:
    start_step, state = ckpts.restore_latest_good(abstract)
    logging.info('resumed from step %d', start_step)
  ckpts.set_aside_foreign_best(start_step, abstract)
  # Written once the data and any checkpoint have loaded, so a run that fails
  # on bad input leaves the workdir's config.json as it was.
  if is_chief:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  state = replicate(state)
  rng = jax.random.key(config.seed + 1)

  evaluator = Evaluator(model, num_devices, config.model.get('sparse_eval',
                                                             True))
  train_steps = SparseTrainSteps(model, config)
  p_train_step = train_steps(state, start_step)
  writer = metric_writers.MetricWriter(workdir, enabled=is_chief)
  batches = input_pipeline.train_batches(
      train_split, config.batch_size, num_devices, config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())

  history, last_good = [], ckpts.latest_step()
  interval_start, timer = start_step, time.perf_counter()
  try:
    with _StopRequest() as stop:
      for step in range(start_step + 1, num_train_steps + 1):
        state, metrics = p_train_step(state, next(batches), rng)
        history.append(metrics)
        is_last = step == num_train_steps
        if (step % config.log_every_steps == 0 or step % eval_every == 0 or
            is_last or stop.signal):
          history = [jax.tree.map(lambda x: float(np.asarray(x)[0]), m)
                     for m in history]
          _check_finite(history, interval_start + 1, step, last_good)
          _log_train(writer, history, step, num_train_steps,
                     time.perf_counter() - timer, interval_start,
                     config.batch_size, static_weights(model, state))
          history, interval_start, timer = [], step, time.perf_counter()
          p_train_step = train_steps(state, step)
        if step % eval_every == 0 or is_last:
          valid = evaluator(state, valid_split, config.eval_batch_size)
          writer.write(step, 'validation', valid)
          logging.info('validation at step %d: accuracy %.4f / %.4f, '
                       'experts %s', step, valid['accuracy_1'],
                       valid['accuracy_2'], valid['selected_experts'])
          ckpts.save_best(step, flax.jax_utils.unreplicate(state),
                          valid['accuracy_mean'])
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
    return final_test(config, workdir, model, tx, data, ckpts, evaluator,
                      writer)
  finally:
    writer.close()


class SparseTrainSteps:
  """The compiled train step, computing only the experts still in use.

  With ``model.sparse_train`` and static gates, the experts that every task
  weighs exactly 0 are left out of the forward pass. They get zero gradient
  in the dense step too, so the parameters follow the same path (up to float
  summation order); only their unused BatchNorm running averages stop moving.
  Once a DSelect-k bit logit leaves [-gamma/2, gamma/2] its gradient is 0 and
  Adam's or SGD's momentum keeps moving it outward, so a dropped expert stays
  dropped; weight decay could pull it back, hence adam or sgd only. The
  active set is re-read from the parameters at every log step.
  """

  def __init__(self, model, config):
    self.model = model
    self.loss_config = config.loss
    self.sparse = (config.model.get('sparse_train', False) and
                   not model.per_example)
    self._steps = {}
    self.active = None

  def __call__(self, state, step):
    active = used_experts(self.model, state) if self.sparse else None
    if active != self.active:
      logging.info('step %d: training %s', step,
                   f'experts {active} only' if active else 'all experts')
    self.active = active
    if active not in self._steps:
      model = None if active is None else self.model.clone(
          active_experts=active)
      self._steps[active] = _parallel(
          functools.partial(train_step, loss_config=self.loss_config,
                            model=model),
          donate_argnums=(0,), in_axes=(0, 0, None))
    return self._steps[active]


def peak_rss_mb() -> float:
  """This process's peak resident memory so far, in MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == 'darwin' else peak / 2**10  # B, KiB


def _log_train(writer, history, step, num_train_steps, elapsed,
               interval_start, batch_size, expert_weights=None):
  steps_per_s = (step - interval_start) / max(elapsed, 1e-9)
  summary = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
  if expert_weights is not None:  # Static gates: (T, E) at this step.
    summary['expert_weights'] = expert_weights.tolist()
  summary['steps_per_second'] = steps_per_s
  summary['images_per_second'] = steps_per_s * batch_size
  summary['peak_rss_mb'] = peak_rss_mb()
  writer.write(step, 'train', summary)
  eta = (num_train_steps - step) / max(steps_per_s, 1e-9)
  logging.info(
      'step %d/%d  loss %.4f  acc %.4f/%.4f  experts %.1f/%.1f  %.2f steps/s '
      ' %.0f images/s  ETA %s', step, num_train_steps, summary['loss'],
      summary['accuracy_1'], summary['accuracy_2'], summary['num_nonzero_1'],
      summary['num_nonzero_2'], steps_per_s, summary['images_per_second'],
      _format_seconds(eta))


def final_test(config, workdir, model, tx, data, ckpts, evaluator, writer):
  """Evaluates the best-on-validation checkpoint on the test split."""
  abstract = factory.abstract_state(config, model, tx)
  step = ckpts.best_step()
  state = ckpts.restore_best(abstract)
  result = evaluator(replicate(state), data['test'],
                     config.eval_batch_size)
  result['step'] = step
  result['checkpoint'] = 'best'
  logging.info('test (best validation checkpoint, step %d): accuracy %.4f / '
               '%.4f', step, result['accuracy_1'], result['accuracy_2'])
  writer.write(step, 'test', result)
  writer.flush()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'test_metrics.json'), 'w') as f:
      json.dump(result, f, indent=2)
  return result


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# ---------------------------------------------------------------------------
# Evaluating a finished (or running) workdir: eval.py.
# ---------------------------------------------------------------------------


def _listing(workdir: str) -> str:
  entries = sorted(os.listdir(workdir))
  return ', '.join(entries) if entries else 'nothing'


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config train.py wrote into ``workdir/config.json``."""
  if not os.path.isdir(workdir):
    raise checkpointing.CheckpointError(
        f'workdir {workdir} does not exist; pass the --workdir given to '
        'train.py.')
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise checkpointing.CheckpointError(
        f'{workdir} holds no config.json, so no training run wrote it (it '
        f'holds: {_listing(workdir)}); run train.py with --workdir={workdir} '
        'first.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate_workdir(workdir: str, step: Optional[int] = None,
                     best: bool = False,
                     data_dir: Optional[str] = None) -> dict[str, Any]:
  """Restores a checkpoint of ``workdir`` and evaluates it on the test split.

  Args:
    workdir: a train.py workdir.
    step: a periodic checkpoint's step (``workdir/checkpoints/<step>``).
    best: the best-on-validation checkpoint. Default when neither is given:
      the best one if there is one, else the newest periodic one.
    data_dir: the data folder to read instead of the config's
      ``data.data_dir`` (``data.paddlerec_dir`` for PaddleRec's pickles), for
      a workdir trained where the data lived elsewhere.

  Returns:
    Test accuracy and loss per task, expert weights and selected experts, and
    ``step`` / ``checkpoint`` naming what was evaluated.
  """
  config = load_workdir_config(workdir)
  if data_dir:
    field = 'paddlerec_dir' if config.data.name == 'paddlerec' else 'data_dir'
    config.data[field] = data_dir
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  if step is None and not best:
    best = ckpts.best_step() is not None
  if step is None and not best and ckpts.latest_step() is None:
    raise checkpointing.CheckpointError(
        f'{workdir} holds no checkpoint yet (it holds: {_listing(workdir)}); '
        'train first, or wait for the first checkpoint.')
  num_devices = jax.local_device_count()
  if config.eval_batch_size % num_devices:
    config.eval_batch_size = num_devices * (
        -(-config.eval_batch_size // num_devices))
  model = factory.create_model(config, bn_axis_name=AXIS)
  data = load_data(config)
  steps_per_epoch = len(data['train']) // config.batch_size
  num_train_steps = (config.num_train_steps if config.num_train_steps > 0 else
                     config.num_epochs * steps_per_epoch)
  tx = factory.create_optimizer(config, num_train_steps)
  abstract = factory.abstract_state(config, model, tx)
  if best:
    state, kind, step = ckpts.restore_best(abstract), 'best', ckpts.best_step()
  else:
    step = ckpts.latest_step() if step is None else step
    state, kind = ckpts.restore(abstract, step), 'periodic'
  evaluator = Evaluator(model, num_devices,
                        config.model.get('sparse_eval', True))
  result = evaluator(replicate(state), data['test'],
                     config.eval_batch_size)
  result['step'] = int(step)
  result['checkpoint'] = kind
  ckpts.close()
  return result
