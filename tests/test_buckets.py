"""A bucket per expert (``MultiTaskMoE.dispatch_buckets``): the buckets
and rows by hand, the dispatched models against the dense ones (outputs,
gradients and BatchNorm's running averages; experts no example uses
skipped), and the Dispatcher's choice of buckets."""

import functools

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

# Gradients and running averages: float noise of about 1e-6 on the CNN
# convolutions' biases, whose true gradient is 0 (BatchNorm follows).
CLOSE = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  'needed, dense, want',
  [(0, 256, 0), (1, 256, 8), (8, 256, 8), (9, 256, 12), (13, 256, 16),
   (17, 256, 24), (25, 256, 32), (97, 256, 128), (129, 256, 192),
   (193, 256, 256), (256, 256, 256), (7, 200, 9), (76, 200, 100),
   (101, 200, 150), (3, 4, 4), (1, 1, 1), (2, 6, 6)],
)  # fmt: skip
def test_bucket_for_by_hand(needed, dense, want):
  assert dispatch.bucket_for(needed, dense) == want


def test_bucket_for_names_a_load_past_the_batch():
  with pytest.raises(ValueError, match=r'needed=9 must be in \[0, dense\]'):
    dispatch.bucket_for(9, 8)


def test_bucket_rows_by_hand():
  # 4 examples, 3 experts with buckets of 2, 0 and 4: expert 0's third
  # example (3) and expert 1's (1 and 2) have no row; expert 2's rows
  # follow expert 0's two.
  mask = jnp.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0]], bool)
  row, kept = dispatch.bucket_rows(mask, (2, 0, 4))
  np.testing.assert_array_equal(
    kept, [[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]]
  )
  np.testing.assert_array_equal(row[[0, 1], 0], [0, 1])
  np.testing.assert_array_equal(row[[0, 2], 2], [2, 3])


def _moe(expert, expert_kwargs, images, scale=3000.0, **kwargs):
  """A per-example MoE of 8 experts (k = 1 per task, 2 tasks), its bit
  logits scaled by ``scale`` (saturated) and the first bit's bias set
  high in both gates, so that half the experts get no example, as
  trained gates leave most experts unused."""
  model = models.MultiTaskMoE(
    num_experts=8,
    gate_kwargs=flax.core.FrozenDict({'k': 1, 'per_example': True}),
    expert=expert,
    expert_kwargs=flax.core.FrozenDict(expert_kwargs),
    **kwargs,
  )
  variables = model.init(jax.random.key(0), images, train=False)
  params = flax.core.unfreeze(variables['params'])
  for g in ('gate_0', 'gate_1'):
    z = params[g]['z_logits']
    z['kernel'] = z['kernel'] * scale
    z['bias'] = (z['bias'] * scale).at[0].set(1e4)
  return model, {**variables, 'params': params}


def _trained(model, variables, x):
  """The loss, its gradients, the new running averages (if any) and aux
  of one training pass."""
  mutable = ['batch_stats'] if 'batch_stats' in variables else []

  def loss(params):
    (logits, aux), updates = model.apply(
      {**variables, 'params': params}, x, train=True, mutable=mutable
    )
    value = jnp.sum(jnp.sin(logits)) + aux['gate']['entropy'].sum()
    return value, (updates.get('batch_stats'), aux)

  (value, (stats, aux)), grads = jax.jit(
    jax.value_and_grad(loss, has_aux=True)
  )(variables['params'])
  return value, grads, stats, aux


def _buckets_to_try(counts):
  """Bounds that hold the batch (the counts themselves, with the fanout
  gathered and scattered, and ``bucket_for``'s sizes) and bounds that do
  not (the busiest expert's bucket one short; an expert with examples
  given none): (bounds, whether the batch falls back)."""
  counts = [int(c) for c in counts]
  busiest = int(np.argmax(counts))
  short = list(counts)
  short[busiest] -= 1
  unused_by_bounds = [
    0 if c == min(c for c in counts if c) else c for c in counts
  ]
  return [
    ({'dispatch_buckets': tuple(counts), 'dispatch_fanout': 2}, False),
    ({'dispatch_buckets': tuple(counts)}, False),
    (
      {
        'dispatch_buckets': tuple(
          dispatch.bucket_for(c, 32, minimum=2) for c in counts
        )
      },
      False,
    ),
    ({'dispatch_buckets': tuple(short), 'dispatch_fanout': 2}, True),
    ({'dispatch_buckets': tuple(unused_by_bounds)}, True),
  ]


