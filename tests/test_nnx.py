"""The NNX modules against the linen ones: given the same variables, the same
weights, aux terms, outputs and gradients; variables converted both ways;
a train.py run's checkpoint loaded into the NNX model."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dselect_jax import evaluate
from dselect_jax import gates
from dselect_jax import models
from dselect_jax import nnx as dnnx
from dselect_jax import trainer
from tests import helpers


def _close(a, b, rtol=1e-6, atol=1e-7):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b
  )


def _same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.shape(x) == np.shape(y)


# One case of each gate by default, the others among the slow tests.
GATE_CASES = [
  ('dselect_k', {'k': 2}, 5),
  ('softmax', {}, 3),
  ('top_k', {'k': 2}, 6),
  pytest.param('dselect_k', {'k': 1, 'gamma': 0.5}, 4, marks=pytest.mark.slow),
  pytest.param('dselect_k', {'k': 3}, 8, marks=pytest.mark.slow),
  pytest.param('top_k', {'k': 2, 'noisy': False}, 5, marks=pytest.mark.slow),
]


@pytest.mark.parametrize('per_example', [False, True])
@pytest.mark.parametrize('name,kwargs,num_experts', GATE_CASES)
def test_the_nnx_gates_compute_the_linen_gates_function(
  name, kwargs, num_experts, per_example
):
  """The NNX gate's own (random) variables, given to the linen gate: the
  same weights, aux terms and gradients of a loss of both."""
  d = 7
  x = jax.random.normal(jax.random.key(1), (4, d)) if per_example else None
  extra = {'in_features': d} if per_example else {}
  gate = dnnx.GATES[name](
    num_experts,
    **kwargs,
    per_example=per_example,
    **extra,
    rngs=nnx.Rngs(0),
  )
  if name == 'top_k':
    gate.eval()  # Deterministic: the noise is the only random part.
  linen_gate = gates.make_gate(
    name, num_experts, **kwargs, per_example=per_example
  )
  variables = dnnx.linen_variables(gate)
  _same_tree(variables, linen_gate.init(jax.random.key(2), x))
  # Logits far from 0 make the gates' outputs differ from one another.
  variables = jax.tree.map(
    lambda v: 3 * jax.random.normal(jax.random.key(v.size), v.shape),
    variables,
  )
  dnnx.load_linen_variables(gate, variables)
  want_weights, want_aux = jax.jit(linen_gate.apply)(variables, x)
  got_weights, got_aux = nnx.jit(lambda g, x: g(x))(gate, x)
  _close(got_weights, want_weights)
  _close(got_aux, want_aux)
  assert got_weights.shape == ((4,) if per_example else ()) + (num_experts,)

  def objective(weights, aux):
    target = jnp.linspace(0, 1, num_experts)
    scalars = sum(v for v in aux.values() if jnp.ndim(v) == 0)
    return jnp.sum(weights * target) + 0.1 * scalars

  want = jax.jit(jax.grad(lambda v: objective(*linen_gate.apply(v, x))))(
    variables
  )
  got = nnx.jit(nnx.grad(lambda g: objective(*g(x))))(gate)
  _close(nnx.to_pure_dict(got), want['params'], rtol=1e-5, atol=1e-6)


def test_the_noisy_top_k_gate_draws_from_the_gating_stream():
  """In training the NNX top-k gate adds noise from its ``gating`` stream:
  the weights move from the deterministic ones and differ between calls;
  with the same noise, the shared formula gives the linen gate's output."""
  gate = dnnx.TopKGate(4, 2, rngs=nnx.Rngs(params=0, gating=1))
  variables = {
    'params': {
      'logits': jnp.array([0.0, 0.5, 1.0, 1.5]),
      'noise_logits': jnp.array([2.0, 2.0, 2.0, 2.0]),
    }
  }
  dnnx.load_linen_variables(gate, variables)
  gate.eval()
  quiet, _ = gate()
  np.testing.assert_allclose(
    quiet, [0, 0, 1 / (1 + np.exp(0.5)), 1 / (1 + np.exp(-0.5))], rtol=1e-6
  )
  gate.train()
  first, _ = gate()
  second, _ = gate()
  assert not np.allclose(first, second)
  assert np.count_nonzero(first) == 2 and np.isclose(np.sum(first), 1)


@pytest.mark.parametrize(
  'bad,message',
  [
    (lambda r: dnnx.DSelectKGate(1, 1, rngs=r), 'num_experts must be'),
    (lambda r: dnnx.DSelectKGate(4, 5, rngs=r), 'k must be an integer'),
    (lambda r: dnnx.DSelectKGate(4, 2, gamma=0, rngs=r), 'gamma must be'),
    (
      lambda r: dnnx.DSelectKGate(4, 2, per_example=True, rngs=r),
      'needs in_features',
    ),
    (lambda r: dnnx.SoftmaxGate(4, per_example='yes', rngs=r), 'True or False'),
    (lambda r: dnnx.MLPTower(5, 0, rngs=r), 'num_classes must be'),
    (
      lambda r: dnnx.MultiMNISTExpert(image_size=(30, 30), rngs=r),
      'image_size=',
    ),
    (
      lambda r: dnnx.MultiTaskMoE([dnnx.MLPTower(2, rngs=r)], [], rngs=r),
      'at least 2',
    ),
  ],
)
def test_bad_arguments_are_one_line_errors(bad, message):
  with pytest.raises((ValueError, TypeError), match=message) as e:
    bad(nnx.Rngs(0))
  assert '\n' not in str(e.value)


