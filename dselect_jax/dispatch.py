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

Shapes stay static under jit through bounds, in one of three layouts. A
capacity C (``slots``): expert e gets the first C examples routed to it,
in batch order (each example's rank from a running count of the routing
mask), padded with example 0 and masked; any expert module runs on its
(C, ...) inputs, but C must hold the busiest expert's examples. A bucket
per expert (``bucket_rows``): the same with C_e slots for expert e, 0 for
an expert no example uses, so the rows follow each expert's load (the
way for trained gates, which route most examples to a few experts);
experts run one by one, each on its own rows (the loop bank). Blocks
(``block_rows``): the routed pairs sorted by expert into N blocks of
``BLOCK`` rows, each block one expert's, so the rows follow the number
of routed pairs however unevenly they load the experts; for experts that
are matmuls (``MLPExpert.block_bank``). In each, a fanout R: each example
reads back the outputs of at most R experts (``combine``; T·k once
DSelect-k saturates). The caller picks the bounds from the routing of
recent batches (``capacity_for``, ``bucket_for``, ``fanout``,
``block_counts``), and the model computes a batch that does not fit them
densely (``MultiTaskMoE``), so nothing is ever dropped.

Experts with batch statistics (BatchNorm in training) see only their
routed examples and the padding: in training they normalize over their
routed examples (the valid slots; ``MultiTaskMoE.routed_statistics``,
which the dense fallback computes too); in evaluation every expert
computes what the dense bank does.

Shape legend: B batch, T tasks, E experts, C capacity (examples per
expert; C_e expert e's bucket), N blocks of G = ``BLOCK`` rows, R fanout
(experts per example), M flattened rows, H expert output features.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Rows per block in ``block_rows``: each expert's segment wastes under one
# block; small enough for that, large enough for the batched matmuls.
BLOCK = 16
# The largest fanout bound the callers give ``combine`` (a gather, B x R
# rows); beyond it they use ``combine_pairs`` (a scatter-add over the
# routed pairs), cheaper when a few unsaturated examples use many experts.
GATHER_FANOUT = 8


def routed(weights: Array) -> Array:
  """Which examples each expert must compute: (T, B, E) weights -> (B, E),
  True where some task weighs the expert non-zero."""
  return jnp.any(weights > 0, axis=0)


def counts(weights: Array) -> Array:
  """Examples routed to each expert: (T, B, E) -> (E,) int32."""
  return jnp.sum(routed(weights), axis=0, dtype=jnp.int32)


def positions(mask: Array) -> Array:
  """Each routed example's rank among its expert's routed examples, in
  batch order: (B, E) bool -> (B, E) int32 (meaningless where not routed).
  A running count, so no sort: the slot an example takes in the expert's
  bucket."""
  return jnp.cumsum(mask, axis=0, dtype=jnp.int32) - 1


def slots(mask: Array, capacity: int) -> tuple[Array, Array]:
  """Each expert's first ``capacity`` routed examples, in batch order.

  Args:
    mask: (B, E) bool, ``routed``.
    capacity: C, 1 <= C <= B.

  Returns:
    ``index`` (E, C) int32, the examples (0 where a slot is empty), and
    ``valid`` (E, C) bool, which slots hold a routed example.
  """
  batch, num_experts = mask.shape
  position = positions(mask)  # (B, E)
  # Each routed example written at (its expert, its rank); the rest, and
  # the ranks past the capacity, land out of bounds and are dropped.
  slot = jnp.where(mask & (position < capacity), position, capacity)
  example = jnp.broadcast_to(
    jnp.arange(batch, dtype=jnp.int32)[:, None], mask.shape
  )
  index = jnp.zeros((num_experts, capacity), jnp.int32)
  index = index.at[jnp.arange(num_experts)[None, :], slot].set(
    example, mode='drop'
  )
  valid = jnp.arange(capacity)[None, :] < jnp.sum(mask, axis=0)[:, None]
  return jax.lax.optimization_barrier((index, valid))  # As in ``combine``.


def fanout(mask: Array) -> Array:
  """The most experts any one example is routed to: (B, E) -> () int32."""
  return jnp.max(jnp.sum(mask, axis=1, dtype=jnp.int32))


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
  outputs (M, H), the pairs' examples, experts and validity (M,) (from
  ``pairs``, or the rows of ``slots`` or ``block_rows`` flattened),
  weights (T, B, E) -> (T, B, H). A scatter-add over the rows: its cost
  follows the routed pairs where ``combine``'s follows B x R, the way for
  batches whose examples are not all saturated (some routed to many
  experts)."""
  pair_weights = weights[:, example, expert] * valid  # (T, M)
  mixed = jnp.zeros(
    (weights.shape[0], weights.shape[1], outputs.shape[-1]), outputs.dtype
  )
  return mixed.at[:, example].add(pair_weights[..., None] * outputs[None])


def gather(x: Array, index: Array) -> Array:
  """Each expert's examples: x (B, ...) -> (E, C, ...)."""
  return x[index]


