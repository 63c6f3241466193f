"""The per-device train and eval steps, and how they are mapped over devices.

``train_step`` and ``eval_step`` are pure per-device functions that average
over the ``'batch'`` axis with ``lax.pmean``/``lax.psum`` (BatchNorm
statistics too, through the model's ``bn_axis_name``), so one step over D
devices equals one step on the whole batch. ``parallel`` maps them; moving to
``jax.shard_map`` changes that one function. ``SparseTrainSteps`` keeps one
compiled train step per set of experts still in use.

Two kinds of batch: an image data set's ``{'image', 'label'}`` (every task
a classification, logits (T, B, C), with ``task_losses``' options), and a
feature data set's ``{'categorical', 'dense', 'target', 'weight'}`` (one
output per task, (T, B), its loss by the task's kind, ``tasks.loss``).

Shapes: B batch (per device), T tasks, C classes, E experts.
"""

from __future__ import annotations

import functools
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dselect_jax import factory
from dselect_jax import models
from dselect_jax import tasks

AXIS = 'batch'


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


def task_metrics(logits, labels, mask=None) -> dict[str, jax.Array]:
  """Per-task sums: cross-entropy, correct predictions, example count.

  logits (T, B, C), labels (B, T), mask (B,) -> each value (T,).
  """
  if mask is None:
    mask = jnp.ones(labels.shape[0], logits.dtype)
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits, labels.T
  )  # (T, B)
  correct = (jnp.argmax(logits, -1) == labels.T).astype(logits.dtype)
  return {
    'ce_sum': jnp.sum(ce * mask, axis=1),
    'correct': jnp.sum(correct * mask, axis=1),
    'count': jnp.sum(mask) * jnp.ones(logits.shape[0]),
  }


def task_losses(logits, labels, loss_config) -> jax.Array:
  """Each task's training loss, the batch mean (T,), as ``loss.name`` says.

  ``cross_entropy``: softmax cross-entropy of the logits against the labels
  smoothed by ``loss.label_smoothing`` (eps: 1 - eps on the label, eps / C
  on every class). ``double_softmax``: PaddleRec's loss, which applies
  ``F.cross_entropy`` (a softmax inside) to the tower's softmax output
  clipped to [1e-15, 1 - 1e-15]: -log softmax(p)[y]. It is bounded by
  log(1 + (C - 1) e) and nearly linear in p[y], so confidently wrong
  examples get almost no gradient.
  logits (T, B, C), labels (B, T).
  """
  num_classes = logits.shape[-1]
  if loss_config.name == 'double_softmax':
    probs = jnp.clip(jax.nn.softmax(logits), 1e-15, 1 - 1e-15)
    ce = optax.softmax_cross_entropy_with_integer_labels(probs, labels.T)
  else:
    eps = loss_config.label_smoothing
    targets = optax.smooth_labels(jax.nn.one_hot(labels.T, num_classes), eps)
    ce = optax.softmax_cross_entropy(logits, targets)  # (T, B)
  return jnp.mean(ce, axis=1)


def model_inputs(batch) -> tuple:
  """The model's positional inputs in a batch: the images, or the
  categorical and dense features."""
  if 'image' in batch:
    return (batch['image'],)
  return (batch['categorical'], batch['dense'])


