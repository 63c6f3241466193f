"""Sparse dispatch for per-example gates: each expert computes only the
examples that some task weighs non-zero.

Once DSelect-k's selectors saturate, an example has non-zero weight on at
most k experts per task, so at most T·k of the E experts need to see it.
The dispatch here is exact for any weights, saturated or not: an expert
whose weight for an example is exactly 0 contributes exactly 0 to that
example's mixture, and (DSelect-k's smooth step being flat outside
[-gamma/2, gamma/2], a zero weight being a product with a saturated
factor) exactly 0 to every gradient, so leaving it out changes nothing
but the order of float sums.

Shapes stay static under jit through a capacity C: expert e gets the
first C examples routed to it, in batch order (a stable sort of the
routing mask per expert), padded with example 0 and masked. The caller
picks C from the routing counts of the batch at hand
(``capacity_for``), so that no expert overflows; ``overflow`` says how many
routed examples a capacity would drop, for the callers that check.

Experts with batch statistics (BatchNorm in training) would see the
padding and only their routed examples: in training, dispatch is for
experts without them (``MLPExpert``); in evaluation every expert computes
what the dense bank does.

Shape legend: B batch, T tasks, E experts, C capacity (examples per
expert), H expert output features.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def routed(weights: Array) -> Array:
  """Which examples each expert must compute: (T, B, E) weights -> (B, E),
  True where some task weighs the expert non-zero."""
  return jnp.any(weights > 0, axis=0)


def counts(weights: Array) -> Array:
  """Examples routed to each expert: (T, B, E) -> (E,) int32."""
  return jnp.sum(routed(weights), axis=0, dtype=jnp.int32)


def slots(mask: Array, capacity: int) -> tuple[Array, Array]:
  """Each expert's first ``capacity`` routed examples, in batch order.

  Args:
    mask: (B, E) bool, ``routed``.
    capacity: C, 1 <= C <= B.

  Returns:
    ``index`` (E, C) int32, the examples (0 where a slot is empty), and
    ``valid`` (E, C) bool, which slots hold a routed example.
  """
  # Stable: routed examples first, each group in batch order.
  order = jnp.argsort(~mask, axis=0, stable=True)[:capacity]  # (C, E)
  index = order.T.astype(jnp.int32)  # (E, C)
  valid = jnp.take_along_axis(mask.T, index, axis=1)  # (E, C)
  return jnp.where(valid, index, 0), valid


def pairs(mask: Array, size: int) -> tuple[Array, Array, Array, Array]:
  """The routed (example, expert) pairs sorted by expert, then example:
  the rows of a grouped matmul (``jax.lax.ragged_dot``), dropless when
  ``size`` is at least the number of routed pairs.

  Args:
    mask: (B, E) bool, ``routed``.
    size: M, the rows: routed pairs first, then padding.

  Returns:
    ``example`` and ``expert`` (M,) int32 (0 on padding rows), ``valid``
    (M,) bool, and ``group_sizes`` (E,) int32, each expert's routed pairs
    among the M rows, in expert order (what ragged_dot groups by).
  """
  batch, num_experts = mask.shape
  flat = mask.T.reshape(-1)  # (E * B,): row e * B + b.
  order = jnp.argsort(~flat, stable=True)[:size]  # Routed pairs first.
  valid = flat[order]
  example = jnp.where(valid, order % batch, 0).astype(jnp.int32)
  expert = jnp.where(valid, order // batch, 0).astype(jnp.int32)
  group_sizes = jnp.sum(
    jax.nn.one_hot(expert, num_experts, dtype=jnp.int32) * valid[:, None],
    axis=0,
  )
  return example, expert, valid, group_sizes


def combine_pairs(
  outputs: Array, example: Array, expert: Array, valid: Array, weights: Array
) -> Array:
  """Each task's mixture from the experts' outputs on the routed pairs:
  outputs (M, H), pairs from ``pairs``, weights (T, B, E) -> (T, B, H)."""
  pair_weights = weights[:, example, expert] * valid  # (T, M)
  mixed = jnp.zeros(
    (weights.shape[0], weights.shape[1], outputs.shape[-1]), outputs.dtype
  )
  return mixed.at[:, example].add(pair_weights[..., None] * outputs[None])


def overflow(weights: Array, capacity: int) -> Array:
  """Routed examples that a capacity would drop, over all experts: 0 when
  the dispatch is exact."""
  return jnp.sum(jnp.maximum(counts(weights) - capacity, 0))


def gather(x: Array, index: Array) -> Array:
  """Each expert's examples: x (B, ...) -> (E, C, ...)."""
  return x[index]


def combine(
  outputs: Array, index: Array, valid: Array, weights: Array
) -> Array:
  """Each task's mixture from the experts' outputs on their examples.

  Args:
    outputs: (E, C, H), expert e on its slots' examples.
    index, valid: (E, C), from ``slots``.
    weights: (T, B, E).

  Returns:
    (T, B, H): sum over e of weights[t, b, e] * expert_e(x_b), as the dense
    ``einsum('be,ebh->bh')`` gives when no routed example was dropped.
  """
  num_experts = outputs.shape[0]
  expert = jnp.arange(num_experts)[:, None]  # (E, 1)
  slot_weights = weights[:, index, expert] * valid  # (T, E, C)
  contributions = slot_weights[..., None] * outputs[None]  # (T, E, C, H)
  mixed = jnp.zeros(
    (weights.shape[0], weights.shape[1], outputs.shape[-1]), outputs.dtype
  )
  flat = contributions.reshape(weights.shape[0], -1, outputs.shape[-1])
  return mixed.at[:, index.reshape(-1)].add(flat)  # (T, B, H)


def capacity_for(max_count: int, batch: int, minimum: int = 8) -> Optional[int]:
  """The capacity bucket for a batch whose busiest expert gets
  ``max_count`` examples: the next multiple of an eighth of the batch (at
  least ``minimum``), so that at most eight programs are compiled; None
  (compute densely) when that is not below the batch, where dispatch would
  only add work."""
  if max_count < 0 or batch < 1:
    raise ValueError(
      f'capacity_for: max_count={max_count} and batch={batch} must be >= 0 '
      'and >= 1.'
    )
  step = max(minimum, batch // 8)
  capacity = step * max(1, -(-int(max_count) // step))
  return None if capacity >= batch else int(capacity)
