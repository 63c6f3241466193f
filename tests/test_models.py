"""The multi-task MoE: parameter trees, shapes, mixing and task isolation."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dselect_jax import blocks
from dselect_jax import cpu
from dselect_jax import experts
from dselect_jax import models
from tests import helpers

X = jax.random.uniform(jax.random.key(0), (3, 36, 36, 1))
RNGS = {'params': jax.random.key(1), 'gating': jax.random.key(2)}

GATE_CASES = [
  ('dselect_k', {'k': 2}),
  ('dselect_k', {'k': 2, 'per_example': True}),
  ('softmax', {}),
  ('softmax', {'per_example': True}),
  ('top_k', {'k': 2}),
  ('top_k', {'k': 2, 'per_example': True}),
]


def _model(**kwargs):
  kwargs.setdefault('gate_kwargs', {'k': 2})
  kwargs['gate_kwargs'] = flax.core.FrozenDict(kwargs['gate_kwargs'])
  return models.MultiTaskMoE(**kwargs)


def test_expert_and_tower_parameter_shapes():
  model = _model(num_experts=3)
  shapes = jax.tree.map(
    lambda s: s.shape, jax.eval_shape(lambda: model.init(RNGS, X, train=False))
  )
  # 36 -conv5-> 32 -pool-> 16 -conv5-> 12 -pool-> 6: 6*6*20 = 720 features.
  expert = shapes['params']['experts']['expert_2']
  assert expert == {
    'Conv_0': {'kernel': (5, 5, 1, 10), 'bias': (10,)},
    'Conv_1': {'kernel': (5, 5, 10, 20), 'bias': (20,)},
    'BatchNorm_0': {'scale': (10,), 'bias': (10,)},
    'BatchNorm_1': {'scale': (20,), 'bias': (20,)},
    'Dense_0': {'kernel': (720, 50), 'bias': (50,)},
    'Dense_1': {'kernel': (50, 50), 'bias': (50,)},
  }
  assert shapes['batch_stats']['experts']['expert_0']['BatchNorm_1'] == {
    'mean': (20,),
    'var': (20,),
  }
  assert shapes['params']['tower_1'] == {
    'Dense_0': {'kernel': (50, 50), 'bias': (50,)},
    'Dense_1': {'kernel': (50, 50), 'bias': (50,)},
    'Dense_2': {'kernel': (50, 10), 'bias': (10,)},
  }
  # 8 experts -> 3 bits; k = 2 selectors per task gate.
  assert shapes['params']['gate_1'] == {'z_logits': (2, 2), 'w_logits': (2,)}
  assert set(shapes['params']) == {
    'experts',
    'gate_0',
    'gate_1',
    'tower_0',
    'tower_1',
  }


@pytest.mark.parametrize('gate,gate_kwargs', GATE_CASES)
def test_output_shapes_for_each_gate(gate, gate_kwargs):
  model = _model(gate=gate, gate_kwargs=gate_kwargs, num_experts=4)
  variables = model.init(RNGS, X, train=False)
  (logits, aux), updates = model.apply(
    variables, X, train=True, mutable=['batch_stats'], rngs=RNGS
  )
  assert logits.shape == (2, 3, 10)
  per_example = gate_kwargs.get('per_example', False)
  assert aux['expert_weights'].shape == ((2, 3, 4) if per_example else (2, 4))
  np.testing.assert_allclose(aux['expert_weights'].sum(-1), 1.0, rtol=1e-5)
  for value in aux['gate'].values():
    assert value.shape[0] == 2  # One entry per task gate.
  assert 'batch_stats' in updates


def test_perturbing_one_task_gate_leaves_other_task_unchanged():
  model = _model(num_experts=4)
  variables = model.init(RNGS, X, train=False)
  logits, _ = model.apply(variables, X, train=False)
  params = flax.core.unfreeze(variables['params'])
  params['gate_1']['z_logits'] = params['gate_1']['z_logits'] + 0.3
  params['gate_1']['w_logits'] = params['gate_1']['w_logits'] - 1.0
  perturbed, _ = model.apply({**variables, 'params': params}, X, train=False)
  np.testing.assert_array_equal(perturbed[0], logits[0])
  assert np.max(np.abs(perturbed[1] - logits[1])) > 1e-4


def test_shared_gate_is_one_gate_for_all_tasks():
  model = _model(num_experts=4, num_tasks=3, shared_gate=True)
  variables = model.init(RNGS, X, train=False)
  assert {'gate_0'} == {n for n in variables['params'] if n.startswith('gate')}
  _, aux = model.apply(variables, X, train=False)
  weights = np.asarray(aux['expert_weights'])
  assert weights.shape == (3, 4)
  np.testing.assert_array_equal(weights[0], weights[2])


def test_saturated_gate_routes_to_the_chosen_expert():
  # Task 0's selectors both pick expert 2 (bits 10), task 1's pick expert 1 (01).
  # Then each task's logits are its tower applied to that one expert's output.
  model = _model(num_experts=4)
  variables = flax.core.unfreeze(model.init(RNGS, X, train=False))
  p = variables['params']
  p['gate_0']['z_logits'] = jnp.array([[1.0, -1.0], [1.0, -1.0]])
  p['gate_1']['z_logits'] = jnp.array([[-1.0, 1.0], [-1.0, 1.0]])
  logits, aux = model.apply(variables, X, train=False)
  np.testing.assert_allclose(
    aux['expert_weights'], [[0, 0, 1, 0], [0, 1, 0, 0]], atol=1e-6
  )
  expert = experts.MultiMNISTExpert()
  tower = models.MLPTower()
  for task, chosen in ((0, 2), (1, 1)):
    features = expert.apply(
      {
        'params': p['experts'][f'expert_{chosen}'],
        'batch_stats': variables['batch_stats']['experts'][f'expert_{chosen}'],
      },
      X,
      train=False,
    )
    want = tower.apply({'params': p[f'tower_{task}']}, features, train=False)
    np.testing.assert_allclose(logits[task], want, rtol=1e-5, atol=1e-6)


def test_batchnorm_train_and_eval_modes():
  model = _model(num_experts=2)
  variables = model.init(RNGS, X, train=False)
  (train_logits, _), updates = model.apply(
    variables, X, train=True, mutable=['batch_stats']
  )
  eval_logits, _ = model.apply(variables, X, train=False)
  assert np.max(np.abs(train_logits - eval_logits)) > 1e-4
  # One update with momentum 0.9 from mean 0: 0.1 * batch mean of conv output.
  old = variables['batch_stats']['experts']['expert_0']['BatchNorm_0']['mean']
  new = updates['batch_stats']['experts']['expert_0']['BatchNorm_0']['mean']
  np.testing.assert_array_equal(old, 0.0)
  conv = jax.lax.conv_general_dilated(
    X,
    variables['params']['experts']['expert_0']['Conv_0']['kernel'],
    (1, 1),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  conv = conv + variables['params']['experts']['expert_0']['Conv_0']['bias']
  np.testing.assert_allclose(
    new, 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
  )


def test_per_example_routing_on_expert_outputs():
  model = _model(
    num_experts=4,
    gate_kwargs={'k': 2, 'per_example': True},
    routing_input='experts',
  )
  shapes = jax.eval_shape(lambda: model.init(RNGS, X, train=False))['params']
  # Routes on the 50-wide mean expert output instead of the 1296 pixels.
  assert shapes['gate_0']['z_logits']['kernel'].shape == (50, 4)
  model = _model(num_experts=4, gate_kwargs={'k': 2, 'per_example': True})
  shapes = jax.eval_shape(lambda: model.init(RNGS, X, train=False))['params']
  assert shapes['gate_0']['z_logits']['kernel'].shape == (36 * 36, 4)


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(gate='moe'), "unknown gate 'moe'"),
    (dict(gate_kwargs={'k': 9}), 'k=9'),
    (dict(gate_kwargs={'k': 2, 'gamma': 0.0}), 'gamma=0.0'),
    (dict(num_tasks=0), 'num_tasks=0'),
    (
      dict(num_tasks=2.5),
      r'num_tasks must be an integer >= 1, got num_tasks=2\.5',
    ),
    (
      dict(num_experts='8'),
      "num_experts must be an integer >= 2, got num_experts='8'",
    ),
    (dict(num_classes=0), 'num_classes must be an integer >= 1'),
    (
      dict(shared_gate=1),
      'shared_gate must be True or False, got shared_gate=1',
    ),
    (dict(routing_input='pixels'), 'routing_input'),
  ],
)
def test_bad_model_attributes_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _model(**kwargs)


@pytest.mark.parametrize(
  'make,match',
  [
    (lambda: models.MLPTower(num_classes=True), 'MLPTower: num_classes'),
    (lambda: models.MLPTower(hidden=(50, 0)), r'MLPTower: hidden must be'),
    (lambda: experts.MLPExpert(hidden=64), 'MLPExpert: hidden must be a tuple'),
    (lambda: experts.MLPExpert(features=0.5), 'MLPExpert: features'),
    (lambda: experts.MultiMNISTExpert(features=-1), 'features=-1'),
    (lambda: experts.ExpertBank(num_experts=0), 'ExpertBank: num_experts'),
    (
      lambda: models.RecommenderMoE(num_tasks=2, cardinalities=(), embed_dim=0),
      'RecommenderMoE: embed_dim',
    ),
    (
      lambda: models.RecommenderMoE(num_tasks='2', cardinalities=()),
      'RecommenderMoE: num_tasks',
    ),
  ],
)
def test_bad_module_attributes_name_the_attribute(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize('tile', [1, 2, 3, 8])
def test_toeplitz_conv_by_hand(tile):
  # x = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], kernel [[1, 2], [3, 4]]:
  # y[i, j] = x[i, j] + 2 x[i, j+1] + 3 x[i+1, j] + 4 x[i+1, j+1] + bias, so
  # y[0, 0] = 0 + 2 + 12 + 20 = 34, +10 per column (1+2+3+4) and +40 per row.
  x = jnp.arange(12.0).reshape(1, 3, 4, 1)
  params = {
    'kernel': jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1),
    'bias': jnp.array([0.5]),
  }
  conv = cpu.ToeplitzConv(1, (2, 2), tile=tile)
  y = conv.apply({'params': params}, x)
  np.testing.assert_array_equal(
    y[0, ..., 0], [[34.5, 44.5, 54.5], [74.5, 84.5, 94.5]]
  )


@pytest.mark.parametrize(
  'shape,features,kernel_size,tile,rows',
  [
    ((2, 36, 36, 1), 10, (5, 5), 4, 'xla'),  # the experts' first convolution
    ((2, 16, 16, 10), 20, (5, 5), 4, 'xla'),  # and their second
    ((2, 16, 16, 10), 20, (5, 5), 5, 'xla'),  # tile 5 does not divide 12: 4
    ((3, 9, 11, 3), 4, (3, 5), 100, 'xla'),  # non-square kernel, one segment
    # rows 'direct': cpu.DirectConv, the kernels' direct convolution.
    ((2, 36, 36, 1), 10, (5, 5), None, 'direct'),
    ((2, 16, 16, 10), 20, (5, 5), None, 'direct'),
    ((2, 9, 40, 3), 7, (3, 5), None, 'direct'),  # 3 blocks of 16, odd rows
    ((9, 7, 20, 2), 8, (2, 4), None, 'direct'),  # > 8 images per chunk
  ],
)
def test_cpu_convs_equal_xla_conv(
  shape, features, kernel_size, tile, rows, request
):
  if rows != 'xla':
    request.getfixturevalue('cpu_kernels_built')
  x = jax.random.normal(jax.random.key(0), shape)
  xla = nn.Conv(features, kernel_size, padding='VALID')
  if rows == 'direct':
    conv = cpu.DirectConv(features, kernel_size)
  else:
    conv = cpu.ToeplitzConv(features, kernel_size, tile=tile)
  variables = xla.init(jax.random.key(1), x)
  # Same parameter tree, initialized alike from the same key.
  jax.tree.map(
    np.testing.assert_array_equal,
    variables,
    conv.init(jax.random.key(1), x),
  )
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-zero bias
  np.testing.assert_allclose(
    conv.apply(variables, x), xla.apply(variables, x), rtol=1e-5, atol=1e-5
  )
  # Gradients w.r.t. the input and the parameters, through a non-linear loss.
  grad = lambda conv: jax.grad(
    lambda v, x: jnp.sum(jnp.sin(conv.apply(v, x))), argnums=(0, 1)
  )(variables, x)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4),
    grad(conv),
    grad(xla),
  )


def test_expert_convolutions_are_interchangeable():
  xla = experts.MultiMNISTExpert()
  toeplitz = experts.MultiMNISTExpert(conv_module=cpu.ToeplitzConv)
  variables = xla.init(jax.random.key(3), X, train=False)
  jax.tree.map(
    np.testing.assert_array_equal,
    variables,
    toeplitz.init(jax.random.key(3), X, train=False),
  )
  for train in (False, True):
    want, _ = xla.apply(variables, X, train=train, mutable=['batch_stats'])
    got, _ = toeplitz.apply(variables, X, train=train, mutable=['batch_stats'])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bad_convolution_attributes_raise():
  with pytest.raises(ValueError, match='tile=0'):
    cpu.ToeplitzConv(4, tile=0)
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match='smaller than the kernel 5x5'):
    cpu.ToeplitzConv(4).init(jax.random.key(0), x)


def test_max_pool_2x2_by_hand():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  # Windows [[0,1],[4,5]] -> 5, [[2,3],[6,7]] -> 7, ... (row-major 4x4).
  np.testing.assert_array_equal(
    blocks.max_pool_2x2(x)[0, ..., 0], [[5, 7], [13, 15]]
  )
  y = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  np.testing.assert_array_equal(
    blocks.max_pool_2x2(y), nn.max_pool(y, (2, 2), strides=(2, 2))
  )


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
def test_auto_picks_xlas_ops_off_the_cpu(monkeypatch, backend):
  """'auto' resolves to the CPU paths only on the CPU: on a GPU or TPU
  (the platform check forced) the experts get nn.Conv and nn.BatchNorm."""
  from configs import multimnist  # pylint: disable=g-import-not-at-top
  from dselect_jax import factory  # pylint: disable=g-import-not-at-top

  config = multimnist.get_config()
  assert (config.model.conv, config.model.norm) == ('auto', 'auto')
  monkeypatch.setattr(factory.jax, 'default_backend', lambda: backend)
  assert factory.conv_impl(config) == 'xla'
  assert factory.norm_impl(config) == 'xla'
  kwargs = helpers.create_model(config).expert_kwargs
  assert kwargs['conv_module'] is None and kwargs['block_module'] is None
  monkeypatch.setattr(factory.jax, 'default_backend', lambda: 'cpu')
  monkeypatch.setattr(factory.cpu_kernels, 'available', lambda: True)
  # On the CPU: the direct kernels where they measured faster than the
  # Toeplitz form, else the Toeplitz form; it without the kernels.
  monkeypatch.setattr(factory.calibrate, 'direct_conv_is_faster', lambda: True)
  assert factory.conv_impl(config) == 'kernel'
  assert helpers.create_model(config).expert_kwargs['conv_module'] is (
    cpu.DirectConv
  )
  monkeypatch.setattr(
    factory.calibrate, 'times', lambda: {'direct_s': 2.0, 'toeplitz_s': 1.0}
  )
  monkeypatch.setattr(factory.calibrate, 'direct_conv_is_faster', lambda: False)
  assert factory.conv_impl(config) == 'toeplitz'
  monkeypatch.setattr(factory.cpu_kernels, 'available', lambda: False)
  assert factory.conv_impl(config) == 'toeplitz'


@pytest.mark.slow  # 16 s: two banks compiled, forward and backward.
def test_the_vmapped_expert_bank_computes_the_loops_function():
  """Same variables (stacked) -> same logits, BatchNorm statistics and
  gradients as the loop of modules in training; the same logits in
  evaluation (below, with some experts left out)."""
  train = True
  kwargs = dict(
    num_tasks=2, num_experts=3, gate='dselect_k', gate_kwargs={'k': 2}
  )
  loop = models.MultiTaskMoE(**kwargs)
  vmapped = models.MultiTaskMoE(**kwargs, bank=experts.VmappedExpertBank)
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))
  variables = loop.init(jax.random.key(0), x, train=False)
  stacked = experts.stack_expert_variables(variables, 3)
  shapes = lambda t: jax.tree.map(jnp.shape, t)
  assert shapes(stacked) == shapes(
    vmapped.init(jax.random.key(0), x, train=False)
  )
  assert stacked['params']['experts']['expert']['expert']['Conv_0'][
    'kernel'
  ].shape == (3, 5, 5, 1, 10)

  def run(model, variables):
    def loss(params):
      (logits, _), updates = model.apply(
        {**variables, 'params': params}, x, train=train, mutable=['batch_stats']
      )
      return jnp.sum(logits**2), (logits, updates)

    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  grads, (logits, updates) = run(loop, variables)
  v_grads, (v_logits, v_updates) = run(vmapped, stacked)
  stacked_grads = experts.stack_expert_variables({'params': grads}, 3)
  assert len(jax.tree.leaves(v_grads)) == len(jax.tree.leaves(stacked_grads))
  np.testing.assert_allclose(v_logits, logits, rtol=1e-5, atol=1e-6)
  flat = lambda t: jax.tree_util.tree_leaves_with_path(t)
  for (path, a), (_, b) in zip(flat(stacked_grads), flat({'params': v_grads})):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=str(path))
  for (path, a), (_, b) in zip(
    flat(experts.stack_expert_variables(updates, 3)), flat(v_updates)
  ):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=str(path))
  # Only experts 0 and 2 kept: the same as the loop computing only those.
  sparse = vmapped.clone(active_experts=(0, 2)).apply(stacked, x, train=False)
  dense = loop.clone(active_experts=(0, 2)).apply(variables, x, train=False)
  np.testing.assert_allclose(sparse[0], dense[0], rtol=1e-5, atol=1e-6)


def _random_variables(model, x):
  """A model's variables with every BatchNorm moved off its identity
  (scale, bias, running mean and variance), so folding them matters."""
  variables = model.init(
    {'params': jax.random.key(0), 'gating': jax.random.key(1)}, x, train=False
  )
  keys = iter(jax.random.split(jax.random.key(2), 1000))

  def perturb(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'BatchNorm' not in name:
      return leaf
    noise = jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=1.5)
    return noise if name.endswith("['var']") else leaf + noise - 1

  return jax.tree_util.tree_map_with_path(perturb, variables)


@pytest.mark.parametrize(
  'gate_kwargs,active',
  [({'k': 2}, None), ({'k': 2}, (1, 2)), ({'k': 2, 'per_example': True}, None)],
)
def test_fused_evaluation_computes_the_loops_function(gate_kwargs, active):
  x = jax.random.uniform(jax.random.key(3), (6, 36, 36, 1))
  loop = models.MultiTaskMoE(
    num_tasks=2, num_experts=3, gate_kwargs=gate_kwargs, active_experts=active
  )
  fused = loop.clone(bank_kwargs=flax.core.FrozenDict(fused_eval=True))
  variables = _random_variables(loop, x)
  expected, expected_aux = loop.apply(variables, x, train=False)
  logits, aux = fused.apply(variables, x, train=False)
  # The same function: only the order of the float operations differs.
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    aux['expert_weights'], expected_aux['expert_weights'], rtol=1e-6
  )
  # And it is the fused computation: one convolution with the first layers of
  # all computed experts (10 channels each).
  convs = [
    eqn.invars[1].aval.shape
    for eqn in jax.make_jaxpr(functools.partial(fused.apply, train=False))(
      variables, x
    ).jaxpr.eqns
    if eqn.primitive.name == 'conv_general_dilated'
  ]
  assert convs[0] == (5, 5, 1, 10 * (3 if active is None else len(active)))

  # Training is the loop's, fused_eval or not.
  def train(model):
    return model.apply(
      variables,
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'gating': jax.random.key(4)},
    )[0][0]

  np.testing.assert_array_equal(train(fused), train(loop))


def test_fused_evaluation_needs_the_multimnist_expert():
  with pytest.raises(
    ValueError, match='fused_eval needs an expert with evaluate_bank'
  ):
    experts.ExpertBank(2, experts.MLPExpert, fused_eval=True)
  with pytest.raises(ValueError, match='fused_eval is for the loop'):
    experts.VmappedExpertBank(2, fused_eval=True)
