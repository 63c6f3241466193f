"""BatchNorm over the routed examples (``blocks.RoutedBatchNorm``,
``MultiTaskMoE.routed_statistics``): its statistics by hand and against
nn.BatchNorm on the routed examples alone, across four devices, and the
CNN experts trained dispatched against the same model trained densely
(outputs, gradients and running averages, on one device and on four)."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dselect_jax import dispatch
from dselect_jax import experts
from dselect_jax import models
from dselect_jax import steps
from dselect_jax.blocks import RoutedBatchNorm
from tests import helpers

EPS = 1e-5
# Gradients and running averages of the CNN experts: float noise of about
# 1e-6 on the convolutions' biases, whose true gradient is 0 (BatchNorm
# subtracts their mean right after).
CLOSE = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)


def _by_hand(x, mask, scale, bias):
  """The normalized x and the new running averages, in NumPy: the
  biased mean and variance over the masked examples' pixels."""
  routed = x[mask].reshape(-1, x.shape[-1])
  mean, var = routed.mean(0), routed.var(0)
  y = (x - mean) / np.sqrt(var + EPS) * scale + bias
  return y, 0.1 * mean, 0.9 + 0.1 * var


def _variables(rng, features):
  return {
    'params': {
      'scale': jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32),
      'bias': jnp.asarray(rng.normal(size=features), jnp.float32),
    },
    'batch_stats': {
      'mean': jnp.zeros(features, jnp.float32),
      'var': jnp.ones(features, jnp.float32),
    },
  }


def test_the_statistics_are_the_routed_examples_by_hand():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(6, 2, 2, 3)).astype(np.float32)
  mask = np.array([True, False, True, True, False, False])
  variables = _variables(rng, 3)
  y, updates = RoutedBatchNorm(use_running_average=False).apply(
    variables, jnp.asarray(x), jnp.asarray(mask), mutable=['batch_stats']
  )
  want_y, want_mean, want_var = _by_hand(
    x,
    mask,
    np.asarray(variables['params']['scale']),
    np.asarray(variables['params']['bias']),
  )
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    updates['batch_stats']['mean'], want_mean, rtol=1e-5
  )
  np.testing.assert_allclose(updates['batch_stats']['var'], want_var, rtol=1e-5)