def kind_losses(outputs, batch, task_kinds) -> jax.Array:
  """Each task's loss (T,) on this device's shard of a feature batch, by
  its kind, so that the mean over the devices (as the gradients are
  averaged) is the weighted mean over the whole batch: the shard's weighted
  sum over the devices' mean weight. Call it inside the mapped step.

  outputs (T, B), batch target and weight (B, T).
  """
  weight = batch['weight']
  mean_weight = jax.lax.pmean(jnp.sum(weight, axis=0), AXIS)  # (T,)
  sums = jnp.stack(
    [
      jnp.sum(
        weight[:, t]
        * tasks.example_losses(kind, outputs[t], batch['target'][:, t])
      )
      for t, kind in enumerate(task_kinds)
    ]
  )
  return sums / jnp.maximum(mean_weight, 1e-12)


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
  model=None,
  task_kinds=None,
):
  """One optimizer step on this device's shard; averages over AXIS.

  batch: image (b, 36, 36, 1) and label (b, T), or a feature batch, whose
  tasks' ``task_kinds`` decide their losses (``kind_losses``). ``model`` replaces ``state.apply_fn`` (sparse training
  passes one computing fewer experts). Returns (state, metrics), the
  metrics already averaged over devices.
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
    if 'label' in batch:  # Logits (T, B, C).
      sums = task_metrics(outputs, batch['label'])
      task_loss = task_losses(outputs, batch['label'], loss_config)  # (T,)
      # Batch means per task (T,), logged beside the loss.
      shown = {
        'ce': sums['ce_sum'] / sums['count'],
        'loss': task_loss,
        'accuracy': sums['correct'] / sums['count'],
      }
    else:  # One output per task (T, B).
      task_loss = kind_losses(outputs, batch, task_kinds)
      shown = {'loss': task_loss}
    # Each aux term summed over the gates (G,).
    terms = {
      name: jnp.sum(value)
      for name, value in aux['gate'].items()
      if name in AUX_WEIGHTS
    }
    loss = jnp.sum(task_loss) + sum(weights[n] * v for n, v in terms.items())
    return loss, (updates.get('batch_stats', {}), shown, terms, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (batch_stats, shown, terms, aux)), grads = grad_fn(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  # BatchNorm already used cross-device statistics (bn_axis_name); this only
  # removes float noise so every replica holds identical running averages.
  batch_stats = jax.lax.pmean(batch_stats, AXIS)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)

  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
  num_tasks = shown['loss'].shape[0]
  for t in range(num_tasks):
    for name, value in shown.items():
      metrics[f'{name}_{t + 1}'] = value[t]
  for name, value in terms.items():
    metrics[f'aux_{name}'] = value
    metrics[f'weight_{name}'] = jnp.asarray(weights[name], jnp.float32)
  gate = gate_summary(aux['expert_weights'])
  for t in range(num_tasks):
    metrics[f'num_nonzero_{t + 1}'] = gate['num_nonzero'][t]
  metrics = jax.lax.pmean(metrics, AXIS)
  return state, metrics


def eval_step(model: models.MultiTaskMoE, state: factory.TrainState, batch):
  """Sums over this device's (masked) shard, summed over AXIS; the expert
  weights; and the outputs, (T, b, C) or (T, b), for the metrics that need
  every example (AUC)."""
  outputs, aux = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    *model_inputs(batch),
    train=False,
  )
  if 'label' in batch:
    sums = task_metrics(outputs, batch['label'], batch['mask'])
  else:
    sums = {'count': jnp.sum(batch['mask']) * jnp.ones(outputs.shape[0])}
  weights = aux['expert_weights']
  if weights.ndim == 3:  # Per-example: sum the masked weights and counts.
    mask = batch['mask'][None, :, None]
    sums['weight_sum'] = jnp.sum(weights * mask, axis=1)  # (T, E)
    sums['nonzero_sum'] = jnp.sum(
      jnp.sum(weights > 0, -1) * mask[..., 0], axis=1
    )  # (T,)
  return jax.lax.psum(sums, AXIS), weights, outputs


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

  def __init__(self, model, config, task_kinds=None):
    """``task_kinds``: a feature data set's (``DataSpec.task_kinds``), which
    decide its losses; None for image data sets."""
    self.model = model
    self.loss_config = config.loss
    self.task_kinds = task_kinds
    self.sparse = config.model.sparse_train and not model.per_example
    self._steps = {}
    self.active = None

  def __call__(self, state, step):
    active = used_experts(self.model, state) if self.sparse else None
    if active != self.active:
      logging.info(
        'step %d: training %s',
        step,
        f'experts {active} only' if active else 'all experts',
      )
    self.active = active
    if active not in self._steps:
      model = (
        None if active is None else self.model.clone(active_experts=active)
      )
      self._steps[active] = parallel(
        functools.partial(
          train_step,
          loss_config=self.loss_config,
          model=model,
          task_kinds=self.task_kinds,
        ),
        donate_argnums=(0,),
        in_axes=(0, 0, None),
      )
    return self._steps[active]