@pytest.mark.parametrize(
  'case',
  [
    0,  # The default run: dispatched exactly, and one fallback.
    pytest.param(1, marks=pytest.mark.slow),
    pytest.param(2, marks=pytest.mark.slow),
    3,
    pytest.param(4, marks=pytest.mark.slow),
  ],
)
def test_a_bucket_per_expert_equals_the_dense_mlp_experts_with_gradients(
  case,
):
  """MLP experts (each bucket size one batched matmul, ``padded_bank``):
  the dense loss and gradients, dispatched and falling back
  (``_buckets_to_try``), with the experts no example uses skipped."""
  x = jax.random.normal(jax.random.key(1), (32, 6))
  model, variables = _moe(
    experts.MLPExpert, {'hidden': (16,), 'features': 8}, x
  )
  want, want_grads, _, want_aux = _trained(model, variables, x)
  counts = np.asarray(dispatch.counts(want_aux['expert_weights']))
  assert np.sum(counts == 0) >= 4 and counts.max() < 32
  for bounds, fell_back in _buckets_to_try(counts)[case : case + 1]:
    got, grads, _, aux = _trained(model.clone(**bounds), variables, x)
    assert bool(aux['dispatch_dense']) == fell_back, bounds
    np.testing.assert_array_equal(aux['dispatch_counts'], counts)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(CLOSE, grads, want_grads)
  # The unused experts get no gradient, dense or dispatched.
  for e in np.flatnonzero(counts == 0):
    for leaf in jax.tree.leaves(want_grads['experts'][f'expert_{e}']):
      np.testing.assert_array_equal(leaf, 0)


@pytest.mark.slow  # 12 s: the CNN bank compiled twice with its gradients.
def test_a_bucket_per_expert_trains_cnn_experts_as_the_dense_ones():
  """CNN experts in the loop bank, BatchNorm over each expert's routed
  examples: the dense step's loss, gradients and running averages, each
  used expert on its own bucket, the unused ones skipped (their running
  averages kept, as the dense step keeps them)."""
  images = jax.random.uniform(jax.random.key(1), (16, 36, 36, 1))
  model, variables = _moe(
    experts.MultiMNISTExpert, {}, images, routed_statistics=True
  )
  want, want_grads, want_stats, want_aux = _trained(model, variables, images)
  counts = np.asarray(dispatch.counts(want_aux['expert_weights']))
  assert np.sum(counts == 0) >= 4 and counts.max() < 16
  for e in np.flatnonzero(counts == 0):
    jax.tree.map(
      np.testing.assert_array_equal,
      want_stats['experts'][f'expert_{e}'],
      variables['batch_stats']['experts'][f'expert_{e}'],
    )
  got, grads, stats, aux = _trained(
    model.clone(dispatch_buckets=tuple(int(c) for c in counts)),
    variables,
    images,
  )
  assert not aux['dispatch_dense']
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(CLOSE, (grads, stats), (want_grads, want_stats))


@pytest.mark.slow  # 15 s each: the fused evaluation compiled twice.
@pytest.mark.parametrize('block', ['xla', 'kernel'])
def test_a_bucket_per_expert_evaluates_fused_as_the_dense_bank(block, request):
  """Fused evaluation (one grouped computation per bucket size): the
  dense bank's outputs, with buckets of two sizes and unused experts."""
  eval_block = None
  if block == 'kernel':
    request.getfixturevalue('cpu_kernels_built')
    from dselect_jax.cpu import kernels  # pylint: disable=g-import-not-at-top

    eval_block = kernels.conv_relu_pool
  images = jax.random.uniform(jax.random.key(1), (32, 36, 36, 1))
  model, variables = _moe(experts.MultiMNISTExpert, {}, images)
  want, want_aux = jax.jit(functools.partial(model.apply, train=False))(
    variables, images
  )
  counts = np.asarray(dispatch.counts(want_aux['expert_weights']))
  buckets = tuple(dispatch.bucket_for(int(c), 32, minimum=1) for c in counts)
  assert len(set(buckets) - {0}) >= 2, buckets  # Two groups at least.
  fused = model.clone(
    dispatch_buckets=buckets,
    bank_kwargs=flax.core.FrozenDict(
      {'fused_eval': True, 'eval_block': eval_block}
    ),
  )
  got, aux = jax.jit(functools.partial(fused.apply, train=False))(
    variables, images
  )
  assert not aux['dispatch_dense']
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 25 s: the CNN train step compiled three times, pmapped.
def test_a_bucket_per_expert_on_four_devices_equals_the_dense_step():
  """steps.train_step on the 4 fake devices, buckets from the counts of
  the busiest device: dispatched, and with one device past a bucket (all
  fall back), the dense step's parameters and running averages."""
  images = jax.random.uniform(jax.random.key(1), (16, 36, 36, 1))
  model, variables = _moe(
    experts.MultiMNISTExpert,
    {},
    images,
    routed_statistics=True,
    bn_axis_name=steps.AXIS,
  )
  state, sharded, mask = helpers.cnn_train_state_on_four_devices(
    model, variables, images
  )
  counts = mask.sum(axis=1).max(axis=0)  # Each expert's, busiest device.
  assert counts.max() >= 2 and np.sum(counts == 0) >= 4
  short = counts.copy()
  short[np.argmax(counts)] -= 1
  (want, _), (got, metrics), (fell_back, fallback_metrics) = (
    helpers.dispatched_train_steps(
      model,
      state,
      sharded,
      ('classification',) * 2,
      (
        None,
        {'dispatch_buckets': tuple(int(c) for c in counts)},
        {'dispatch_buckets': tuple(int(c) for c in short)},
      ),
    )
  )
  np.testing.assert_array_equal(metrics['dispatch_dense'], [False] * 4)
  np.testing.assert_array_equal(fallback_metrics['dispatch_dense'], [True] * 4)
  for result in (got, fell_back):
    jax.tree.map(CLOSE, result, want)