def test_it_is_batchnorm_on_the_routed_examples_alone_with_gradients():
  """Outputs, running averages and gradients of the routed examples are
  nn.BatchNorm's on those examples only; the others get no gradient."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 4, 4, 5)), jnp.float32)
  mask = np.array([1, 1, 0, 1, 0, 0, 1, 1], bool)
  variables = _variables(rng, 5)
  probe = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def routed(params, x):
    y, updates = RoutedBatchNorm(use_running_average=False).apply(
      {**variables, 'params': params},
      x,
      jnp.asarray(mask),
      mutable=['batch_stats'],
    )
    return jnp.sum(jnp.sin(y) * probe * mask[:, None, None, None]), updates

  def plain(params, x):
    y, updates = nn.BatchNorm(
      use_running_average=False, momentum=0.9, epsilon=EPS
    ).apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y) * probe[mask]), updates

  grad = jax.grad(routed, argnums=(0, 1), has_aux=True)
  (got_params, got_x), got = grad(variables['params'], x)
  grad = jax.grad(plain, argnums=(0, 1), has_aux=True)
  (want_params, want_x), want = grad(variables['params'], x[mask])
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
    (got, got_params),
    (want, want_params),
  )
  np.testing.assert_allclose(got_x[mask], want_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got_x[~mask], 0.0)


def test_with_every_example_routed_it_is_batchnorm():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(5, 3, 3, 2)), jnp.float32)
  variables = _variables(rng, 2)
  got = RoutedBatchNorm(use_running_average=False).apply(
    variables, x, jnp.ones(5, bool), mutable=['batch_stats']
  )
  want = nn.BatchNorm(
    use_running_average=False, momentum=0.9, epsilon=EPS
  ).apply(variables, x, mutable=['batch_stats'])
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
    got,
    want,
  )


def test_no_routed_example_keeps_the_running_averages_and_stays_finite():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(4, 2, 2, 3)), jnp.float32)
  variables = _variables(rng, 3)
  variables['batch_stats'] = {
    'mean': jnp.asarray([0.5, -1.0, 2.0]),
    'var': jnp.asarray([3.0, 0.25, 1.0]),
  }
  y, updates = RoutedBatchNorm(use_running_average=False).apply(
    variables, x, jnp.zeros(4, bool), mutable=['batch_stats']
  )
  assert np.all(np.isfinite(y))
  jax.tree.map(
    np.testing.assert_array_equal,
    updates['batch_stats'],
    variables['batch_stats'],
  )


def test_the_running_averages_normalize_in_evaluation_whatever_the_mask():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 2, 2, 2)).astype(np.float32)
  variables = _variables(rng, 2)
  variables['batch_stats'] = {
    'mean': jnp.asarray([1.0, -2.0]),
    'var': jnp.asarray([4.0, 0.5]),
  }
  y = RoutedBatchNorm(use_running_average=True).apply(
    variables, jnp.asarray(x), jnp.zeros(3, bool)
  )
  scale, bias = (np.asarray(variables['params'][k]) for k in ('scale', 'bias'))
  want = (x - [1.0, -2.0]) / np.sqrt(np.array([4.0, 0.5]) + EPS) * scale + bias
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_four_devices_pool_the_routed_examples_of_all():
  """Devices routing 1, 4, 0 and 2 of their 4 examples: the statistics of
  the 7 routed examples, on every device (nn.BatchNorm's pmean of
  per-device means would weigh the devices equally instead)."""
  rng = np.random.default_rng(5)
  x = rng.normal(1.0, 2.0, size=(4, 4, 2, 2, 3)).astype(np.float32)
  mask = np.zeros((4, 4), bool)
  mask[0, 2] = True
  mask[1] = True
  mask[3, [0, 3]] = True
  variables = _variables(rng, 3)
  apply = jax.pmap(
    lambda x, m: RoutedBatchNorm(
      use_running_average=False, axis_name='b'
    ).apply(variables, x, m, mutable=['batch_stats']),
    axis_name='b',
  )
  y, updates = apply(jnp.asarray(x), jnp.asarray(mask))
  want_y, want_mean, want_var = _by_hand(
    x.reshape(16, 2, 2, 3),
    mask.reshape(16),
    np.asarray(variables['params']['scale']),
    np.asarray(variables['params']['bias']),
  )
  np.testing.assert_allclose(
    np.asarray(y).reshape(want_y.shape), want_y, rtol=1e-5, atol=1e-5
  )
  for d in range(4):
    np.testing.assert_allclose(
      updates['batch_stats']['mean'][d], want_mean, rtol=1e-5
    )
    np.testing.assert_allclose(
      updates['batch_stats']['var'][d], want_var, rtol=1e-5
    )


def test_a_mask_of_the_wrong_shape_is_named():
  x = jnp.zeros((4, 2, 2, 3))
  with pytest.raises(ValueError, match=r'mask must have shape \(4,\)'):
    RoutedBatchNorm(use_running_average=False).init(
      jax.random.key(0), x, jnp.ones((4, 1), bool)
    )


def test_routed_statistics_needs_per_example_gates_and_batchnorm_experts():
  for kwargs in (
    {'gate_kwargs': flax.core.FrozenDict({'k': 1})},  # Static gates.
    {
      'gate_kwargs': flax.core.FrozenDict({'k': 1, 'per_example': True}),
      'expert': experts.MLPExpert,  # No batch statistics.
    },
    {
      'gate_kwargs': flax.core.FrozenDict({'k': 1, 'per_example': True}),
      'routing_input': 'experts',
    },
  ):
    with pytest.raises(ValueError, match='routed_statistics'):
      models.MultiTaskMoE(num_experts=4, routed_statistics=True, **kwargs)
  bank = experts.ExpertBank(2, experts.MLPExpert)
  with pytest.raises(ValueError, match='MLPExpert has none'):
    bank.init(
      jax.random.key(0), jnp.zeros((3, 4)), train=True, mask=jnp.ones((2, 3))
    )
  bank = experts.ExpertBank(2)
  with pytest.raises(ValueError, match=r'mask must have shape \(2, 3\)'):
    bank.init(
      jax.random.key(0),
      jnp.zeros((3, 36, 36, 1)),
      train=True,
      mask=jnp.ones((3, 2), bool),
    )


def test_the_sparse_dispatch_config_trains_cnn_experts_dispatched():
  """model.sparse_dispatch with per-example DSelect-k on image data: the
  model normalizes over the routed examples, and the train steps dispatch."""
  config = helpers.tiny_config(
    **{'model.sparse_dispatch': True, 'model.gate.per_example': True}
  )
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  assert model.routed_statistics
  assert models.dispatches(model, train=True)
  train_steps = steps.SparseTrainSteps(model, config, ('classification',) * 2)
  assert train_steps.dispatcher is not None
  config.model.sparse_dispatch = False
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  assert not model.routed_statistics
  assert not models.dispatches(model, train=True)


def _cnn_moe(scale, **kwargs):
  """A per-example MoE of 4 CNN experts (k = 1 per task, 2 tasks), its
  variables with the bit logits scaled by ``scale`` (large: saturated),
  and a batch of 16 images."""
  model = models.MultiTaskMoE(
    num_experts=4,
    gate_kwargs=flax.core.FrozenDict({'k': 1, 'per_example': True}),
    expert=experts.MultiMNISTExpert,
    routed_statistics=True,
    **kwargs,
  )
  images = jax.random.uniform(jax.random.key(1), (16, 36, 36, 1))
  variables = model.init(jax.random.key(0), images, train=False)
  params = flax.core.unfreeze(variables['params'])
  for g in ('gate_0', 'gate_1'):
    for leaf in ('kernel', 'bias'):
      params[g]['z_logits'][leaf] = params[g]['z_logits'][leaf] * scale
  return model, {**variables, 'params': params}, images


def _trained(model, variables, images):
  """The loss, its gradients and the new running averages of one
  training pass."""

  def loss(params):
    (logits, aux), updates = model.apply(
      {**variables, 'params': params},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    value = jnp.sum(jnp.sin(logits)) + aux['gate']['entropy'].sum()
    return value, (updates['batch_stats'], aux)

  (value, (stats, aux)), grads = jax.jit(
    jax.value_and_grad(loss, has_aux=True)
  )(variables['params'])
  return value, grads, stats, aux


@pytest.mark.slow  # 20 s each: three CNN banks compiled with their gradients.
@pytest.mark.parametrize('modules', ['xla', 'kernel'])
def test_dispatched_cnn_experts_train_as_the_dense_ones(modules, request):
  """Saturated gates: the dispatched step (each expert on its routed
  examples, BatchNorm over them) gives the dense step's loss, gradients
  and running averages, and so does a capacity too small (the dense
  fallback); each expert's running averages are nn.BatchNorm's over its
  routed examples alone. On XLA's ops and on the CPU kernels'
  convolutions and masked BatchNorm blocks."""
  kwargs = {}
  if modules == 'kernel':
    request.getfixturevalue('cpu_kernels_built')
    from dselect_jax import factory  # pylint: disable=g-import-not-at-top

    kwargs['expert_kwargs'] = flax.core.FrozenDict(
      factory.expert_modules('kernel', 'kernel')
    )
  model, variables, images = _cnn_moe(3000.0, **kwargs)
  want, want_grads, want_stats, want_aux = _trained(model, variables, images)
  mask = dispatch.routed(want_aux['expert_weights'])  # (B, E)
  busiest = int(jnp.max(jnp.sum(mask, axis=0)))
  assert busiest < 16 and int(jnp.min(jnp.sum(mask, axis=0))) >= 1
  for capacity, fell_back in ((busiest, False), (busiest - 1, True)):
    got, grads, stats, aux = _trained(
      model.clone(dispatch_capacity=capacity), variables, images
    )
    assert bool(aux['dispatch_dense']) == fell_back
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(
      CLOSE,
      (grads, stats),
      (want_grads, want_stats),
    )
  # Expert e alone, plain nn.BatchNorm, on the examples routed to it.
  for e in range(4):
    expert_variables = {
      name: variables[name]['experts'][f'expert_{e}']
      for name in ('params', 'batch_stats')
    }
    _, updates = experts.MultiMNISTExpert().apply(
      expert_variables,
      images[np.asarray(mask[:, e])],
      train=True,
      mutable=['batch_stats'],
    )
    jax.tree.map(
      CLOSE,
      want_stats['experts'][f'expert_{e}'],
      updates['batch_stats'],
    )


@pytest.mark.slow  # 12 s: two CNN banks compiled with their gradients.
def test_before_the_gates_saturate_routed_statistics_are_batchnorm():
  """Bit logits near 0: every example weighs every expert, so the routed
  statistics are the whole batch's, nn.BatchNorm's."""
  model, variables, images = _cnn_moe(1e-3)
  got, grads, stats, aux = _trained(model, variables, images)
  assert bool(jnp.all(dispatch.routed(aux['expert_weights'])))
  want, want_grads, want_stats, _ = _trained(
    model.clone(routed_statistics=False), variables, images
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(
    CLOSE,
    (grads, stats),
    (want_grads, want_stats),
  )


@pytest.mark.slow  # 30 s: the CNN train step compiled three times, pmapped.
def test_the_dispatched_cnn_step_on_four_devices_equals_the_dense_step():
  """steps.train_step on the 4 fake devices: dispatched, and with one
  device past its capacity (all fall back), the dense step's parameters
  and running averages; these, each expert's nn.BatchNorm statistics over
  each device's routed examples, averaged over the devices."""
  model, variables, images = _cnn_moe(3000.0, bn_axis_name=steps.AXIS)
  state, sharded, mask = helpers.cnn_train_state_on_four_devices(
    model, variables, images
  )
  busiest = int(mask.sum(axis=1).max())  # Over devices and experts.
  assert 2 <= busiest < 4  # Capacity 1 then falls back.
  # Dense; dispatched; one device past its capacity, so all fall back.
  (want, _), (got, metrics), (fell_back, fallback_metrics) = (
    helpers.dispatched_train_steps(
      model, state, sharded, ('classification',) * 2, (None, busiest, 1)
    )
  )
  np.testing.assert_array_equal(metrics['dispatch_dense'], [False] * 4)
  np.testing.assert_array_equal(fallback_metrics['dispatch_dense'], [True] * 4)
  for result in (got, fell_back):
    jax.tree.map(CLOSE, result, want)
  for e in range(4):
    expert_variables = {
      name: variables[name]['experts'][f'expert_{e}']
      for name in ('params', 'batch_stats')
    }
    per_device = []
    for d in range(4):
      routed = mask[d, :, e]
      if not routed.any():  # Nothing routed: the averages stay.
        per_device.append(expert_variables['batch_stats'])
        continue
      _, updates = experts.MultiMNISTExpert().apply(
        expert_variables,
        sharded['image'][d][routed],
        train=True,
        mutable=['batch_stats'],
      )
      per_device.append(updates['batch_stats'])
    expected = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *per_device)
    jax.tree.map(CLOSE, want[1]['experts'][f'expert_{e}'], expected)