def combine(
  outputs: Array, row: Array, kept: Array, weights: Array, fanout_bound: int
) -> Array:
  """Each task's mixture from the experts' outputs on their rows.

  Each example reads back its own rows: the (at most ``fanout_bound``)
  experts it was routed to, at the row it took in each, and sums them
  with its tasks' weights. A gather, not a scatter-add over the rows
  (``combine_pairs``): on XLA:CPU the scatter's gradient is the slower.

  Args:
    outputs: (M, H), the experts' outputs on their rows, flat
      (``slot_rows`` or ``block_rows`` say which row holds what).
    row: (B, E) int32, the row of example b in expert e's computation.
    kept: (B, E) bool, the routed pairs that have a row.
    weights: (T, B, E).
    fanout_bound: R, 1 <= R <= E, at least ``fanout`` for an exact
      mixture; an example routed to more experts loses those past its R
      lowest-numbered ones.

  Returns:
    (T, B, H): sum over e of weights[t, b, e] * expert_e(x_b), as the dense
    ``einsum('be,ebh->bh')`` gives when no routed pair was dropped.
  """
  # (B, R): the example's kept experts first (lowest-numbered on ties;
  # XLA:CPU's top-k is fast for floats, a sort for integers).
  _, expert = jax.lax.top_k(kept.astype(jnp.float32), fanout_bound)
  taken = jnp.take_along_axis(kept, expert, axis=1)  # (B, R)
  where = jnp.where(taken, jnp.take_along_axis(row, expert, axis=1), 0)
  # Computed once: XLA:CPU would otherwise fuse the running count into the
  # gather and its gradient's scatter, recomputed for every element.
  expert, where, taken = jax.lax.optimization_barrier((expert, where, taken))
  rows = outputs[where]  # (B, R, H)
  row_weights = jnp.take_along_axis(weights, expert[None], axis=2)  # (T, B, R)
  return jnp.einsum('tbr,brh->tbh', row_weights * taken, rows)


def slot_rows(mask: Array, capacity: int) -> tuple[Array, Array]:
  """Each routed pair's row among the slots' outputs flattened, (E, C) ->
  E * C, and whether it has one (its rank below the capacity): for
  ``combine``."""
  position = positions(mask)  # (B, E)
  row = jnp.arange(mask.shape[1])[None, :] * capacity + position
  return row, mask & (position < capacity)