def _linen_moe(config, **overrides):
  """The linen model of helpers.tiny_config with its XLA layers, as the
  factory builds it (plain nn.Conv and BatchNorm)."""
  config = helpers.set_fields(
    config, {'model.conv': 'xla', 'model.norm': 'xla', **overrides}
  )
  return config, helpers.create_model(config)


@pytest.mark.parametrize(
  'fields',
  [
    {},
    pytest.param(
      {'model.shared_gate': True, 'model.num_experts': 3, 'model.gate.k': 2},
      marks=pytest.mark.slow,
    ),
    pytest.param(
      {'model.gate.per_example': True, 'model.num_experts': 4},
      marks=pytest.mark.slow,
    ),
  ],
)
def test_the_nnx_moe_computes_the_linen_moe_function(fields):
  """The MultiMNIST model in training mode (BatchNorm on the batch, its
  statistics updated) and in evaluation, and the gradients of the loss."""
  config, linen_model = _linen_moe(helpers.tiny_config(), **fields)
  images = helpers.sample('train').batch(np.arange(16))['image']
  gate_kwargs = {
    'k': config.model.gate.k,
    'gamma': config.model.gate.gamma,
    'per_example': config.model.gate.per_example,
  }
  model = dnnx.multimnist_moe(
    config.model.num_experts,
    gate_kwargs=gate_kwargs,
    shared_gate=config.model.shared_gate,
    rngs=nnx.Rngs(0),
  )
  linen_variables = linen_model.init(
    {'params': jax.random.key(3), 'gating': jax.random.key(4)},
    images,
    train=False,
  )
  _same_tree(dnnx.linen_variables(model), dict(linen_variables))
  dnnx.load_linen_variables(model, linen_variables)

  model.eval()
  want, want_aux = jax.jit(functools.partial(linen_model.apply, train=False))(
    linen_variables, images
  )
  got, got_aux = nnx.jit(lambda m, x: m(x))(model, images)
  _close(got, want, rtol=1e-5, atol=1e-5)
  _close(got_aux, want_aux, rtol=1e-5, atol=1e-6)

  model.train()
  labels = jnp.arange(16) % 10

  def loss(outputs):
    return -jnp.mean(jax.nn.log_softmax(outputs)[:, jnp.arange(16), labels])

  def linen_loss(params):
    (outputs, _), updates = linen_model.apply(
      {**linen_variables, 'params': params},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    return loss(outputs), updates['batch_stats']

  (want_loss, want_stats), want_grads = jax.jit(
    jax.value_and_grad(linen_loss, has_aux=True)
  )(linen_variables['params'])
  got_loss, got_grads = nnx.jit(
    nnx.value_and_grad(lambda m: loss(m(images)[0]))
  )(model)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  _close(nnx.to_pure_dict(got_grads), want_grads, rtol=2e-4, atol=1e-6)
  # BatchNorm's running averages moved as the linen model's did.
  _close(
    dnnx.linen_variables(model)['batch_stats'], want_stats, rtol=1e-5, atol=1e-6
  )


@pytest.mark.slow  # For the 5-minute default run.
def test_a_train_py_checkpoint_loads_into_the_nnx_model(tmp_path):
  """A tiny run's best checkpoint, restored as eval.py restores it, loads
  into the NNX model, which then gives the restored linen model's logits;
  and the NNX model's variables go back into the linen model unchanged."""
  config = helpers.set_fields(
    helpers.tiny_config(), {'model.conv': 'xla', 'model.norm': 'xla'}
  )
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(config, workdir)
  config, linen_model, dataset, state, _, _ = evaluate.restore_workdir(workdir)
  model = dnnx.multimnist_moe(
    config.model.num_experts,
    gate_kwargs={'k': config.model.gate.k},
    rngs=nnx.Rngs(0),
  )
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  dnnx.load_linen_variables(model, variables)
  model.eval()
  images = dataset.test.batch(np.arange(64))['image']
  want, _ = jax.jit(functools.partial(linen_model.apply, train=False))(
    variables, images
  )
  got, aux = nnx.jit(lambda m, x: m(x))(model, images)
  _close(got, want, rtol=1e-5, atol=1e-5)
  # The trained static gates: each task's weights, the linen model's.
  np.testing.assert_allclose(
    aux['expert_weights'],
    models.static_expert_weights(linen_model, state.params),
    rtol=1e-6,
  )
  back = dnnx.linen_variables(model)
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))


def test_load_linen_variables_names_what_does_not_fit():
  gate = dnnx.DSelectKGate(4, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no 'params'"):
    dnnx.load_linen_variables(gate, {})
  with pytest.raises(ValueError, match='params/w_logits is missing'):
    dnnx.load_linen_variables(gate, {'params': {'z_logits': np.zeros((2, 2))}})
  with pytest.raises(ValueError, match=r'params/z_logits has shape \(3, 2\)'):
    dnnx.load_linen_variables(
      gate, {'params': {'z_logits': np.zeros((3, 2)), 'w_logits': np.zeros(2)}}
    )


def test_the_nnx_gate_runs_eagerly_and_jitted():
  gate = dnnx.DSelectKGate(num_experts=8, k=2, rngs=nnx.Rngs(0))
  weights, aux = gate()
  jitted, _ = nnx.jit(lambda g: g())(gate)
  np.testing.assert_allclose(weights, jitted, rtol=1e-6)
  assert weights.shape == (8,) and np.isclose(np.sum(weights), 1, atol=1e-5)
  assert set(aux) == {'selector_outputs', 'entropy', 'reachability'}
