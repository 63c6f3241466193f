"""Task kinds of a multi-task data set: each one's loss and its metric.

A data set describes its tasks as ``(name, kind)`` pairs; the kind decides
the model's output for the task, the training loss and the metric the field
reports:

- ``'classification'``: C logits; softmax cross-entropy; accuracy.
- ``'binary'``: one logit; sigmoid cross-entropy; AUC (the area under the
  ROC curve, ties counted half).
- ``'regression'``: one value; squared error; RMSE.

Every batch holds ``target`` and ``weight`` (B, T), whatever its inputs
(an image's digits are targets of weight 1; a movie nobody rated has a
rating target of weight 0): a loss is the weighted mean over the batch, a
metric is taken over the examples of weight > 0. ``selection_score`` turns
a split's metrics and losses into the one number on which the best
checkpoint is kept.

Shapes: B batch, C classes, T tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

KINDS = ('classification', 'binary', 'regression')
# The metric of each kind, and whether a higher value is better.
METRIC = {'classification': 'accuracy', 'binary': 'auc', 'regression': 'rmse'}
HIGHER_IS_BETTER = {'accuracy': True, 'auc': True, 'rmse': False}


def check_kind(kind: str):
  if kind not in KINDS:
    raise ValueError(f'unknown task kind {kind!r}; choose one of {KINDS}.')


def example_losses(
  kind: str,
  output,
  target,
  *,
  label_smoothing: float = 0.0,
  double_softmax: bool = False,
) -> jax.Array:
  """One task's loss on each example: output (B,) or, for classification,
  logits (B, C) with integer targets; target (B,) -> (B,).

  Classification's options (the training loss, ``config.loss``):
  ``label_smoothing`` eps puts 1 - eps on the label and eps / C on every
  class. ``double_softmax`` is PaddleRec's loss, which applies
  ``F.cross_entropy`` (a softmax inside) to the tower's softmax output
  clipped to [1e-15, 1 - 1e-15]: -log softmax(p)[y]. It is bounded by
  log(1 + (C - 1) e) and nearly linear in p[y], so confidently wrong
  examples get almost no gradient.
  """
  check_kind(kind)
  if kind == 'classification':
    labels = jnp.asarray(target).astype(jnp.int32)
    if double_softmax:
      probs = jnp.clip(jax.nn.softmax(output), 1e-15, 1 - 1e-15)
      return optax.softmax_cross_entropy_with_integer_labels(probs, labels)
    num_classes = jnp.shape(output)[-1]
    targets = optax.smooth_labels(
      jax.nn.one_hot(labels, num_classes), label_smoothing
    )
    return optax.softmax_cross_entropy(output, targets)
  if kind == 'binary':
    return optax.sigmoid_binary_cross_entropy(output, target)
  return jnp.square(output - target)


def loss(kind: str, output, target, weight) -> jax.Array:
  """The weighted mean loss of one task over a batch (``example_losses``
  weighted by ``weight`` (B,)) -> ()."""
  per_example = example_losses(kind, output, target)
  return jnp.sum(weight * per_example) / jnp.maximum(jnp.sum(weight), 1.0)


def batch_accuracy(output, target, weight) -> jax.Array:
  """A classification task's weighted accuracy on a batch (jit-able):
  logits (B, C), target and weight (B,) -> ()."""
  correct = jnp.argmax(output, -1) == jnp.asarray(target).astype(jnp.int32)
  return jnp.sum(weight * correct) / jnp.maximum(jnp.sum(weight), 1.0)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve: the chance that a random positive scores
  above a random negative, ties counted half (Mann-Whitney U / (P N))."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
  num_pos, num_neg = int(labels.sum()), int((~labels).sum())
  if num_pos == 0 or num_neg == 0:
    return float('nan')  # Undefined with one class only.
  # Ranks from 1, each run of equal scores given its average rank.
  _, inverse, counts = np.unique(
    scores, return_inverse=True, return_counts=True
  )
  first = np.cumsum(counts) - counts  # 0-based rank of each run's first.
  ranks = (first + (counts + 1) / 2)[inverse]
  u = ranks[labels].sum() - num_pos * (num_pos + 1) / 2
  return float(u / (num_pos * num_neg))


def metric(kind: str, output, target, weight) -> float:
  """The task's metric over the examples of weight > 0 (numpy)."""
  check_kind(kind)
  keep = np.asarray(weight) > 0
  output, target = np.asarray(output)[keep], np.asarray(target)[keep]
  if kind == 'classification':
    return float(np.mean(np.argmax(output, -1) == target))
  if kind == 'binary':
    return auc(output, target)
  return float(np.sqrt(np.mean(np.square(output - target))))


def selection_score(kinds, metrics, losses) -> float:
  """The number, higher is better, on which a run keeps its best checkpoint.

  The mean accuracy when every task is a classification (as the paper and
  PaddleRec select on MultiMNIST); otherwise minus the summed loss, the
  training objective without the gates' terms, which puts tasks of
  different metrics (AUC, RMSE) on one scale.
  """
  if all(kind == 'classification' for kind in kinds):
    return float(np.mean(metrics))
  return -float(np.sum(losses))
