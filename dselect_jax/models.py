"""Multi-task mixture of experts: shared experts, a gate per task, towers.

The experts and the banks that run them are in ``experts.py``.

Shape legend (as in gates.py):
  B: batch   T: tasks   E: experts   G: gates (T, or 1 when shared)
  H: expert output features   C: classes   D: routing-input features

The MultiMNIST tower is the head of PaddleRec's DSelect-k model.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dselect_jax import dispatch
from dselect_jax import experts as experts_lib
from dselect_jax import gates as gates_lib
from dselect_jax.blocks import check_batch
from dselect_jax.blocks import check_bool
from dselect_jax.blocks import check_init
from dselect_jax.blocks import check_int
from dselect_jax.blocks import check_widths
from dselect_jax.blocks import truncated_normal_fan_in

Array = jax.Array
ModuleFactory = Callable[..., nn.Module]
# The fields that size a dispatched step, one per layout (at most one set).
DISPATCH_SIZES = (
  'dispatch_capacity',
  'dispatch_buckets',
  'dispatch_blocks',
  'dispatch_pairs',
)


class MLPTower(nn.Module):
  """Dense(50)-ReLU-Dense(50)-ReLU-Dense(C): a task's head, returning logits.

  The softmax lives in the loss only (PaddleRec applies one here and another
  in its loss).
  """

  num_classes: int = 10
  hidden: tuple[int, ...] = (50, 50)
  init_scheme: str = 'flax'  # Or 'paddlerec': truncated_normal_fan_in kernels.

  def __post_init__(self):
    check_int(self, 'num_classes', 1)
    check_widths(self, 'hidden')
    check_init(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    del train  # No dropout or BatchNorm in the tower.
    dense = functools.partial(
      nn.Dense,
      kernel_init=(
        truncated_normal_fan_in
        if self.init_scheme == 'paddlerec'
        else nn.initializers.lecun_normal()
      ),
    )
    for i, width in enumerate(self.hidden):
      x = nn.relu(dense(width, name=f'Dense_{i}')(x))
    return dense(self.num_classes, name=f'Dense_{len(self.hidden)}')(x)


class MultiTaskMoE(nn.Module):
  """Multi-gate mixture of experts (Ma et al. 2018; the paper's Section 5).

  Each task t mixes the shared experts with its gate's weights and feeds the
  mixture to its own tower: logits_t = tower_t(sum_e a_{t,e} f_e(x)).

  Attributes:
    num_tasks: T >= 1.
    num_experts: E >= 2.
    gate: gate name, a key of ``gates.GATES``.
    gate_kwargs: keyword arguments of the gate (``k``, ``gamma``,
      ``per_example``...).
    shared_gate: one gate for all tasks (PaddleRec's setup) instead of one per
      task (the paper's).
    routing_input: what a per-example gate routes on: ``'input'``, the
      flattened model input, or ``'experts'``, the mean of the expert outputs.
    num_classes: C, classes per task.
    expert, expert_kwargs: the expert module factory and its arguments.
    bank, bank_kwargs: what runs the experts (``experts.ExpertBank``, one
      module per expert, or ``experts.VmappedExpertBank``) and its own
      arguments (the loop's ``fused_eval`` and ``eval_block``).
    tower, tower_kwargs: the tower module factory and its arguments (it gets
      ``num_classes`` too).
    active_experts: compute only these experts (sorted indices), as when
      every static gate gives the others weight exactly 0: the output is the
      dense one, for a fraction of the cost. None computes all.
    bn_axis_name: passed to the expert when it takes ``bn_axis_name``.
    dispatch_capacity: with per-example gates routing on the input, compute
      each expert only on the examples some task weighs it for, at most
      this many per expert (``dispatch``). A batch routing more to some
      expert (or more experts to some example than ``dispatch_fanout``)
      computes every expert on every example instead, so the outputs are
      the dense ones always; ``aux['dispatch_load']`` holds the busiest
      expert's examples, the largest fanout and the blocks
      ``dispatch_blocks`` would need, (3,), from which the
      caller picks the bounds (``steps.Dispatcher``), each expert's
      examples, (E,), in ``aux['dispatch_counts']``, and
      ``aux['dispatch_dense']`` whether the batch fell back. None computes
      every expert on every example, with no routing first.
    dispatch_buckets: the same with a bucket per expert, (E,) ints >= 0:
      expert e on at most ``dispatch_buckets[e]`` of its routed examples,
      none for 0 (``dispatch.bucket_rows``), so the rows follow each
      expert's load and the experts no example uses are skipped (trained
      gates route most examples to a few experts, where a capacity must
      hold the busiest). Experts in the loop bank (``ExpertBank``), each
      on its own rows.
    dispatch_blocks: the same for ``MLPExpert``s in the loop bank, their
      routed examples in at most this many blocks of ``dispatch.BLOCK``
      rows, each block one expert's (``dispatch.block_rows``): the rows
      follow the routed pairs, however unevenly the gates load the
      experts, where a capacity follows the busiest expert.
    dispatch_fanout: with any of these, each example reads back at most
      this many experts' outputs (``dispatch.combine``, a gather; T·k
      once DSelect-k saturates). None: no bound, the outputs
      scatter-added to their examples instead (``dispatch.combine_pairs``).
    dispatch_axis_name: the mapped axis over which the devices agree on
      the branch (``steps.AXIS`` in the mapped steps), or None.
    dispatch_pairs: the same for ``MLPExpert``s in the loop bank, as
      grouped matmuls (``MLPExpert.ragged_bank``) over the routed
      (example, expert) pairs, at most this many (``dispatch.pairs``).
    routed_statistics: in training, each expert's batch statistics
      (BatchNorm) are over the examples some task routes to it (weight >
      0) on this device, not the whole batch (``blocks.RoutedBatchNorm``),
      with or without dispatch: what a dispatched expert can compute, as
      it sees only those examples, so the dispatched and the dense step
      are one function. Before the gates saturate every example is routed
      everywhere and it is BatchNorm over the device's shard (not over
      ``bn_axis_name``: see ``MultiMNISTExpert``). Needs per-example gates
      routing on the input and experts with ``BATCH_STATISTICS``.

  Returns ``(logits, aux)`` with logits ``(T, B, C)`` and aux holding
  ``expert_weights`` (``(T, E)`` static, ``(T, B, E)`` per-example) and
  ``gate``, a dict of each auxiliary term stacked over gates, ``(G, ...)``.
  """

  num_tasks: int = 2
  num_experts: int = 8
  gate: str = 'dselect_k'
  gate_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  shared_gate: bool = False
  routing_input: str = 'input'
  num_classes: int = 10
  expert: ModuleFactory = experts_lib.MultiMNISTExpert
  expert_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  bank: ModuleFactory = experts_lib.ExpertBank
  bank_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  tower: ModuleFactory = MLPTower
  tower_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  active_experts: Optional[tuple[int, ...]] = None
  bn_axis_name: Optional[str] = None
  dispatch_capacity: Optional[int] = None
  dispatch_buckets: Optional[tuple[int, ...]] = None
  dispatch_blocks: Optional[int] = None
  dispatch_fanout: Optional[int] = None
  dispatch_axis_name: Optional[str] = None
  dispatch_pairs: Optional[int] = None
  routed_statistics: bool = False

  def __post_init__(self):
    layouts = self._dispatch_layouts
    for name in layouts:
      if name != 'dispatch_buckets':
        check_int(self, name, 1)
    if self.dispatch_buckets is not None:
      self._check_buckets()
    if len(layouts) > 1:
      raise ValueError(
        f'MultiTaskMoE: {" and ".join(layouts)} are different ways to '
        'dispatch; set one.'
      )
    if self.dispatch_fanout is not None:
      check_int(self, 'dispatch_fanout', 1)
      if not set(layouts) & {
        'dispatch_capacity',
        'dispatch_buckets',
        'dispatch_blocks',
      }:
        raise ValueError(
          'MultiTaskMoE: dispatch_fanout bounds what dispatch_capacity, '
          'dispatch_buckets or dispatch_blocks dispatches; set one of them '
          'too.'
        )
    if set(layouts) & {'dispatch_blocks', 'dispatch_pairs'}:
      if not ragged_experts(self):
        raise ValueError(
          f'MultiTaskMoE: {layouts[-1]} needs MLPExpert experts in the loop '
          'bank (ExpertBank) with every expert active.'
        )
    if layouts and (not self.per_example or self.routing_input != 'input'):
      raise ValueError(
        f'MultiTaskMoE: {layouts[0]} needs per-example gates routing '
        f'on the input (per_example=True, routing_input="input"); got '
        f'per_example={self.per_example}, routing_input='
        f'{self.routing_input!r}.'
      )
    check_bool(self, 'routed_statistics')
    if self.routed_statistics and (
      not self.per_example
      or self.routing_input != 'input'
      or not getattr(self.expert, 'BATCH_STATISTICS', False)
    ):
      raise ValueError(
        "MultiTaskMoE: routed_statistics restricts each expert's batch "
        'statistics to its routed examples: it needs per-example gates '
        'routing on the input (per_example=True, routing_input="input") '
        'and experts with BatchNorm (MultiMNISTExpert); set '
        'routed_statistics=False.'
      )
    if self.active_experts is not None and self.per_example:
      raise ValueError(
        'MultiTaskMoE: active_experts needs static gates; a '
        'per-example gate can pick any expert.'
      )
    check_int(self, 'num_tasks', 1)
    check_int(self, 'num_experts', 2)
    check_int(self, 'num_classes', 1)
    check_bool(self, 'shared_gate')
    if self.gate not in gates_lib.GATES:
      raise ValueError(
        f'MultiTaskMoE: unknown gate {self.gate!r}; choose one '
        f'of {sorted(gates_lib.GATES)}.'
      )
    if self.routing_input not in ('input', 'experts'):
      raise ValueError(
        f'MultiTaskMoE: routing_input must be "input" or '
        f'"experts", got {self.routing_input!r}.'
      )
    # Builds one gate now so that bad gate arguments fail at construction.
    gates_lib.make_gate(
      self.gate, self.num_experts, **self.gate_kwargs, parent=None
    )
    super().__post_init__()

  def _check_buckets(self):
    buckets = self.dispatch_buckets
    if (
      not isinstance(buckets, tuple)
      or len(buckets) != self.num_experts
      or not all(type(b) is int and b >= 0 for b in buckets)
      or not any(buckets)
    ):
      raise ValueError(
        'MultiTaskMoE: dispatch_buckets must be a tuple of num_experts = '
        f'{self.num_experts} ints >= 0 (examples per expert), not all 0; '
        f'got {buckets!r}.'
      )
    if not bucketed_experts(self):
      raise ValueError(
        'MultiTaskMoE: dispatch_buckets runs each expert on its own rows: '
        'it needs the loop bank (ExpertBank) with every expert active.'
      )

  @property
  def per_example(self) -> bool:
    return bool(self.gate_kwargs.get('per_example', False))

  @property
  def _dispatch_layouts(self) -> list[str]:
    """The dispatch fields set (one at most, once validated)."""
    return [name for name in DISPATCH_SIZES if getattr(self, name) is not None]

  @nn.compact
  def __call__(self, x: Array, *, train: bool):
    check_batch(x, 'MultiTaskMoE')  # Each expert checks its own input shape.
    bank = self._bank()
    dispatched = bool(self._dispatch_layouts)
    if dispatched or self.routed_statistics:
      # The gates first: they decide what the experts compute, or over
      # which examples they normalize.
      experts = None
      routing = x.reshape(x.shape[0], -1)  # (B, D)
    else:
      experts = bank(x, train=train)  # (E', B, H)
      routing = None
      if self.per_example:
        if self.routing_input == 'input':
          routing = x.reshape(x.shape[0], -1)  # (B, D)
        else:
          routing = jnp.mean(experts, axis=0)  # (B, H)
    call_kwargs = {'deterministic': not train} if self.gate == 'top_k' else {}

    num_gates = 1 if self.shared_gate else self.num_tasks
    weights, gate_aux = [], []
    for g in range(num_gates):
      gate = gates_lib.make_gate(
        self.gate, self.num_experts, **self.gate_kwargs, name=f'gate_{g}'
      )
      w, aux = gate(routing, **call_kwargs)  # w: (E,) or (B, E)
      weights.append(w)
      gate_aux.append(aux)
    weights = [weights[0]] * self.num_tasks if self.shared_gate else weights
    if experts is None and not dispatched:  # routed_statistics, not dispatched.
      mask = dispatch.routed(jnp.stack(weights))  # (B, E)
      experts = bank(x, train=train, **self._routed(mask.T, train))

    extra = {}
    if self.dispatch_pairs is not None:
      stacked = jnp.stack(weights)  # (T, B, E)
      mask = dispatch.routed(stacked)  # (B, E)
      size = min(self.dispatch_pairs, mask.size)
      example, expert, valid, group_sizes = dispatch.pairs(mask, size)
      if self.is_initializing():  # The loop creates the experts' variables.
        outputs = bank(x, train=train)[expert, example]  # (M, H)
      else:
        outputs = experts_lib.MLPExpert.ragged_bank(
          {'params': self.variables['params']['experts']},
          x[example],
          expert,
          group_sizes,
        )  # (M, H)
      mixed = dispatch.combine_pairs(outputs, example, expert, valid, stacked)
      extra['dispatch_overflow'] = jnp.maximum(jnp.sum(mask) - size, 0)
    elif dispatched:
      # Materialized once: XLA:CPU would otherwise fuse the gates into each
      # of the routing's consumers and compute them again in each.
      stacked = jax.lax.optimization_barrier(jnp.stack(weights))  # (T, B, E)
      mixed, extra = self._dispatch(bank, x, stacked, train)

    logits = []
    for t in range(self.num_tasks):
      if dispatched:
        mixed_t = mixed[t]  # (B, H)
      elif self.per_example:
        mixed_t = jnp.einsum('be,ebh->bh', weights[t], experts)  # (B, H)
      elif self.active_experts is not None:
        used = weights[t][jnp.asarray(self.active_experts)]  # (E',)
        mixed_t = jnp.einsum('e,ebh->bh', used, experts)  # (B, H)
      else:
        mixed_t = jnp.einsum('e,ebh->bh', weights[t], experts)  # (B, H)
      tower = self.tower(
        num_classes=self.num_classes, **self.tower_kwargs, name=f'tower_{t}'
      )
      logits.append(tower(mixed_t, train=train))  # (B, C)

    aux = {
      'expert_weights': jnp.stack(weights),  # (T, E) or (T, B, E)
      'gate': jax.tree.map(lambda *xs: jnp.stack(xs), *gate_aux),  # (G, ...)
      **extra,
    }
    return jnp.stack(logits), aux  # (T, B, C)

  def _bank(self, parent: Optional[nn.Module] = None) -> nn.Module:
    """The experts' bank, a child of this module, or of ``parent``: the
    module a lifted transform (``nn.cond``) hands its branches, so that
    what the experts write (BatchNorm's running averages) goes through
    the transform rather than leaking out of it."""
    expert_kwargs = dict(self.expert_kwargs)
    if self.bn_axis_name is not None:
      expert_kwargs.setdefault('bn_axis_name', self.bn_axis_name)
    kwargs = {} if parent is None else {'parent': parent}
    return self.bank(
      self.num_experts,
      self.expert,
      flax.core.FrozenDict(expert_kwargs),
      active=self.active_experts,
      **self.bank_kwargs,
      name='experts',
      **kwargs,
    )

  def _routed(self, mask: Array, train: bool) -> dict[str, Array]:
    """The bank's ``mask`` argument: each expert's rows (E, B or C) its
    batch statistics are over, with ``routed_statistics`` in training."""
    return {'mask': mask} if self.routed_statistics and train else {}

  def _dispatch(self, bank, x: Array, weights: Array, train: bool):
    """The mixtures (T, B, H) with each expert on its routed examples when
    the batch fits the bounds (``dispatch_capacity`` or
    ``dispatch_blocks``, and ``dispatch_fanout``), else (in the same
    program, ``nn.cond``) with every expert on every example: exact either
    way. With ``dispatch_axis_name`` every device takes the branch that
    fits all of them (and under ``jit(vmap)`` the condition stays one,
    rather than a select computing both)."""
    fanout = self.dispatch_fanout or self.num_experts
    mask = dispatch.routed(weights)  # (B, E)
    counts = jnp.sum(mask, axis=0, dtype=jnp.int32)  # (E,)
    blocks = dispatch.block_counts(mask, dispatch.BLOCK)  # (E,)
    load = jnp.stack([jnp.max(counts), dispatch.fanout(mask), jnp.sum(blocks)])
    buckets = self.dispatch_buckets
    if self.dispatch_blocks is not None:
      bounds = [x.shape[0], fanout, self.dispatch_blocks]
    elif buckets is not None:
      bounds = [x.shape[0], fanout, jnp.inf]
    else:
      bounds = [min(self.dispatch_capacity, x.shape[0]), fanout, jnp.inf]
    fits = jnp.all(load <= jnp.array(bounds))
    if buckets is not None:
      fits &= jnp.all(counts <= jnp.asarray(buckets))
    if self.dispatch_axis_name is not None:
      fits = jax.lax.pmin(fits.astype(jnp.int32), self.dispatch_axis_name) > 0

    def sparse(module, x, weights, mask):
      bank = self._bank(parent=module)
      if self.dispatch_blocks is not None:  # MLP experts, blocks of rows.
        example, valid, expert, row, kept = dispatch.block_rows(
          mask, self.dispatch_blocks, dispatch.BLOCK
        )
        outputs = experts_lib.MLPExpert.block_bank(
          bank.variables, x[example], expert, self.num_experts
        )  # (N, G, H)
        expert = jnp.broadcast_to(expert[:, None], example.shape)  # (N, G)
      elif buckets is not None:  # A bucket of slots per expert.
        used = [e for e, size in enumerate(buckets) if size]
        example, valid = dispatch.slots(mask, max(buckets))  # (E, C)
        example = {e: example[e, : buckets[e]] for e in used}  # {e: (C_e,)}
        valid = {e: valid[e, : buckets[e]] for e in used}
        outputs = bank(
          {e: dispatch.gather(x, example[e]) for e in used},
          train=train,
          **self._routed(valid, train),
        )  # {e: (C_e, H)}
        outputs = jnp.concatenate([outputs[e] for e in used])  # (M, H)
        expert = jnp.concatenate(
          [jnp.full(buckets[e], e, jnp.int32) for e in used]
        )
        example = jnp.concatenate([example[e] for e in used])
        valid = jnp.concatenate([valid[e] for e in used])
        row, kept = dispatch.bucket_rows(mask, buckets)
      else:  # Any experts, a capacity of slots each.
        capacity = bounds[0]
        example, valid = dispatch.slots(mask, capacity)  # (E, C)
        outputs = bank(
          dispatch.gather(x, example),
          train=train,
          per_expert_inputs=True,
          **self._routed(valid, train),
        )  # (E, C, H)
        expert = jnp.broadcast_to(
          jnp.arange(mask.shape[1])[:, None], example.shape
        )
        row, kept = dispatch.slot_rows(mask, capacity)
      outputs = outputs.reshape(-1, outputs.shape[-1])  # (M, H)
      if self.dispatch_fanout is None:  # A scatter-add over the rows.
        return dispatch.combine_pairs(
          outputs,
          example.reshape(-1),
          expert.reshape(-1),
          valid.reshape(-1),
          weights,
        )
      return dispatch.combine(outputs, row, kept, weights, fanout)

    def dense(module, x, weights, mask):
      bank = self._bank(parent=module)
      experts = bank(x, train=train, **self._routed(mask.T, train))
      return jnp.einsum('tbe,ebh->tbh', weights, experts)

    if self.is_initializing():  # The dense way creates every expert.
      mixed = dense(self, x, weights, mask)
    else:
      # The dense way rematerialized: differentiating a conditional saves
      # the residuals of both branches, the untaken one's as full-size
      # placeholders (jax's _join_cond_outputs), and the dense branch's
      # (every expert's activations on every example) cost a dispatched
      # step more than its experts; rematerialized, its residuals are its
      # inputs, and a batch that falls back recomputes its forward pass.
      mixed = nn.cond(fits, sparse, nn.remat(dense), self, x, weights, mask)
    return mixed, {
      'dispatch_load': load,
      'dispatch_counts': counts,
      'dispatch_dense': ~fits,
    }


class FeatureEmbedding(nn.Module):
  """Categorical features embedded, then concatenated with the dense ones:
  ``({name: (B,) int}, (B, D)) -> (B, F)``, F = len(cardinalities) * dim + D,
  the embeddings in the order of ``cardinalities``.

  Attributes:
    cardinalities: (name, number of values) of each categorical feature; its
      ids run from 0 to that number - 1 (out-of-range ids are clamped by
      ``nn.Embed``'s lookup, so the data must keep to the range).
    dim: width of every embedding.
  """

  cardinalities: tuple[tuple[str, int], ...]
  dim: int = 8

  def __post_init__(self):
    bad = [(n, c) for n, c in self.cardinalities if not c >= 1]
    if not self.cardinalities or bad or self.dim < 1:
      raise ValueError(
        'FeatureEmbedding: needs at least one (name, cardinality >= 1) and '
        f'dim >= 1; got cardinalities={self.cardinalities!r}, dim={self.dim}.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, categorical: Mapping[str, Array], dense: Array) -> Array:
    missing = [n for n, _ in self.cardinalities if n not in categorical]
    if missing:
      raise ValueError(
        f'FeatureEmbedding: categorical features {missing} are missing; '
        f'got {sorted(categorical)}.'
      )
    parts = [
      nn.Embed(card, self.dim, name=f'embed_{name}')(categorical[name])
      for name, card in self.cardinalities
    ]  # each (B, dim)
    return jnp.concatenate([*parts, dense.astype(parts[0].dtype)], axis=-1)


class RecommenderMoE(nn.Module):
  """A multi-task recommender: embedded features, MLP experts, one gate and
  one tower per task, one output per task (a logit or a value).

  ``(categorical, dense) -> (outputs (T, B), aux)``; aux as MultiTaskMoE's.
  Per-example gates route on the embedded features.

  Attributes:
    num_tasks: T.
    cardinalities, embed_dim: of the FeatureEmbedding.
    num_experts, gate, gate_kwargs, shared_gate, active_experts: as
      MultiTaskMoE's (its variables are under ``moe``).
    expert_kwargs: MLPExpert's (``hidden``, ``features``).
    tower_hidden: widths of each task's tower before its single output.
    dispatch_capacity, dispatch_blocks, dispatch_fanout,
      dispatch_axis_name, dispatch_pairs: as MultiTaskMoE's (per-example
      gates).
  """

  num_tasks: int
  cardinalities: tuple[tuple[str, int], ...]
  embed_dim: int = 8
  num_experts: int = 8
  gate: str = 'dselect_k'
  gate_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  shared_gate: bool = False
  expert_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  tower_hidden: tuple[int, ...] = (32,)
  active_experts: Optional[tuple[int, ...]] = None
  dispatch_capacity: Optional[int] = None
  dispatch_blocks: Optional[int] = None
  dispatch_fanout: Optional[int] = None
  dispatch_axis_name: Optional[str] = None
  dispatch_pairs: Optional[int] = None

  def __post_init__(self):
    check_int(self, 'num_tasks', 1)
    check_int(self, 'embed_dim', 1)
    check_int(self, 'num_experts', 2)
    check_bool(self, 'shared_gate')
    check_widths(self, 'tower_hidden')
    super().__post_init__()

  @property
  def per_example(self) -> bool:
    return bool(self.gate_kwargs.get('per_example', False))

  @nn.compact
  def __call__(self, categorical, dense: Array, *, train: bool):
    check_batch(dense, 'RecommenderMoE')
    x = FeatureEmbedding(self.cardinalities, self.embed_dim, name='embed')(
      categorical, dense
    )  # (B, F)
    outputs, aux = MultiTaskMoE(
      num_tasks=self.num_tasks,
      num_experts=self.num_experts,
      gate=self.gate,
      gate_kwargs=self.gate_kwargs,
      shared_gate=self.shared_gate,
      routing_input='input',
      num_classes=1,
      expert=experts_lib.MLPExpert,
      expert_kwargs=self.expert_kwargs,
      tower_kwargs=flax.core.FrozenDict({'hidden': self.tower_hidden}),
      active_experts=self.active_experts,
      dispatch_capacity=self.dispatch_capacity,
      dispatch_blocks=self.dispatch_blocks,
      dispatch_fanout=self.dispatch_fanout,
      dispatch_axis_name=self.dispatch_axis_name,
      dispatch_pairs=self.dispatch_pairs,
      name='moe',
    )(x, train=train)  # (T, B, 1)
    return outputs[..., 0], aux  # (T, B)


def gate_params(params) -> Mapping[str, Any]:
  """The variables holding the ``gate_<g>`` entries: a MultiTaskMoE's own,
  a RecommenderMoE's under ``moe``."""
  return params['moe'] if 'moe' in params else params


def active_experts(expert_weights) -> tuple[int, ...]:
  """Experts with non-zero weight for some task, from static weights (T, E)."""
  weights = np.asarray(expert_weights)
  return tuple(int(e) for e in np.flatnonzero(np.any(weights > 0, axis=0)))


def ragged_experts(model: nn.Module) -> bool:
  """Whether the experts can run as grouped matmuls: MLPExperts in the
  loop bank, all active (``MultiTaskMoE.dispatch_blocks``, ``dispatch_pairs``)."""
  if isinstance(model, RecommenderMoE):
    return model.active_experts is None
  return (
    model.expert is experts_lib.MLPExpert
    and model.bank is experts_lib.ExpertBank
    and model.active_experts is None
  )


def bucketed_experts(model: nn.Module) -> bool:
  """Whether the experts can run on a bucket each: a MultiTaskMoE's loop
  bank with every expert active (``MultiTaskMoE.dispatch_buckets``)."""
  return (
    isinstance(model, MultiTaskMoE)
    and model.bank is experts_lib.ExpertBank
    and model.active_experts is None
  )


def dispatches(model: nn.Module, train: bool) -> bool:
  """Whether ``model`` can run with ``dispatch_capacity`` (sparse dispatch
  of its examples to its experts): per-example gates routing on the input,
  DSelect-k (or in evaluation the deterministic top-k), and in training
  experts without batch statistics (the recommender's MLP experts) or
  with ``routed_statistics`` (the CNN experts' BatchNorm over their routed
  examples, what a dispatched expert sees)."""
  if not model.per_example or getattr(model, 'routing_input', 'input') != (
    'input'
  ):
    return False
  if train:
    return model.gate == 'dselect_k' and (
      isinstance(model, RecommenderMoE)
      or not getattr(model.expert, 'BATCH_STATISTICS', True)
      or model.routed_statistics
    )
  return model.gate in ('dselect_k', 'top_k')


def per_example_weights(model: nn.Module, params, *inputs) -> Array:
  """Each task's expert weights per example (T, B, E), from the gates
  alone with no expert computed: what sparse dispatch routes by. Inputs
  as the model's (the images, or the categorical and dense features); a
  top-k gate is taken without noise."""
  if not model.per_example:
    raise ValueError('per_example_weights: the gates are static.')
  if isinstance(model, RecommenderMoE):
    x = FeatureEmbedding(model.cardinalities, model.embed_dim).apply(
      {'params': params['embed']}, *inputs
    )
  else:
    (x,) = inputs
  routing = x.reshape(x.shape[0], -1)  # (B, D)
  params = gate_params(params)
  gate = gates_lib.make_gate(model.gate, model.num_experts, **model.gate_kwargs)
  num_gates = 1 if model.shared_gate else model.num_tasks
  weights = [
    gate.apply({'params': params[f'gate_{g}']}, routing)[0]
    for g in range(num_gates)
  ]
  return jnp.stack(weights * model.num_tasks if model.shared_gate else weights)


def static_expert_weights(model: nn.Module, params) -> np.ndarray:
  """Each task's expert weights (T, E) from the params of a static-gated
  MultiTaskMoE or RecommenderMoE.

  Static gates take no input, so the weights come from the gates' params
  alone, with no expert computed.
  """
  if model.per_example:
    raise ValueError('static_expert_weights: the gates are per-example.')
  params = gate_params(params)
  gate = gates_lib.make_gate(model.gate, model.num_experts, **model.gate_kwargs)
  num_gates = 1 if model.shared_gate else model.num_tasks
  weights = [
    np.asarray(gate.apply({'params': params[f'gate_{g}']})[0])
    for g in range(num_gates)
  ]
  return np.stack(weights * model.num_tasks if model.shared_gate else weights)
