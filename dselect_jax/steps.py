"""The per-device train and eval steps, and how they are mapped over devices.

``train_step`` and ``eval_step`` are pure per-device functions that average
over the ``'batch'`` axis with ``lax.pmean``/``lax.psum`` (BatchNorm
statistics too, through the model's ``bn_axis_name``), so one step over D
devices equals one step on the whole batch. ``parallel`` maps them; moving to
``jax.shard_map`` changes that one function. ``SparseTrainSteps`` keeps one
compiled train step per set of experts still in use.

A batch holds the model's inputs (an image data set's ``image``, a
feature data set's ``categorical`` and ``dense``) and each task's
``target`` and ``weight``; each task's loss is its kind's
(``tasks.example_losses``): logits (T, B, C) for classification, one
output per task (T, B) otherwise.

Shapes: B batch (per device), T tasks, C classes, E experts.
"""

from __future__ import annotations

import collections
from concurrent import futures
import functools
import itertools
import math
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dselect_jax import dispatch
from dselect_jax import factory
from dselect_jax import models
from dselect_jax import tasks

AXIS = 'batch'
# The Dispatcher's layouts of the routed examples (``Dispatcher``).
LAYOUTS = ('capacity', 'buckets', 'blocks', 'ragged')
# What a dispatched model reports of its routing (``dispatch_report``).
DISPATCH_REPORT = ('dispatch_load', 'dispatch_counts', 'dispatch_dense')
# The Dispatcher compiles new bounds once the load stops falling: at
# least this fraction of the largest of the last SETTLE_LOOKS looks' (in
# the dense phase, gates-only looks 50 batches apart: a load falling a
# few percent a look still falls).
SETTLED = 0.9
SETTLE_LOOKS = 3
# The Dispatcher's bounds hold all but this many of the recent batches: a
# batch past them falls back inside the dispatched program, and looser
# bounds (a program compiling for tens of seconds) come only at the
# SPIKES + 1-th such batch (``_needed_by``).
SPIKES = 2
# With a bucket per expert, held buckets grow to hold new ones, and a
# program compiled for bounds that hold new ones runs them, unless the
# new ones need at most this fraction of the rows: the buckets change
# with any one expert's load, and a program saving a few of them would
# not pay for its compilation.
RECOMPILE_BELOW = 0.75


# Aux terms with a loss weight; other aux entries are diagnostics.
AUX_WEIGHTS = {
  'entropy': 'entropy_weight',
  'reachability': 'reachability_weight',
  'importance': 'importance_weight',
  'load': 'load_weight',
}


def entropy_weight(loss_config, step) -> jax.Array:
  """The entropy term's weight at ``step``: 0 up to entropy_start_step, then
  a linear ramp reaching entropy_weight entropy_ramp_steps later (at once
  when entropy_ramp_steps is 0)."""
  start, ramp = loss_config.entropy_start_step, loss_config.entropy_ramp_steps
  if ramp <= 0:
    frac = (
      (step >= start).astype(jnp.float32)
      if isinstance(step, jax.Array)
      else float(step >= start)
    )
  else:
    frac = jnp.clip((step - start) / ramp, 0, 1)
  return loss_config.entropy_weight * frac


def aux_weights(loss_config, step) -> dict[str, jax.Array]:
  weights = {name: loss_config[field] for name, field in AUX_WEIGHTS.items()}
  weights['entropy'] = entropy_weight(loss_config, step)
  return weights


def model_inputs(batch) -> tuple:
  """The model's positional inputs in a batch: the images, or the
  categorical and dense features."""
  if 'image' in batch:
    return (batch['image'],)
  return (batch['categorical'], batch['dense'])


def task_losses(outputs, batch, task_kinds, loss_config) -> jax.Array:
  """Each task's loss (T,) on this device's shard, by its kind
  (``tasks.example_losses``, classification with ``loss_config``'s options),
  so that the mean over the devices (as the gradients are averaged) is the
  weighted mean over the whole batch: the shard's weighted sum over the
  devices' mean weight. Call it inside the mapped step.

  outputs (T, B, ...), batch target and weight (B, T).
  """
  weight = batch['weight']
  mean_weight = jax.lax.pmean(jnp.sum(weight, axis=0), AXIS)  # (T,)
  options = {
    'label_smoothing': loss_config.label_smoothing,
    'double_softmax': loss_config.name == 'double_softmax',
  }
  sums = jnp.stack(
    [
      jnp.sum(
        weight[:, t]
        * tasks.example_losses(
          kind,
          outputs[t],
          batch['target'][:, t],
          **(options if kind == 'classification' else {}),
        )
      )
      for t, kind in enumerate(task_kinds)
    ]
  )
  return sums / jnp.maximum(mean_weight, 1e-12)


