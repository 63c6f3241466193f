"""Sparse dispatch for per-example gates: the slots and the mixture by hand,
and the dispatched models against the dense ones (outputs and gradients,
MLP experts in training, CNN experts in evaluation, on one device and on
four)."""

import functools
import threading
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dselect_jax import dispatch
from dselect_jax import experts
from dselect_jax import models
from dselect_jax import steps
from tests import helpers


def test_slots_by_hand():
  # 5 examples, 3 experts: expert 0 gets examples 1 and 3, expert 1 all
  # but 2, expert 2 none.
  mask = jnp.array(
    [[0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0]], bool
  )
  index, valid = dispatch.slots(mask, capacity=3)
  np.testing.assert_array_equal(index, [[1, 3, 0], [0, 1, 3], [0, 0, 0]])
  np.testing.assert_array_equal(valid, [[1, 1, 0], [1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(dispatch.counts(mask[None] * 1.0), [2, 4, 0])
  # Slot rows flattened (E, C) -> 3 E + slot; capacity 3 has none for
  # expert 1's fourth example (4).
  row, kept = dispatch.slot_rows(mask, capacity=3)
  np.testing.assert_array_equal(row[[0, 1, 3, 4], 1], [3, 4, 5, 6])
  np.testing.assert_array_equal(row[[1, 3], 0], [0, 1])
  np.testing.assert_array_equal(kept[:, 1], [1, 1, 0, 1, 0])


def test_blocks_by_hand():
  # 5 examples, 3 experts, blocks of 2 rows: expert 0 has examples 1, 3
  # (one block), expert 1 has 0, 1, 3, 4 (two blocks), expert 2 has 2 (one
  # block, half padding): 4 blocks, then a spare one.
  mask = jnp.array(
    [[0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 0]], bool
  )
  np.testing.assert_array_equal(dispatch.block_counts(mask, 2), [1, 2, 1])
  example, valid, expert, row, kept = dispatch.block_rows(mask, 5, 2)
  np.testing.assert_array_equal(
    example, [[1, 3], [0, 1], [3, 4], [2, 0], [0, 0]]
  )
  np.testing.assert_array_equal(valid, [[1, 1], [1, 1], [1, 1], [1, 0], [0, 0]])
  np.testing.assert_array_equal(expert, [0, 1, 1, 2, 2])
  np.testing.assert_array_equal(row[[1, 3], 0], [0, 1])
  np.testing.assert_array_equal(row[[0, 1, 3, 4], 1], [2, 3, 4, 5])
  assert int(row[2, 2]) == 6 and bool(np.all(np.asarray(kept) == mask))
  # Three blocks hold experts 0 and 1 only: expert 2's example has no row.
  *_, kept = dispatch.block_rows(mask, 3, 2)
  np.testing.assert_array_equal(kept[:, 2], [0, 0, 0, 0, 0])
  np.testing.assert_array_equal(kept[:, :2], mask[:, :2])


def test_combine_by_hand():
  # T = 2 tasks, B = 3 examples, E = 2 experts, H = 1 feature; expert e's
  # output on example b is 10 * e + b.
  weights = jnp.array(
    [
      [[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]],
      [[0.0, 1.0], [0.0, 0.0], [0.25, 0.75]],
    ]
  )  # (T, B, E)
  mask = dispatch.routed(weights)
  index, _ = dispatch.slots(mask, capacity=3)
  # Expert 0 has examples 0, 1, 2 in its slots; expert 1 examples 0 and 2.
  np.testing.assert_array_equal(index, [[0, 1, 2], [0, 2, 0]])
  assert int(dispatch.fanout(mask)) == 2  # Examples 0 and 2 use both.
  outputs = (10.0 * jnp.arange(2)[:, None] + index).reshape(6, 1)  # (E C, 1)
  row, kept = dispatch.slot_rows(mask, capacity=3)
  mixed = dispatch.combine(outputs, row, kept, weights, fanout_bound=2)
  want = [
    [0.5 * 0 + 0.5 * 10, 1.0 * 1, 0.0],
    [1.0 * 10, 0.0, 0.25 * 2 + 0.75 * 12],
  ]
  np.testing.assert_allclose(mixed[..., 0], want)
  # A fanout bound of 1 keeps each example's lowest-numbered expert only:
  # examples 0 and 2 lose expert 1.
  mixed = dispatch.combine(outputs, row, kept, weights, fanout_bound=1)
  want = [[0.5 * 0, 1.0 * 1, 0.0], [0.0, 0.0, 0.25 * 2]]
  np.testing.assert_allclose(mixed[..., 0], want)


def test_a_capacity_drops_the_last_examples_from_the_mixture():
  # 4 examples all on expert 0 (weight 1, task 0); capacity 2 keeps the
  # first two in batch order, the others get nothing from it.
  weights = jnp.zeros((1, 4, 2)).at[0, :, 0].set(1.0)
  mask = dispatch.routed(weights)
  index, valid = dispatch.slots(mask, capacity=2)
  np.testing.assert_array_equal(index, [[0, 1], [0, 0]])
  np.testing.assert_array_equal(valid, [[1, 1], [0, 0]])
  np.testing.assert_array_equal(dispatch.positions(mask)[:, 0], [0, 1, 2, 3])
  outputs = jnp.array([[5.0], [7.0], [0.0], [0.0]])  # (E C, 1)
  row, kept = dispatch.slot_rows(mask, capacity=2)
  mixed = dispatch.combine(outputs, row, kept, weights, fanout_bound=2)
  np.testing.assert_allclose(mixed[0, :, 0], [5.0, 7.0, 0.0, 0.0])


@pytest.mark.parametrize(
  'needed,dense,want',
  [
    # Halves of the dense 256 rows, the smallest that holds the need, not
    # below 8.
    (0, 256, 8),
    (3, 256, 8),
    (32, 256, 32),
    (33, 256, 64),
    (128, 256, 128),
    (129, 256, None),  # Over half: dispatch would save too little.
    (16, 32, 16),
    (17, 32, None),
    (3, 8, 4),  # Half of 8 is below the minimum, and allowed.
    (0, 1, None),
  ],
)
def test_capacity_buckets(needed, dense, want):
  assert dispatch.capacity_for(needed, dense) == want


@pytest.mark.parametrize(
  'needed,want', [(0, 1), (1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, None)]
)
def test_fanout_bounds(needed, want):
  assert dispatch.fanout_bound(needed) == want


def test_pairs_by_hand():
  # 3 examples, 2 experts: expert 0 gets examples 0 and 2, expert 1 gets 1.
  mask = jnp.array([[1, 0], [0, 1], [1, 0]], bool)
  example, expert, valid, sizes = dispatch.pairs(mask, size=4)
  np.testing.assert_array_equal(example, [0, 2, 1, 0])
  np.testing.assert_array_equal(expert, [0, 0, 1, 0])
  np.testing.assert_array_equal(valid, [1, 1, 1, 0])
  np.testing.assert_array_equal(sizes, [2, 1])
  # Expert e's output on example b is 10 * e + b; task weights by hand.
  outputs = (10.0 * expert + example)[:, None]  # (M, 1)
  weights = jnp.array([[[0.25, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # (1, B, E)
  mixed = dispatch.combine_pairs(outputs, example, expert, valid, weights)
  np.testing.assert_allclose(mixed[0, :, 0], [0.25 * 0, 1.0 * 11, 1.0 * 2])


def test_the_ragged_mlp_experts_are_each_experts_layers():
  bank = experts.ExpertBank(
    3, experts.MLPExpert, flax.core.FrozenDict({'hidden': (5,), 'features': 4})
  )
  x = jax.random.normal(jax.random.key(0), (7, 6))
  variables = bank.init(jax.random.key(1), x, train=False)
  dense = bank.apply(variables, x, train=False)  # (E, B, H)
  expert = jnp.array([0, 0, 1, 2, 2, 2, 0], jnp.int32)  # Rows sorted by
  sizes = jnp.array([2, 1, 3], jnp.int32)  # expert, then one padding row.
  rows = experts.MLPExpert.ragged_bank(variables, x, expert, sizes)
  for i in range(6):
    np.testing.assert_allclose(rows[i], dense[expert[i], i], rtol=1e-5)
  # The padded buckets: expert e on its own rows, one batched matmul.
  per_expert = jnp.stack([x[:4], x[2:6], x[3:7]])  # (E, C, F)
  padded = experts.MLPExpert.padded_bank(variables, per_expert, (0, 1, 2))
  for e, start in enumerate((0, 2, 3)):
    np.testing.assert_allclose(
      padded[e], dense[e, start : start + 4], rtol=1e-5
    )
  # Blocks of 2 rows, each block one expert's: experts 2, 0, 2.
  blocks = jnp.stack([x[:2], x[2:4], x[4:6]])  # (N, G, F)
  got = experts.MLPExpert.block_bank(variables, blocks, jnp.array([2, 0, 2]), 3)
  for n, (e, start) in enumerate(((2, 0), (0, 2), (2, 4))):
    np.testing.assert_allclose(got[n], dense[e, start : start + 2], rtol=1e-5)


def _recommender(dispatch_capacity=None, num_experts=8):
  return models.RecommenderMoE(
    num_tasks=2,
    cardinalities=(('user', 5), ('item', 7)),
    num_experts=num_experts,
    gate_kwargs=flax.core.FrozenDict({'k': 2, 'per_example': True}),
    expert_kwargs=flax.core.FrozenDict({'hidden': (16,), 'features': 8}),
    dispatch_capacity=dispatch_capacity,
  )


def _inputs(batch, seed=0):
  rng = np.random.default_rng(seed)
  categorical = {
    'user': jnp.asarray(rng.integers(0, 5, batch)),
    'item': jnp.asarray(rng.integers(0, 7, batch)),
  }
  return categorical, jnp.asarray(rng.normal(size=(batch, 3)), jnp.float32)


def _saturate(params, scale):
  """Bit logits scaled so most examples' selectors are saturated."""
  params = flax.core.unfreeze(params)
  for g in ('gate_0', 'gate_1'):
    dense = params['moe'][g]['z_logits']
    dense['kernel'] = dense['kernel'] * scale
    dense['bias'] = dense['bias'] * scale
  return params


@pytest.mark.parametrize(
  'field',
  [
    # The capacity layout's default tests: the four-device step, a batch
    # past its bounds.
    pytest.param('dispatch_capacity', marks=pytest.mark.slow),
    'dispatch_blocks',
    pytest.param('dispatch_pairs', marks=pytest.mark.slow),
  ],
)
@pytest.mark.parametrize(
  'scale', [pytest.param(1.0, marks=pytest.mark.slow), 300.0]
)
def test_dispatched_mlp_experts_equal_the_dense_ones_with_gradients(
  scale, field
):
  """Exact for any weights: unsaturated (scale 1, every expert routed
  nearly everywhere) and saturated (at most 2 x 2 experts per example)."""
  categorical, dense_features = _inputs(64)
  model = _recommender()
  params = _saturate(
    model.init(jax.random.key(0), categorical, dense_features, train=False)[
      'params'
    ],
    scale,
  )
  _, aux = model.apply(
    {'params': params}, categorical, dense_features, train=True
  )
  counts = dispatch.counts(aux['expert_weights'])
  busiest, routed = int(jnp.max(counts)), int(jnp.sum(counts))
  if scale > 1:
    assert busiest < 64  # Saturated: experts skip examples.
  mask = dispatch.routed(aux['expert_weights'])
  fanout = int(dispatch.fanout(mask))
  blocks = int(jnp.sum(dispatch.block_counts(mask, dispatch.BLOCK)))
  if field == 'dispatch_pairs':
    sparse = [model.clone(dispatch_pairs=routed)]
  else:  # The tightest bounds that hold the batch; gather and scatter.
    size = busiest if field == 'dispatch_capacity' else blocks
    sparse = [
      model.clone(**{field: size}, dispatch_fanout=fanout),
      model.clone(**{field: size}, dispatch_fanout=None),
    ]

  def loss(params, model):
    outputs, aux = model.apply(
      {'params': params}, categorical, dense_features, train=True
    )
    return jnp.sum(jnp.sin(outputs)) + aux['gate']['entropy'].sum(), aux

  (want, _), want_grads = jax.jit(
    jax.value_and_grad(functools.partial(loss, model=model), has_aux=True)
  )(params)
  for dispatched in sparse:
    (got, got_aux), got_grads = jax.jit(
      jax.value_and_grad(
        functools.partial(loss, model=dispatched), has_aux=True
      )
    )(params)
    if field == 'dispatch_pairs':
      assert int(got_aux['dispatch_overflow']) == 0
    else:
      assert not got_aux['dispatch_dense']  # The sparse branch ran.
      np.testing.assert_array_equal(
        got_aux['dispatch_load'], [busiest, fanout, blocks]
      )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
      got_grads,
      want_grads,
    )


@pytest.mark.parametrize(
  'bounds',
  [
    {'dispatch_capacity': 2},
    {'dispatch_capacity': 32, 'dispatch_fanout': 1},
    {'dispatch_blocks': 1},
  ],
)
def test_a_batch_past_the_bounds_is_computed_densely(bounds):
  """Unsaturated gates route most examples to every expert: a capacity of 2
  (or a fanout of 1) cannot hold them, and the model computes every expert
  on every example instead, the dense outputs."""
  categorical, dense_features = _inputs(32)
  model = _recommender()
  variables = model.init(
    jax.random.key(0), categorical, dense_features, train=False
  )
  want, want_aux = model.apply(
    variables, categorical, dense_features, train=False
  )
  got, aux = model.clone(**bounds).apply(
    variables, categorical, dense_features, train=False
  )
  assert aux['dispatch_dense']
  mask = np.asarray(want_aux['expert_weights']) > 0  # (T, B, E)
  routed = mask.any(axis=0)  # (B, E)
  blocks = np.sum(-(-routed.sum(0) // dispatch.BLOCK))
  np.testing.assert_array_equal(
    aux['dispatch_load'], [routed.sum(0).max(), routed.sum(1).max(), blocks]
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow  # 11 s: the CNN bank compiled twice.
def test_dispatched_cnn_experts_equal_the_dense_ones_in_evaluation():
  model = models.MultiTaskMoE(
    num_experts=4,
    gate_kwargs=flax.core.FrozenDict({'k': 1, 'per_example': True}),
    expert=experts.MultiMNISTExpert,
  )
  images = jax.random.uniform(jax.random.key(1), (16, 36, 36, 1))
  variables = model.init(jax.random.key(0), images, train=False)
  params = flax.core.unfreeze(variables['params'])
  for g in ('gate_0', 'gate_1'):
    for leaf in ('kernel', 'bias'):
      params[g]['z_logits'][leaf] = params[g]['z_logits'][leaf] * 3000
  variables = {**variables, 'params': params}
  want, want_aux = jax.jit(functools.partial(model.apply, train=False))(
    variables, images
  )
  busiest = int(jnp.max(dispatch.counts(want_aux['expert_weights'])))
  assert busiest < 16
  sparse = model.clone(dispatch_capacity=busiest)
  got, aux = jax.jit(functools.partial(sparse.apply, train=False))(
    variables, images
  )
  assert not aux['dispatch_dense']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # For the 5-minute default run.
def test_the_dispatched_step_on_four_devices_equals_the_dense_step():
  """steps.train_step with the dispatched model as ``model``, mapped over
  the 4 fake devices: the same parameters as the dense step."""
  import optax  # pylint: disable=g-import-not-at-top

  from dselect_jax import factory  # pylint: disable=g-import-not-at-top

  categorical, dense_features = _inputs(32, seed=3)
  model = _recommender()
  params = _saturate(
    model.init(jax.random.key(0), categorical, dense_features, train=False)[
      'params'
    ],
    300.0,
  )
  state = factory.TrainState.create(
    apply_fn=model.apply, params=params, tx=optax.sgd(0.1), batch_stats={}
  )
  rng = np.random.default_rng(4)
  batch = {
    'categorical': categorical,
    'dense': dense_features,
    'target': jnp.asarray(rng.integers(0, 2, (32, 2)), jnp.float32),
    'weight': jnp.ones((32, 2)),
  }
  sharded = jax.tree.map(lambda x: x.reshape((4, 8) + x.shape[1:]), batch)
  # Each device's busiest expert: the capacity that drops nothing.
  busiest = max(
    int(
      jnp.max(
        dispatch.counts(
          model.apply(
            {'params': params},
            jax.tree.map(lambda x, d=d: x[d], sharded['categorical']),
            sharded['dense'][d],
            train=False,
          )[1]['expert_weights']
        )
      )
    )
    for d in range(4)
  )
  assert busiest < 8  # Some expert skips some example on every device.
  # Dense; each device's examples dispatched; the busiest device's not
  # fitting, so that all of them compute densely.
  (want, _), (got, metrics), (fell_back, fallback_metrics) = (
    helpers.dispatched_train_steps(
      model,
      state,
      sharded,
      ('binary', 'regression'),
      (None, busiest, busiest - 1),
    )
  )
  np.testing.assert_array_equal(metrics['dispatch_dense'], [False] * 4)
  np.testing.assert_array_equal(fallback_metrics['dispatch_dense'], [True] * 4)
  for m in (metrics, fallback_metrics):
    assert int(m['dispatch_load'][0][0]) == busiest
  for result in (got, fell_back):
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
      result,
      want,
    )


class _State(NamedTuple):
  params: Any  # What steps.routing_load reads.


def _saturated_routing(scale=300.0):
  """A 16-expert recommender's saturated gates (bit logits times
  ``scale``) on 4 devices' batches of 128, with their routing load:
  busiest expert, fanout, blocks."""
  categorical, dense_features = _inputs(512, seed=3)
  model = _recommender(num_experts=16)
  params = _saturate(
    model.init(jax.random.key(0), categorical, dense_features, train=False)[
      'params'
    ],
    scale,
  )
  state = _State(steps.replicate(params))
  batch = jax.tree.map(
    lambda x: x.reshape((4, 128) + x.shape[1:]),
    {'categorical': categorical, 'dense': dense_features},
  )
  busiest, _, fanout, blocks = np.max(
    np.asarray(
      steps.parallel(functools.partial(steps.routing_load, model))(state, batch)
    ),
    axis=0,
  )[:4]  # Then each expert's examples.
  return model, state, batch, (int(busiest), int(fanout), int(blocks))


# Blocks (the recommender's MLP experts) of the dense step's 16 x 128 rows.
_DENSE_BLOCKS = 16 * 128 // dispatch.BLOCK


def _report(busiest, fanout, blocks):
  """A dispatched step's report on 4 devices: its load, no fallback."""
  return {
    'dispatch_load': np.array([[busiest, fanout, blocks]] * 4),
    'dispatch_dense': np.zeros(4, bool),
  }


@pytest.mark.parametrize('dispatch_faster', [True, False])
def test_the_dispatcher_keeps_dispatch_only_where_it_measured_faster(
  dispatch_faster,
):
  """Steps that sleep instead of computing (1 ms for the faster way, 8 ms
  for the other): the Dispatcher times the dispatched step, then the dense
  one, each after an untimed first call, and then hands out the faster
  one only."""
  model, state, batch, load = _saturated_routing()
  busiest, fanout, blocks = load
  assert dispatch.capacity_for(blocks, _DENSE_BLOCKS, 1) is not None
  ran = []

  def make_step(model):
    dispatched = model.dispatch_blocks is not None

    def step():
      time.sleep(0.001 if dispatched == dispatch_faster else 0.008)
      ran.append(dispatched)
      return _report(*load) if dispatched else {}

    return step

  dispatcher = steps.Dispatcher(
    model, make_step, measure=2, compile_ahead=False
  )
  for _ in range(10):
    dispatcher.observe(dispatcher(state, batch)())
  # 3 dispatched batches and 3 dense ones (the first of each untimed), then
  # the faster way only.
  assert ran[:6] == [True] * 3 + [False] * 3
  assert ran[6:] == [dispatch_faster] * 4
  assert list(dispatcher.faster.values()) == [dispatch_faster]
  assert dispatcher.bounds['dispatch_blocks'] == dispatch.capacity_for(
    blocks, _DENSE_BLOCKS, minimum=1
  )
  assert dispatcher.bounds['dispatch_fanout'] == dispatch.fanout_bound(fanout)


def test_dense_batches_amid_dispatched_ones_keep_the_recent_loads():
  """The dense batches that time a pair of bounds (or stand in while one
  compiles) run amid dispatched ones: the gates-only look they bring
  joins the loads the dispatched steps reported, so an unbounded fanout
  reported just before is kept, not forgotten for that one look."""
  model, state, batch, (_, fanout, _) = _saturated_routing(1e5)
  bounded = dispatch.fanout_bound(fanout)
  assert bounded is not None  # A few experts per example: T = 2, k = 2.

  def make_step(model):
    def step():  # Dispatched steps see an example routed to 12 experts.
      return {} if model.dispatch_blocks is None else _report(70, 12, 52)

    return step

  dispatcher = steps.Dispatcher(
    model, make_step, window=1, probe_every=1, measure=3, compile_ahead=False
  )
  fanouts = []
  for _ in range(8):
    dispatcher.observe(dispatcher(state, batch)())
    fanouts.append(dispatcher.bounds['dispatch_fanout'])
  # Bounded at the first look (the gates'); 4 dispatched calls (one
  # untimed, 3 timed), their reports read two calls late: unbounded at
  # the third report of 12 (steps.SPIKES = 2); the dense timed calls'
  # gates-only looks (fanout <= 8) keep it.
  assert fanouts == [bounded] * 4 + [None] * 4


def test_the_dispatcher_loosens_at_the_third_batch_past_its_bounds():
  """With a window of 4 batches full of loads that fit 8 blocks, batches
  that need 12 (a bucket of 16) keep the 8-block bounds for two batches
  of the window (they fall back inside the program) and loosen them at
  the third; fanouts likewise, over their window of 32 looks."""
  model, state, batch, (busiest, _, _) = _saturated_routing(1e5)
  assert steps.SPIKES == 2
  load = [busiest, 2, 8]  # What the dispatched steps report.

  def make_step(model):
    def step():
      return {} if model.dispatch_blocks is None else _report(*load)

    return step

  dispatcher = steps.Dispatcher(
    model, make_step, window=4, measure=0, compile_ahead=False
  )

  def bounds_after(blocks, fanout, calls):
    load[1:] = [fanout, blocks]
    got = []
    for _ in range(calls):
      dispatcher.observe(dispatcher(state, batch)())
      bounds = dispatcher.bounds
      got.append((bounds['dispatch_blocks'], bounds['dispatch_fanout']))
    return got

  # The gates-only look, then reports of 8 blocks and fanout 2 until both
  # windows hold nothing else. Reports are read two calls late.
  assert bounds_after(8, 2, 40)[-1] == (8, 2)
  # Reports of 12 blocks: the bounds follow at the third one read.
  assert bounds_after(12, 2, 5) == [(8, 2)] * 4 + [(16, 2)]
  # Back to 8: 16 until at most two 12s are left in the window.
  assert bounds_after(8, 2, 5) == [(16, 2)] * 3 + [(8, 2)] * 2
  # A fanout of 3 (bound 4): the fanout bound follows at the third too.
  assert bounds_after(8, 3, 5) == [(8, 2)] * 4 + [(8, 4)]


def test_in_the_dense_phase_the_bounds_follow_a_falling_load():
  """While the dense step runs (here: standing in for programs that never
  finish compiling), each gates-only look restarts the recent loads; the
  bounds follow the looks down as the gates saturate further (64 blocks,
  then 16 once three bits of each selector are fixed), not held at the
  bounds in use."""
  model, state, batch, (_, _, blocks) = _saturated_routing(1e5)
  params = jax.tree.map(np.asarray, state.params)  # (4, ...) replicated.
  fewer = flax.core.unfreeze(params)
  for g in ('gate_0', 'gate_1'):
    bias = fewer['moe'][g]['z_logits']['bias']  # (4, K * M), M = 4 bits.
    fixed = np.arange(bias.shape[-1]) % 4 != 0  # Bits 1-3: 2 experts each.
    fewer['moe'][g]['z_logits']['bias'] = np.where(fixed, 1e6, bias)
  saturated = _State(steps.replicate(jax.tree.map(lambda x: x[0], fewer)))
  load = steps.parallel(functools.partial(steps.routing_load, model))
  fewer_blocks = int(np.max(np.asarray(load(saturated, batch))[:, 3]))
  first = dispatch.capacity_for(blocks, _DENSE_BLOCKS, minimum=1)
  tight = dispatch.capacity_for(fewer_blocks, _DENSE_BLOCKS, minimum=1)
  assert (first, tight) == (64, 16)
  go = threading.Event()

  class Step:  # A dispatched program that compiles until the test ends.
    def __init__(self, bound):
      self.bound = bound

    def __call__(self):
      return {}

    def lower(self, *shapes):
      return self

    def compile(self):
      go.wait()

  dispatcher = steps.Dispatcher(
    model, lambda m: Step(m.dispatch_blocks), probe_every=1, measure=0
  )
  bounds = []
  try:
    for s in (state, state, saturated, saturated):
      dispatcher(s, batch)()
      bounds.append(dispatcher.bounds['dispatch_blocks'])
  finally:
    go.set()
    dispatcher.close()
  assert bounds == [first, first, tight, tight]


def test_the_dispatcher_compiles_new_bounds_ahead_while_others_run():
  """Steps whose compilation waits for the test's go: while a pair of
  bounds compiles (in the Dispatcher's thread, for the shapes of the
  batch's arguments) the dense step runs, or, once one was compiled, the
  tightest compiled bounds that hold the new ones; the new program takes
  over once compiled."""
  model, state, batch, (busiest, fanout, blocks) = _saturated_routing()
  first = dispatch.capacity_for(blocks, _DENSE_BLOCKS, minimum=1)
  assert first is not None and first >= 2
  ran, made, lowered, go = [], [], [], {}
  load = [busiest, fanout, blocks]  # What the dispatched steps report.

  class Step:
    def __init__(self, bound):
      self.bound = bound  # dispatch_blocks (None: dense).

    def __call__(self):
      ran.append(self.bound)
      return {} if self.bound is None else _report(*load)

    def lower(self, *shapes):
      lowered.append(shapes)
      return self

    def compile(self):
      go[self.bound].wait()

  def make_step(model):  # Called as the compilation starts.
    made.append(model.dispatch_blocks)
    go.setdefault(model.dispatch_blocks, threading.Event())
    return Step(model.dispatch_blocks)

  dispatcher = steps.Dispatcher(
    model, make_step, window=1, probe_every=1, measure=0
  )
  rng = jax.random.key(0)

  def run(times):
    for _ in range(times):
      dispatcher.observe(dispatcher(state, batch, rng)())

  run(1)  # Bounds seen once compile nothing,
  assert ran == [None] and first not in made
  run(1)  # and seen again, they compile; meanwhile the dense step runs.
  assert ran == [None] * 2 and made.count(first) == 1
  go[first].set()
  dispatcher.wait()
  (shapes,) = lowered  # For the step's arguments' shapes and dtypes.
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
    lambda x: (x.shape, x.dtype), (state, batch, rng)
  )
  run(2)
  assert ran[2:] == [first] * 2
  # Fewer blocks, falling from batch to batch, then steady: the first
  # bounds run on, and tighter ones compile only once the load stops
  # falling (reports are read one step late: two calls behind).
  tighter = dispatch.capacity_for(12, _DENSE_BLOCKS, minimum=1)
  looser = dispatch.capacity_for(24, _DENSE_BLOCKS, minimum=1)
  assert tighter == dispatch.capacity_for(16, _DENSE_BLOCKS, minimum=1)
  assert tighter < looser < first
  bounds, compiling = [], []
  for needed in (24, 16, 12, 12, 12, 12, 12, 12):
    load[2] = needed
    run(1)
    bounds.append(dispatcher.bounds['dispatch_blocks'])
    compiling.append(made.count(tighter))
  assert bounds == [first, first, looser] + [tighter] * 5
  # Passing: 24 blocks, then 16, then 12s: the tighter bounds compile once
  # the last SETTLE_LOOKS looks before this one all needed 12.
  assert compiling == [0] * 7 + [1] and looser not in made
  assert ran[4:] == [first] * 8
  go[tighter].set()
  dispatcher.wait()
  run(1)
  assert ran[-1] == tighter


def _cnn_bank_on_own_inputs(block):
  """Three CNN experts with BatchNorm statistics of their own, each on its
  own 4 images: the fused evaluation (``block``: XLA's convolutions or the
  CPU kernels) against each expert module applied to its rows."""
  bank = experts.ExpertBank(3, experts.MultiMNISTExpert)
  images = jax.random.normal(jax.random.key(2), (3, 4, 36, 36, 1))
  variables = flax.core.unfreeze(
    bank.init(jax.random.key(0), images[0], train=False)
  )
  rng = np.random.default_rng(0)
  for e in range(3):  # Running averages away from 0 and 1.
    for stats in variables['batch_stats'][f'expert_{e}'].values():
      stats['mean'] = jnp.asarray(rng.normal(size=stats['mean'].shape))
      stats['var'] = jnp.asarray(rng.uniform(0.5, 2, stats['var'].shape))
  fused = experts.ExpertBank(
    3, experts.MultiMNISTExpert, fused_eval=True, eval_block=block
  )
  got = jax.jit(
    functools.partial(fused.apply, train=False, per_expert_inputs=True)
  )(variables, images)  # (E, C, H)
  for e in range(3):
    want = experts.MultiMNISTExpert().apply(
      {
        'params': variables['params'][f'expert_{e}'],
        'batch_stats': variables['batch_stats'][f'expert_{e}'],
      },
      images[e],
      train=False,
    )
    np.testing.assert_allclose(got[e], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 6 s; the CPU kernels' variant below runs by default.
def test_the_fused_cnn_evaluation_takes_each_experts_own_inputs():
  _cnn_bank_on_own_inputs(None)


def test_the_cpu_kernels_take_each_experts_own_inputs(cpu_kernels_built):
  del cpu_kernels_built  # Built, or the test is skipped.
  from dselect_jax.cpu import kernels  # pylint: disable=g-import-not-at-top

  _cnn_bank_on_own_inputs(kernels.conv_relu_pool)