@pytest.mark.parametrize(
  'buckets, match',
  [
    ((4, 4), 'a tuple of num_experts = 8 ints'),
    ((0,) * 8, 'not all 0'),
    ((4, 4, 4, 4, 4, 4, 4, -1), 'ints >= 0'),
    ([4] * 8, 'a tuple'),
  ],
)
def test_bad_buckets_are_named(buckets, match):
  with pytest.raises(ValueError, match=match):
    models.MultiTaskMoE(
      gate_kwargs=flax.core.FrozenDict({'k': 2, 'per_example': True}),
      dispatch_buckets=buckets,
    )


def test_a_bucket_per_expert_needs_the_loop_bank():
  with pytest.raises(ValueError, match=r'needs the loop bank \(ExpertBank\)'):
    models.MultiTaskMoE(
      gate_kwargs=flax.core.FrozenDict({'k': 2, 'per_example': True}),
      bank=experts.VmappedExpertBank,
      dispatch_buckets=(8,) * 8,
    )


def test_the_bank_names_buckets_it_cannot_run():
  bank = experts.ExpertBank(3, experts.MLPExpert, active=(0, 2))
  x = jnp.ones((4, 5))
  variables = bank.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r'each of them computed by the bank'):
    bank.apply(variables, {1: x}, train=False)
  with pytest.raises(ValueError, match='has none; pass mask=None'):
    bank.apply(variables, {0: x}, train=True, mask={0: jnp.ones(4, bool)})
  cnn = experts.ExpertBank(2, experts.MultiMNISTExpert)
  images = jnp.ones((2, 36, 36, 1))
  cnn_variables = cnn.init(jax.random.key(0), images, train=False)
  with pytest.raises(ValueError, match='one entry per row of theirs'):
    cnn.apply(
      cnn_variables,
      {0: images},
      train=True,
      mask={0: jnp.ones(3, bool)},
      mutable=['batch_stats'],
    )


def _report(counts):
  """A dispatched step's report on one device: its load from ``counts``
  (each expert's examples), no fallback."""
  counts = np.asarray(counts)
  return {
    'dispatch_load': np.array([[counts.max(), 2, 0]]),
    'dispatch_counts': counts[None],
    'dispatch_dense': np.zeros(1, bool),
  }


def _bucket_dispatcher(counts, made, ran, measure=0):
  """A Dispatcher over 8 MLP experts with a bucket each and a window of
  one batch, whose steps report ``counts`` (read at each call); the
  buckets of each program made and run are appended to ``made``, ``ran``."""
  model = models.MultiTaskMoE(
    num_experts=8,
    gate_kwargs=flax.core.FrozenDict({'k': 2, 'per_example': True}),
    expert=experts.MLPExpert,
  )

  def make_step(model):
    made.append(model.dispatch_buckets)

    def step():
      ran.append(model.dispatch_buckets)
      return {} if model.dispatch_buckets is None else _report(counts)

    return step

  dispatcher = steps.Dispatcher(
    model, make_step, 'buckets', window=1, axis_name=None, measure=measure,
    compile_ahead=False,
  )  # fmt: skip
  dispatcher.observe(_report(counts))  # A look, so no gates-only pass.
  dispatcher.read_reports()
  return dispatcher