def batch_accuracies(outputs, batch, task_kinds) -> Optional[jax.Array]:
  """Each task's accuracy on this device's shard (T,) when every task is a
  classification, shown in the training log; else None."""
  if any(kind != 'classification' for kind in task_kinds):
    return None
  return jnp.stack(
    [
      tasks.batch_accuracy(
        outputs[t], batch['target'][:, t], batch['weight'][:, t]
      )
      for t in range(len(task_kinds))
    ]
  )


def gate_summary(expert_weights) -> dict[str, jax.Array]:
  """Per task: mean weight of each expert and experts with non-zero weight.

  expert_weights (T, E) or (T, B, E) -> weights (T, E), nonzero (T,).
  """
  if expert_weights.ndim == 3:
    nonzero = jnp.mean(jnp.sum(expert_weights > 0, -1), axis=-1)
    expert_weights = jnp.mean(expert_weights, axis=1)
  else:
    nonzero = jnp.sum(expert_weights > 0, -1)
  return {
    'expert_weights': expert_weights,
    'num_nonzero': nonzero.astype(jnp.float32),
  }


def train_step(
  state: factory.TrainState,
  batch,
  rng,
  *,
  loss_config,
  task_kinds,
  model=None,
):
  """One optimizer step on this device's shard; averages over AXIS.

  batch: the model's inputs with ``target`` and ``weight`` (b, T); each
  task's loss by its kind (``task_losses``). ``model`` replaces
  ``state.apply_fn`` (sparse training passes one computing fewer experts).
  Returns (state, metrics), the metrics already averaged over devices, the
  per-task ones as arrays (T,) under ``per_task``.
  """
  apply_fn = state.apply_fn if model is None else model.apply
  step_rng = jax.random.fold_in(
    jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS)
  )
  weights = aux_weights(loss_config, state.step)

  def loss_fn(params):
    (outputs, aux), updates = apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      *model_inputs(batch),
      train=True,
      mutable=['batch_stats'],
      rngs={'gating': step_rng},
    )
    task_loss = task_losses(outputs, batch, task_kinds, loss_config)  # (T,)
    # Each aux term summed over the gates (G,).
    terms = {
      name: jnp.sum(value)
      for name, value in aux['gate'].items()
      if name in AUX_WEIGHTS
    }
    loss = jnp.sum(task_loss) + sum(weights[n] * v for n, v in terms.items())
    accuracy = batch_accuracies(outputs, batch, task_kinds)
    return loss, (
      updates.get('batch_stats', {}),
      task_loss,
      accuracy,
      terms,
      aux,
    )

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (batch_stats, task_loss, accuracy, terms, aux)), grads = grad_fn(
    state.params
  )
  grads = jax.lax.pmean(grads, AXIS)
  # BatchNorm already used cross-device statistics (bn_axis_name); this only
  # removes float noise so every replica holds identical running averages
  # (and averages the per-device ones of routed statistics,
  # models.MultiTaskMoE.routed_statistics).
  batch_stats = jax.lax.pmean(batch_stats, AXIS)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)

  per_task = {
    'loss': task_loss,
    'num_nonzero': gate_summary(aux['expert_weights'])['num_nonzero'],
  }
  if accuracy is not None:
    per_task['accuracy'] = accuracy
  metrics = {
    'loss': loss,
    'grad_norm': optax.tree.norm(grads),
    'per_task': per_task,
  }
  for name, value in terms.items():
    metrics[f'aux_{name}'] = value
    metrics[f'weight_{name}'] = jnp.asarray(weights[name], jnp.float32)
  metrics = jax.lax.pmean(metrics, AXIS)
  return state, {**metrics, **dispatch_report(aux)}