def test_the_vmapped_bank_takes_the_mask_as_the_loop_does():
  """Each expert's rows of the mask, on shared inputs and on its own:
  the same outputs and running averages from the same (stacked)
  variables."""
  rng = np.random.default_rng(8)
  images = jnp.asarray(rng.normal(size=(2, 4, 16, 16, 1)), jnp.float32)
  mask = jnp.asarray([[1, 0, 1, 1], [0, 1, 1, 0]], bool)
  loop = experts.ExpertBank(2)
  variables = loop.init(jax.random.key(0), images[0], train=False)

  def stack(bank_variables):  # The bank's own variables, stacked.
    moe = {name: {'experts': tree} for name, tree in bank_variables.items()}
    stacked = experts.stack_expert_variables(moe, num_experts=2)
    return {name: tree['experts'] for name, tree in stacked.items()}

  stacked = stack(dict(variables))
  vmapped = experts.VmappedExpertBank(2)
  for x, own in ((images[0], False), (images, True)):
    want, want_stats = loop.apply(
      variables,
      x,
      train=True,
      per_expert_inputs=own,
      mask=mask,
      mutable=['batch_stats'],
    )
    got, got_stats = vmapped.apply(
      stacked,
      x,
      train=True,
      per_expert_inputs=own,
      mask=mask,
      mutable=['batch_stats'],
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree.map(CLOSE, got_stats, stack(want_stats))