def bucket_for(needed: int, dense: int, minimum: int = 8) -> int:
  """One expert's bucket (``bucket_rows``) for ``needed`` routed examples
  of a batch of ``dense``: 0 for none, else the smallest of dense,
  3/4 dense, dense / 2, 3/8 dense, dense / 4, ... (rounded down) that
  holds them, not below ``minimum`` unless dense is. Halves and three
  quarters between them: few sizes, so few programs compiled, and a
  bucket above ``minimum`` padded by at most about a third of its rows
  (with halves alone, half)."""
  if needed < 0 or dense < 1 or needed > dense:
    raise ValueError(
      f'bucket_for: needed={needed} must be in [0, dense] and dense={dense} '
      '>= 1.'
    )
  if needed == 0:
    return 0
  bucket, half = dense, dense
  while half >= 1:
    for size in (half, 3 * half // 4):
      if size >= max(needed, minimum):
        bucket = min(bucket, size)
    half //= 2
  return int(bucket)


def bucket_rows(mask: Array, buckets: Sequence[int]) -> tuple[Array, Array]:
  """The rows of a bucket per expert: expert e's first ``buckets[e]``
  routed examples (``slots``), the experts' buckets one after another
  (none for an expert whose bucket is 0), flattened. Each routed pair's
  row there, (B, E) int32, and whether it has one, (B, E) bool (its rank
  below its expert's bucket): for ``combine``."""
  offsets = np.concatenate([[0], np.cumsum(buckets)[:-1]]).astype(np.int32)
  position = positions(mask)  # (B, E)
  row = jnp.asarray(offsets)[None, :] + position
  return row, mask & (position < jnp.asarray(buckets, jnp.int32)[None, :])


def block_counts(mask: Array, block: int) -> Array:
  """Blocks of ``block`` rows each expert needs for its routed examples:
  (B, E) -> (E,) int32."""
  return -(-jnp.sum(mask, axis=0, dtype=jnp.int32) // block)


def block_rows(
  mask: Array, num_blocks: int, block: int
) -> tuple[Array, Array, Array, Array, Array]:
  """The routed examples in blocks of ``block`` rows, each block one
  expert's: the experts' segments one after another, in expert order, each
  padded to whole blocks, so the rows cost what the routed pairs cost
  (plus under a block per expert) however unevenly they spread over the
  experts: the layout of a grouped matmul, as dense batched matmuls.

  Args:
    mask: (B, E) bool, ``routed``.
    num_blocks: N, at least ``block_counts(mask, block).sum()`` for every
      routed pair to have a row.
    block: G, rows per block.

  Returns:
    ``example`` (N, G) int32, the example in each row (0 on padding);
    ``valid`` (N, G) bool, the rows that hold a routed pair; ``expert``
    (N,) int32, each block's expert; ``row`` (B, E) int32, each pair's
    row in the N * G flattened rows; ``kept`` (B, E) bool, the routed
    pairs that have one (``combine``).
  """
  batch, num_experts = mask.shape
  blocks = block_counts(mask, block)  # (E,)
  ends = jnp.cumsum(blocks)  # (E,): each segment's end, in blocks.
  start = (ends - blocks) * block  # (E,): each segment's first row.
  row = start[None, :] + positions(mask)  # (B, E)
  total = num_blocks * block
  kept = mask & (row < total)
  where = jnp.where(kept, row, total)  # Out of range: dropped.
  example = (
    jnp.zeros((total,), jnp.int32)
    .at[where]
    .set(
      jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], mask.shape),
      mode='drop',
    )
  )
  valid = jnp.zeros((total,), bool).at[where].set(True, mode='drop')
  expert = jnp.searchsorted(ends, jnp.arange(num_blocks), side='right')
  expert = jnp.minimum(expert, num_experts - 1).astype(jnp.int32)  # (N,)
  return jax.lax.optimization_barrier(  # As in ``combine``.
    (
      example.reshape(num_blocks, block),
      valid.reshape(num_blocks, block),
      expert,
      row,
      kept,
    )
  )


def capacity_for(needed: int, dense: int, minimum: int = 8) -> Optional[int]:
  """The bucket for a batch that needs ``needed`` rows (or slots, or
  blocks) of the ``dense`` ones: the smallest of dense / 2, dense / 4, ...
  that holds them, not below ``minimum`` unless dense / 2 is; None
  (compute densely) when not even dense / 2 does, where dispatch saves too
  little to pay for itself. Halves, so that few programs are compiled (a
  compilation of the dispatched step takes seconds to tens of seconds)."""
  if needed < 0 or dense < 1:
    raise ValueError(
      f'capacity_for: needed={needed} and dense={dense} must be >= 0 and >= 1.'
    )
  bucket = dense // 2
  if bucket < max(needed, 1):
    return None
  while bucket // 2 >= max(needed, minimum, 1):
    bucket //= 2
  return int(bucket)


def fanout_bound(fanout_needed: int) -> Optional[int]:
  """The fanout bound for a batch whose examples use at most
  ``fanout_needed`` experts: the next power of two, or None (no bound:
  ``combine_pairs``) past ``GATHER_FANOUT``."""
  bound = 1
  while bound < fanout_needed:
    bound *= 2
  return bound if bound <= GATHER_FANOUT else None