def eval_step(model: models.MultiTaskMoE, state: factory.TrainState, batch):
  """The example count of this device's (masked) shard and, per-example,
  the sums of its expert weights, summed over AXIS; the expert weights;
  and the outputs, (T, b, C) or (T, b), from which the Evaluator computes
  each task's metric and loss over the whole split."""
  outputs, aux = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    *model_inputs(batch),
    train=False,
  )
  sums = {'count': jnp.sum(batch['mask']) * jnp.ones(outputs.shape[0])}
  weights = aux['expert_weights']
  if weights.ndim == 3:  # Per-example: sum the masked weights and counts.
    mask = batch['mask'][None, :, None]
    sums['weight_sum'] = jnp.sum(weights * mask, axis=1)  # (T, E)
    sums['nonzero_sum'] = jnp.sum(
      jnp.sum(weights > 0, -1) * mask[..., 0], axis=1
    )  # (T,)
  return {**jax.lax.psum(sums, AXIS), **dispatch_report(aux)}, weights, outputs


def dispatch_report(aux) -> dict[str, jax.Array]:
  """A dispatched model's routing load and fallback (``MultiTaskMoE``'s
  ``dispatch_load``, ``dispatch_dense``), the largest over the devices,
  for ``Dispatcher.observe``; nothing for other models."""
  return {
    name: jax.lax.pmax(aux[name], AXIS)
    for name in DISPATCH_REPORT
    if name in aux
  }


def parallel(fn, in_axes=0, donate_argnums=()):
  """Maps a per-device step over the devices, along a leading device axis.

  ``jax.pmap`` over the local devices; on a single device (all hosts
  together), ``jax.jit(jax.vmap(...))`` over the same leading axis of size 1
  instead: the same function, but the collectives, trivial there, vanish
  (XLA:CPU runs them as ops under pmap; benchmarks/data_parallel.py measures
  what that costs). The one place to change for ``jax.shard_map`` over a
  ('batch',) mesh.
  """
  if jax.device_count() > 1:
    return jax.pmap(
      fn, axis_name=AXIS, in_axes=in_axes, donate_argnums=donate_argnums
    )
  return one_device(fn, in_axes, donate_argnums)


def one_device(fn, in_axes=0, donate_argnums=()):
  return jax.jit(
    jax.vmap(fn, in_axes=in_axes, axis_name=AXIS), donate_argnums=donate_argnums
  )


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
    jax.sharding.PartitionSpec(AXIS),
  )
  return jax.tree.map(
    lambda x: jax.device_put(
      jnp.broadcast_to(x, (len(devices),) + jnp.shape(x)), sharding
    ),
    tree,
  )


def static_weights(model, state) -> Optional[np.ndarray]:
  """Each task's expert weights (T, E) from the static gates of a replicated
  ``state``; None for per-example gates."""
  if model.per_example:
    return None
  # Copy the (small) gate params to the host before taking replica 0:
  # indexing a pmapped array eagerly runs a device gather per leaf.
  gate_params = {
    k: v
    for k, v in models.gate_params(state.params).items()
    if k.startswith('gate')
  }
  params = jax.tree.map(lambda x: np.asarray(x)[0], gate_params)
  return models.static_expert_weights(model, params)


def used_experts(model, state) -> Optional[tuple[int, ...]]:
  """Experts some static gate of a replicated ``state`` weighs; None: all."""
  weights = static_weights(model, state)
  if weights is None:
    return None
  active = models.active_experts(weights)
  return None if len(active) == model.num_experts else active


def routing_load(model, state, batch) -> jax.Array:
  """Per device: the examples of this shard routed to its busiest expert,
  the routed (example, expert) pairs, the most experts one example is
  routed to, the blocks of ``dispatch.BLOCK`` rows they fill, then each
  expert's examples, (4 + E,) (from the gates' weights, no expert
  computed)."""
  weights = models.per_example_weights(
    model, state.params, *model_inputs(batch)
  )
  mask = dispatch.routed(weights)
  counts = jnp.sum(mask, axis=0, dtype=jnp.int32)
  blocks = jnp.sum(dispatch.block_counts(mask, dispatch.BLOCK))
  load = [jnp.max(counts), jnp.sum(counts), dispatch.fanout(mask), blocks]
  return jnp.concatenate([jnp.stack(load).astype(jnp.int32), counts])