def _run(dispatcher, times):
  """``times`` steps from ``dispatcher`` on 4 devices' 16 examples, each
  one's report observed."""
  batch = {'image': jnp.zeros((4, 16, 6))}
  for _ in range(times):
    dispatcher.observe(dispatcher(None, batch)())


def test_the_dispatcher_sizes_a_bucket_per_expert_from_the_counts():
  """Each expert's bucket from its examples in the recent batches (0 for
  none); the held buckets stay unless the new ones save more than a
  quarter of their rows."""
  counts = [16, 0, 16, 0, 16, 0, 0, 0]  # What the steps report.
  made, ran = [], []
  dispatcher = _bucket_dispatcher(counts, made, ran)
  run = functools.partial(_run, dispatcher)
  run(3)
  first = (16, 0, 16, 0, 16, 0, 0, 0)  # Of 8 x 16 dense rows, 48.
  assert made == [first] and dispatcher.bounds['dispatch_buckets'] == first
  # Expert 4 down to 7 examples (bucket 8): 40 rows, more than 3/4 of
  # the held buckets' 48, which stay.
  counts[4] = 7
  run(3)
  assert dispatcher.bounds['dispatch_buckets'] == first
  assert made == [first] and ran[-1] == first
  # Expert 2 too: 32 rows, a quarter saved: compiled and run.
  counts[2] = 7
  run(3)
  tighter = (16, 0, 8, 0, 8, 0, 0, 0)
  assert made == [first, tighter] and ran[-1] == tighter
  # A smaller (last) batch of 8 per device: buckets of at most 8.
  dispatcher(None, {'image': jnp.zeros((4, 8, 6))})
  assert dispatcher.bounds['dispatch_buckets'] == (8, 0, 8, 0, 8, 0, 0, 0)


def test_the_buckets_grow_to_hold_strays_that_move_between_experts():
  """Trained gates send a stray example now to one expert, now to another:
  the buckets grow to hold both (one program more), and a batch whose
  stray is back at the first runs that program, not the first one's."""
  counts = [16, 0, 16, 0, 0, 1, 0, 0]  # A stray at expert 5.
  made, ran = [], []
  dispatcher = _bucket_dispatcher(counts, made, ran)
  run = functools.partial(_run, dispatcher)
  run(3)
  at_5 = (16, 0, 16, 0, 0, 8, 0, 0)  # 40 rows of 128.
  assert made == [at_5] and ran[-1] == at_5
  counts[5], counts[6] = 0, 1  # The stray moves to expert 6: 40 rows
  run(3)  # alone, more than 3/4 of the 48 that hold both.
  both = (16, 0, 16, 0, 0, 8, 8, 0)
  assert made == [at_5, both] and ran[-1] == both
  counts[5], counts[6] = 1, 0  # Back at expert 5: nothing compiled.
  run(3)
  assert made == [at_5, both] and ran[-1] == both
  assert dispatcher.bounds['dispatch_buckets'] == both
  # The strays gone and experts 0 and 2 down to 7 examples: 16 rows, at
  # most 3/4 of 48: the buckets shrink.
  counts[:] = [7, 0, 7, 0, 0, 0, 0, 0]
  run(3)
  assert made[-1] == ran[-1] == (8, 0, 8, 0, 0, 0, 0, 0)


def test_a_program_compiled_but_not_yet_measured_stands_in():
  """While new bounds compile ahead, a compiled program that holds them
  stands in even before its timing against the dense step is done (it
  is timed as it runs); one measured slower does not, nor one that does
  not hold them."""
  made, ran = [], []
  dispatcher = _bucket_dispatcher([16, 0, 16, 0, 16, 0, 0, 0], made, ran, 2)
  key = lambda buckets: (
    ('dispatch_axis_name', None),
    ('dispatch_buckets', buckets),
    ('dispatch_fanout', 2),
  )
  loose = key((16, 0, 16, 0, 16, 0, 0, 0))
  dispatcher._step(loose)  # Compiled, not timed.
  assert dispatcher._stand_in(key((8, 0, 16, 0, 8, 0, 0, 0))) == loose
  assert dispatcher._stand_in(key((8, 8, 16, 0, 8, 0, 0, 0))) is None
  dispatcher.faster[loose] = False
  assert dispatcher._stand_in(key((8, 0, 16, 0, 8, 0, 0, 0))) is None