class Dispatcher:
  """Sparse dispatch for per-example gates: the bounds for each batch.

  The dispatched step routes inside the step and falls back to every
  expert on every example when a batch does not fit its bounds, so the
  bounds only decide the speed, never the result. Its layout: ``blocks``
  for MLP experts in the loop bank (``dispatch_blocks``: rows that follow
  the routed pairs, however unevenly the experts are loaded), else
  ``buckets`` for other experts in the loop bank (``dispatch_buckets``:
  a bucket of slots per expert, none for the experts no example uses),
  else ``capacity`` (``dispatch_capacity``: slots for the busiest
  expert's examples in every expert, any bank). The bounds come from the
  routing the recent steps reported (``observe``: the busiest expert's
  examples, the largest fanout, the blocks needed and each expert's
  examples, the largest over devices, read one step late so the host
  never waits for the step it just started): the bucket
  (``dispatch.capacity_for``: a half, a quarter, ... of the dense rows;
  ``dispatch.bucket_for``: those and three quarters of each) of the
  largest of the last ``window``
  batches, and the largest fanout of the last ``8 * window``
  (``dispatch.fanout_bound``); but the largest past the ``SPIKES``
  largest once a window is full, and before (the recent loads restart
  at each gates-only look) the largest of those the bounds in use hold
  while at most ``SPIKES`` were past them (``_needed_by``). So the
  bounds loosen at the ``SPIKES + 1``-th batch of a window past them
  (the ones before fall back inside the program) and tighten only once
  that many batches in a row fit tighter ones (or, in the dense phase,
  as the gates-only looks come): fewer programs, and few batches that
  fall back. One compiled step per pair of bounds, kept. With a bucket
  per expert (which changes with any one expert's load) the buckets
  grow: new ones keep the held ones unless the new ones save more than a
  quarter of their rows (``_grown``: the stray examples of trained gates
  move from expert to expert), and a compiled program whose bounds hold
  the new ones runs on unless the new ones save that much of its rows
  (``RECOMPILE_BELOW``); a batch needs at most half the dense rows to
  dispatch.

  Each program holds the dense fallback too, and an E = 64 train step's
  takes tens of seconds to compile here (37-49 s each beside the
  training, ``results/movielens_experts64/run.log``). With
  ``compile_ahead`` a new pair of bounds' program compiles in a thread
  (``jit(...).lower(...).compile()`` on the step's argument shapes,
  which fills the jitted step's cache) while the steps
  already compiled go on: the tightest of them whose bounds hold the new
  ones (and that was not measured slower: one not yet measured is timed
  as it stands in), else the dense step. While the
  gates saturate, the load falls from one look to the next, and the
  bounds of a passing load would compile for nothing: new bounds compile
  once the load stops falling (bounds that hold the last look's, and a
  load at least ``SETTLED`` of the largest of the last ``SETTLE_LOOKS``
  looks'). With several processes every process must run the same
  program at each step, so there they compile in the foreground, at the
  first batch that needs them.

  Whether dispatch pays depends on the experts and the machine (small MLP
  experts at E = 8 run faster densely on XLA:CPU, where the routing's
  gathers cost more than the half of the expert rows they save), so with
  ``measure`` each new pair of bounds is timed on its first batches
  against the dense step and kept only if faster (every such batch waits
  for its result; ``measure=0`` dispatches whenever a bucket is below the
  batch). When the dense step runs (no bucket below the batch, before the
  gates saturate, or measured slower), every ``probe_every`` batches a
  gates-only pass (``routing_load``, the same on every process) looks
  again.

  ``layout='ragged'``: MLP experts as ``jax.lax.ragged_dot`` grouped
  matmuls over the routed pairs (``dispatch_pairs``), sized by a
  gates-only pass before every batch, as that path has no fallback (on
  XLA:CPU ``ragged_dot`` is slower than the blocks,
  ``benchmarks/dispatch_speed.py``).

  ``make_step(model)`` compiles a step for a model, mapped over
  ``axis_name``; its outputs carry ``dispatch_report``'s entries, which
  the caller hands to ``observe``.
  """

  def __init__(
    self,
    model,
    make_step,
    layout: str = 'auto',
    window: int = 32,
    probe_every: int = 50,
    axis_name: Optional[str] = AXIS,
    measure: int = 3,
    compile_ahead: bool = True,
  ):
    self.model = model
    self.measure = measure
    self.compile_ahead = compile_ahead and jax.process_count() == 1
    self._compiler = None  # One thread compiling ahead, made when needed.
    self._compiling = {}  # Bounds -> (their step, its compilation Future).
    self.faster = {}  # Bounds -> whether the dispatched step beat dense.
    # Bounds (and ('dense', bounds): the dense step timed beside them) ->
    # seconds per timed batch.
    self._times = {}
    self.axis_name = axis_name  # The steps' mapped axis (None: unmapped).
    self._make_step = make_step
    self._steps = {}
    self._load = parallel(functools.partial(routing_load, model))
    grouped = models.ragged_experts(model)
    bucketed = models.bucketed_experts(model)
    if layout == 'auto':
      if grouped:
        layout = 'blocks'
      else:
        layout = 'buckets' if bucketed else 'capacity'
    if (
      layout not in LAYOUTS
      or (layout in ('blocks', 'ragged') and not grouped)
      or (layout == 'buckets' and not bucketed)
    ):
      raise ValueError(
        f'Dispatcher: layout {layout!r} is not one of {LAYOUTS} or needs '
        'experts in the loop bank (MLP experts for blocks and ragged); use '
        '"auto".'
      )
    self.layout = layout
    self.probe_every = probe_every
    # (busiest, pairs, fanout, blocks); pairs only from the gates-only pass.
    self._recent = collections.deque(maxlen=window)
    # The fanouts of the last 8 windows: a bound on them saves little (a
    # gather instead of a scatter-add) and a few examples not yet
    # saturated keep coming back, so it tightens only slowly.
    self._fanouts = collections.deque(maxlen=8 * window)
    self._pending = collections.deque()  # Reports not read yet.
    self._since_probe = 0
    self._reported = 0  # Reports read since the last gates-only look.
    self._ran = None  # The bounds of the last step handed out (None: dense).
    self._observed = 0  # Loads looked at so far (_look).
    self._seen = None  # The loads and batch the bounds were decided for.
    self._key = None
    self._whats = {}  # Bounds -> their description, for the log.
    self._settled = False  # Whether the load stopped falling (_decide).
    # The rows, blocks or slots the last looks needed.
    self._needed = collections.deque(maxlen=SETTLE_LOOKS)
    self.bounds = 'unset'  # The last batch's: a dict of the model's fields.
    self.dispatched = 0  # Batches that ran on the routed examples only,
    self.fallbacks = 0  # and those that did not fit and ran densely.

  def observe(self, report) -> None:
    """A dispatched step's ``dispatch_report`` (device arrays; read later)."""
    if report:
      self._pending.append(report)

  def read_reports(self, keep: int = 0) -> None:
    """Reads the reports of all but the ``keep`` latest steps (waiting for
    those steps to finish)."""
    while len(self._pending) > keep:
      # Every device holds the same (pmax) report: device 0's.
      report = jax.tree.map(lambda x: np.asarray(x)[0], self._pending.popleft())
      busiest, fanout, blocks = (int(v) for v in report['dispatch_load'])
      counts = report.get('dispatch_counts', ())
      self._look((busiest, 0, fanout, blocks, *(int(c) for c in counts)))
      self._reported += 1
      self.fallbacks += int(report['dispatch_dense'])
      self.dispatched += 1 - int(report['dispatch_dense'])

  def _probe(self, state, batch) -> None:
    """A gates-only pass on this batch: its load, the same on every
    process."""
    if not self._reported:
      # No step reported since the last look (the dense steps report
      # nothing): the recent looks are gates-only ones, probe_every
      # batches apart, their loads stale while the gates saturate: this
      # one alone. (A few dense batches amid dispatched ones, timed or
      # standing in for a program compiling ahead, keep the reports.) The
      # fanouts stay: an unbounded one seen lately is likely seen again.
      self._recent.clear()
    self._reported = 0
    load = np.max(np.asarray(self._load(state, batch)), axis=0)  # (4 + E,)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      load = np.max(multihost_utils.process_allgather(load), axis=0)
    self._look(tuple(int(v) for v in load))
    self._since_probe = 0

  def _look(self, load: tuple[int, ...]) -> None:
    """A batch's (busiest, pairs, fanout, blocks, each expert's examples)
    among the recent ones."""
    self._recent.append(load)
    self._fanouts.append(load[2])
    self._observed += 1

  def __call__(self, state, batch, *rest):
    """The compiled step for this batch: the step's arguments, state and
    batch first."""
    self.read_reports(keep=1)
    self._since_probe += 1
    if (
      self.layout == 'ragged'
      or not self._recent
      or (self._ran is None and self._since_probe >= self.probe_every)
    ):
      self._probe(state, batch)
    per_device = jax.tree.leaves(batch)[0].shape[1]
    if self._seen != (self._observed, per_device):
      self._seen = (self._observed, per_device)
      self._decide(per_device)
    key = self._key
    if self.layout == 'buckets' and key is not None and key not in self._steps:
      stand_in = self._stand_in(key)
      if stand_in is not None and (
        _looseness(key)[0] > RECOMPILE_BELOW * _looseness(stand_in)[0]
      ):
        key = stand_in  # Too little saved to compile for.
    if key is not None and not self._ready(key, (state, batch, *rest)):
      key = self._stand_in(key)
    if key is not None and self.measure:
      if key not in self.faster:
        return self._measuring(key)
      if not self.faster[key]:
        key = None  # Measured slower than the dense step here.
    return self._step(key)

  def wait(self) -> None:
    """Waits for the programs compiling ahead (raising what failed)."""
    for _, future in self._compiling.values():
      future.result()

  def close(self) -> None:
    """Waits for the program compiling ahead, if any, and ends the thread:
    a finished run leaves nothing running (its time counts in the run's,
    and the next run in the process has the CPU to itself)."""
    if self._compiler is not None:
      self._compiler.shutdown(wait=True)
      self._compiler = None
    self._compiling.clear()

  def _ready(self, key, args) -> bool:
    """Whether ``key``'s program is compiled; when not, it starts
    compiling, in a thread (one at a time) with ``compile_ahead``."""
    if not self.compile_ahead or key in self._steps:
      return True
    if key in self._compiling:
      step, future = self._compiling[key]
      if not future.done():
        return False
      future.result()  # Raises what the compilation raised.
      self._steps[key] = step
      del self._compiling[key]
      return True
    if any(not f.done() for _, f in self._compiling.values()):
      return False  # One at a time: this one later.
    if not self._settled:  # The load fell since the last look: wait.
      return False
    step = self._make_step(self.model.clone(**dict(key)))
    shapes = jax.tree.map(_shape_of, args)
    if self._compiler is None:
      self._compiler = futures.ThreadPoolExecutor(
        1, thread_name_prefix='dispatch-compile'
      )
    what, start = self._whats[key], time.perf_counter()

    def compile_step():
      step.lower(*shapes).compile()
      logging.info(
        'sparse dispatch: compiled %s in %.0f s, ahead of its use',
        what,
        time.perf_counter() - start,
      )

    self._compiling[key] = (step, self._compiler.submit(compile_step))
    return False

  def _stand_in(self, key):
    """While ``key``'s program compiles: the tightest program compiled
    whose bounds hold ``key``'s (and that was measured faster, if
    measured), else None (dense)."""
    bounds = dict(key)
    covering = [
      have
      for have in self._steps
      if have is not None
      and self.faster.get(have, True)  # Not yet measured: it will be.
      and _covers(dict(have), bounds)
    ]
    return min(covering, key=_looseness, default=None)

  def _decide(self, per_device: int) -> None:
    """The bounds for the recent loads (only when they changed: the host's
    time per step is the steps' own when they are small)."""
    held = self.bounds if isinstance(self.bounds, dict) else {}
    window = self._recent.maxlen
    busiest, _, _, blocks = zip(*(load[:4] for load in self._recent))
    busiest = _needed_by(busiest, window, held.get('dispatch_capacity'))
    blocks = _needed_by(blocks, window, held.get('dispatch_blocks'))
    fanout = _needed_by(  # An unbounded fanout holds any.
      self._fanouts,
      self._fanouts.maxlen,
      (held.get('dispatch_fanout') or math.inf) if held else None,
    )
    rows = per_device * self.model.num_experts  # Of the dense step.
    # Examples read back their rows (a gather) while few experts serve
    # each; past that (examples not yet saturated), rows are scattered.
    fanout = None if fanout == math.inf else dispatch.fanout_bound(fanout)
    experts = f'{fanout} experts' if fanout else 'any experts'
    if self.layout == 'ragged':
      needed = int(self._recent[-1][1])
      size = dispatch.capacity_for(needed, rows)
      bounds = None if size is None else {'dispatch_pairs': size}
      what = f'{size} of {rows} expert rows per device'
    elif self.layout == 'blocks':
      dense_blocks, needed = -(-rows // dispatch.BLOCK), int(blocks)
      size = dispatch.capacity_for(needed, dense_blocks, minimum=1)
      bounds = None if size is None else {'dispatch_blocks': size}
      what = (
        f'{size} blocks of {dispatch.BLOCK} rows of {rows} expert rows per '
        f'device, {experts} per example'
      )
    elif self.layout == 'buckets':
      buckets = held.get('dispatch_buckets') or itertools.repeat(None)
      counts = [
        _needed_by(column, window, bucket)
        for column, bucket in zip(
          zip(*(load[4:] for load in self._recent)), buckets
        )
      ]
      sizes = tuple(  # Held buckets may exceed a smaller (last) batch.
        dispatch.bucket_for(min(c, per_device), per_device) for c in counts
      )
      sizes = _grown(sizes, held.get('dispatch_buckets'), per_device, rows // 2)
      needed = sum(counts)
      bounds = {'dispatch_buckets': sizes} if sum(sizes) <= rows // 2 else None
      used = len(sizes) - sizes.count(0)
      what = (
        f'{sum(sizes)} of {rows} expert rows per device, {used} of '
        f'{len(sizes)} experts in buckets of '
        f'{"/".join(str(b) for b in sorted(set(sizes) - {0}, reverse=True))}'
        f' examples, {experts} per example'
      )
    else:
      needed = int(busiest)
      size = dispatch.capacity_for(needed, per_device)
      bounds = None if size is None else {'dispatch_capacity': size}
      what = (
        f'at most {size} of {per_device} examples per expert, '
        f'{experts} per example'
      )
    if bounds is not None and self.layout != 'ragged':
      bounds.update(dispatch_fanout=fanout, dispatch_axis_name=self.axis_name)
    if bounds != self.bounds:
      logging.info(
        'sparse dispatch: %s (%d batches fell back so far)',
        what if bounds else 'every expert computes every example (dense)',
        self.fallbacks,
      )
      self.bounds = bounds
    key = None if bounds is None else tuple(sorted(bounds.items()))
    self._whats.setdefault(key, what)
    previous, self._key = self._key, key
    falling = needed < SETTLED * max(self._needed, default=0)
    self._needed.append(needed)
    self._settled = (
      None not in (key, previous)
      and _covers(dict(key), dict(previous))
      and not falling
    )

  def _step(self, key):
    self._ran = key
    if key not in self._steps:
      model = self.model if key is None else self.model.clone(**dict(key))
      self._steps[key] = self._make_step(model)
    return self._steps[key]

  def _measuring(self, key):
    """The next step to time for ``key``'s bounds: ``measure`` of the
    dispatched step, then of the dense one right after (the machine
    alike for both: a compilation ahead may be running), each after an
    untimed first call; then the decision."""
    times = self._times.setdefault(key, [])
    dense_times = self._times.setdefault(('dense', key), [])
    if len(times) > self.measure and len(dense_times) > self.measure:
      sparse, dense = np.median(times[1:]), np.median(dense_times[1:])
      faster = sparse < dense
      if jax.process_count() > 1:  # Process 0 decides: one program for all.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        faster = multihost_utils.broadcast_one_to_all(np.asarray(faster))
      self.faster[key] = bool(faster)
      logging.info(
        'sparse dispatch with %s: %.2fx the dense step (median of %d '
        'timed batches each): %s',
        self._whats[key],
        dense / sparse,
        self.measure,
        'dispatched' if self.faster[key] else 'dense',
      )
      return self._step(key if self.faster[key] else None)
    if len(times) <= self.measure:
      step, record = self._step(key), times
    else:
      step, record = self._step(None), dense_times

    def run(*args):
      start = time.perf_counter()
      out = jax.block_until_ready(step(*args))
      record.append(time.perf_counter() - start)
      return out

    return run


def _needed_by(values, window: int, held: Optional[float]):
  """What the bounds must hold of the recent batches' ``values`` (a
  window of at most ``window``), where the bounds in use hold ``held``
  (None: no bounds yet). Once the window is full, the largest but its
  ``SPIKES`` largest. Before (the recent looks restart at each gates-only
  look), the largest, except that while at most ``SPIKES`` of them are
  past ``held``, those are left out (the largest of the others, else
  ``held``): bounds loosen at the SPIKES + 1-th batch past them, and
  follow a falling load as its looks come."""
  values = sorted(values)
  if len(values) == window:
    return values[-1 - min(SPIKES, len(values) - 1)]
  if held is not None:
    within = [v for v in values if v <= held]
    if len(values) - len(within) <= SPIKES:
      return within[-1] if within else held
  return values[-1]


def _grown(sizes, held, per_device: int, limit: int) -> tuple[int, ...]:
  """A bucket per expert that keeps the held buckets (each expert's the
  larger of the two) unless the new ``sizes`` need at most
  ``RECOMPILE_BELOW`` of the rows that takes: trained gates send a few
  stray examples to experts that come and go from batch to batch, and
  bounds that followed each batch's strays would compile a program for
  each; grown, they compile one that holds the strays of the recent ones
  (a batch past it falls back inside it), and shrink when that saves more
  than a quarter of the rows (or when the grown ones are past ``limit``
  rows, where dispatch stops)."""
  if not held or len(held) != len(sizes) or max(held) > per_device:
    return sizes
  grown = tuple(max(a, b) for a, b in zip(sizes, held))
  if sum(sizes) <= RECOMPILE_BELOW * sum(grown) or sum(grown) > limit:
    return sizes
  return grown


def _shape_of(x):
  """A step argument's shape, dtype and (for a device array placed by a
  step or ``replicate``) placement, to compile for without holding on to
  the array (it may be donated). An array not committed to its device
  (a key made on the host's default device) compiles as a host array:
  with its placement, pmap's cache would miss it at the call."""
  committed = getattr(x, 'committed', False)
  return jax.ShapeDtypeStruct(
    np.shape(x),
    x.dtype,
    sharding=x.sharding if committed else None,
    weak_type=getattr(x, 'weak_type', False),
  )


def _looseness(key) -> tuple[int, bool]:
  """A dispatched step's bounds, to order them: its rows (blocks, slots
  per expert or pairs), then whether its fanout is unbounded."""
  bounds = dict(key)
  size = next(bounds[name] for name in models.DISPATCH_SIZES if name in bounds)
  return int(np.sum(size)), bounds.get('dispatch_fanout') is None


def _covers(have: dict, need: dict) -> bool:
  """Whether a dispatched step with bounds ``have`` runs any batch that fits
  ``need`` (same layout): sizes at least as large, a fanout at least as
  large (None: any), the same axis."""
  if have.keys() != need.keys():
    return False
  for name, value in need.items():
    if name == 'dispatch_axis_name':
      fits = have[name] == value
    elif have[name] is None or value is None:  # An unbounded fanout.
      fits = have[name] is None
    else:  # A size, or a bucket per expert.
      fits = bool(np.all(np.asarray(have[name]) >= np.asarray(value)))
    if not fits:
      return False
  return True


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

  With ``model.sparse_dispatch`` and per-example DSelect-k gates
  (``models.dispatches``), every batch computes each expert on its routed
  examples only (``Dispatcher``), exact at every step: experts with
  BatchNorm normalize over their routed examples, in the dense steps too
  (``MultiTaskMoE.routed_statistics``).
  """

  def __init__(self, model, config, task_kinds: tuple[str, ...]):
    """``task_kinds``: the data set's (``DataSpec.task_kinds``), which decide
    the tasks' losses."""
    self.model = model
    self.loss_config = config.loss
    self.task_kinds = task_kinds
    self.sparse = config.model.sparse_train and not model.per_example
    self._steps = {}
    self.active = None
    self.dispatcher = None
    if config.model.sparse_dispatch and models.dispatches(model, train=True):
      self.dispatcher = Dispatcher(model, self._compile)

  def _compile(self, model):
    return parallel(
      functools.partial(
        train_step,
        loss_config=self.loss_config,
        model=model,
        task_kinds=self.task_kinds,
      ),
      donate_argnums=(0,),
      in_axes=(0, 0, None),
    )

  def _dispatched(self, state, batch, rng):
    state, metrics = self.dispatcher(state, batch, rng)(state, batch, rng)
    self.dispatcher.observe(
      {name: metrics.pop(name) for name in DISPATCH_REPORT if name in metrics}
    )
    return state, metrics

  def __call__(self, state, step):
    if self.dispatcher is not None:
      return self._dispatched
    active = used_experts(self.model, state) if self.sparse else None
    if active != self.active:
      logging.info(
        'step %d: training %s',
        step,
        f'experts {active} only' if active else 'all experts',
      )
    self.active = active
    if active not in self._steps:
      self._steps[active] = self._compile(
        None if active is None else self.model.clone(active_experts=active)
      )
    return self._steps[active]
