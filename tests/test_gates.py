"""Gates against an independent float64 NumPy transcription of the paper.

The reference below re-derives DSelect-k from Sections 3-4 of arXiv 2106.03760
and the original TF layer's conventions (codes MSB first, per-example Dense
output column c = selector c // M, bit c % M). It calls nothing from
dselect_jax: codes come from string formatting, logs and products from NumPy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dselect_jax import gates

# ----------------------------------------------------------------------------
# Independent reference.
# ----------------------------------------------------------------------------


def ref_bits(num_experts):
  return math.ceil(math.log2(num_experts))


def ref_codes(num_experts):
  m = ref_bits(num_experts)
  return np.array(
    [[ch == '1' for ch in format(i, f'0{m}b')] for i in range(num_experts)]
  )


def ref_smooth_step(t, gamma):
  t = np.asarray(t, np.float64)
  out = -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5
  out = np.where(t <= -gamma / 2, 0.0, out)
  return np.where(t >= gamma / 2, 1.0, out)


def ref_selectors(z, num_experts, gamma):
  """z: (K, M) -> r: (K, E), r[k, i] = prod_j (S or 1 - S by bit j of i)."""
  codes = ref_codes(num_experts)
  s = ref_smooth_step(z, gamma)
  r = np.ones((z.shape[0], num_experts))
  for k in range(z.shape[0]):
    for i in range(num_experts):
      for j in range(z.shape[1]):
        r[k, i] *= s[k, j] if codes[i, j] else 1 - s[k, j]
  return r


def ref_static(z, w, num_experts, gamma):
  r = ref_selectors(np.asarray(z, np.float64), num_experts, gamma)
  alpha = np.exp(w - np.max(w))
  alpha /= alpha.sum()
  weights = (alpha[:, None] * r).sum(0)
  ent = -np.sum(r * np.log(r + 1e-6))
  power_of_2 = num_experts == 2 ** ref_bits(num_experts)
  with np.errstate(divide='ignore'):  # All mass on unreachable codes: inf.
    reach = 0.0 if power_of_2 else np.sum(1 / r.sum(1))
  return weights, r, ent, reach


def ref_per_example(x, zk, zb, wk, wb, k, num_experts, gamma):
  m = ref_bits(num_experts)
  zflat = np.asarray(x, np.float64) @ zk + zb  # (B, K*M)
  wl = np.asarray(x, np.float64) @ wk + wb  # (B, K)
  outs = []
  for b in range(x.shape[0]):
    z = np.array([[zflat[b, s * m + j] for j in range(m)] for s in range(k)])
    outs.append(ref_static(z, wl[b], num_experts, gamma))
  weights = np.stack([o[0] for o in outs])
  r = np.stack([o[1] for o in outs])
  return (
    weights,
    r,
    np.mean([o[2] for o in outs]),
    np.mean([o[3] for o in outs]),
  )


CASES = [
  (e, k, gamma)
  for e in (2, 3, 4, 5, 7, 8, 9, 16)
  for k in sorted({1, 2, e})
  if k <= e
  for gamma in (0.5, 1.0, 3.0)
]


def _eager_and_jit(fn, case, cases):
  """``fn`` jitted, and run op by op too for the first of the ``cases``
  (eager mode computes the same function; once is enough to show it)."""
  return (fn, jax.jit(fn)) if case == cases[0] else (jax.jit(fn),)


def _random_static(rng, num_experts, k, gamma):
  m = ref_bits(num_experts)
  # Mostly in the cubic region, some saturated on either side.
  z = rng.uniform(-0.8 * gamma, 0.8 * gamma, (k, m)).astype(np.float32)
  w = rng.normal(size=(k,)).astype(np.float32)
  return z, w


# ----------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('num_experts', range(2, 17))
def test_codes_are_binary_msb_first(num_experts):
  codes = gates.binary_codes(num_experts)
  m = math.ceil(math.log2(num_experts))
  assert codes.shape == (num_experts, m) and codes.dtype == bool
  values = (codes * (2 ** np.arange(m - 1, -1, -1))).sum(1)
  np.testing.assert_array_equal(values, np.arange(num_experts))
  assert len({tuple(row) for row in codes}) == num_experts


def test_codes_by_hand():
  # 5 experts need 3 bits; expert 4 = 100, expert 1 = 001 (MSB first).
  expected = np.array(
    [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]], bool
  )
  np.testing.assert_array_equal(gates.binary_codes(5), expected)
  np.testing.assert_array_equal(gates.binary_codes(2), [[False], [True]])


def test_num_bits():
  assert [gates.num_bits(e) for e in (2, 3, 4, 5, 8, 9, 16, 17)] == [
    1,
    2,
    2,
    3,
    3,
    4,
    4,
    5,
  ]


@pytest.mark.parametrize('gamma', [0.5, 1.0, 2.0])
def test_smooth_step_values_by_hand(gamma):
  t = jnp.array(
    [-gamma, -gamma / 2, -gamma / 4, 0, gamma / 4, gamma / 2, gamma]
  )
  # Cubic at gamma/4: -2/64 + 3/8 + 1/2 = 27/32; at -gamma/4: 5/32.
  expected = [0, 0, 5 / 32, 0.5, 27 / 32, 1, 1]
  np.testing.assert_allclose(gates.smooth_step(t, gamma), expected, atol=1e-6)


@pytest.mark.parametrize('gamma', [0.5, 1.0, 2.0])
def test_smooth_step_slope(gamma):
  slope = jax.vmap(jax.grad(lambda t: gates.smooth_step(t, gamma)))
  t = jnp.array([-gamma / 2, gamma / 2, -gamma, gamma, 0.0])
  # S'(t) = -6 t^2 / gamma^3 + 3 / (2 gamma): 0 at +-gamma/2 and outside,
  # 3 / (2 gamma) at 0.
  np.testing.assert_allclose(slope(t), [0, 0, 0, 0, 1.5 / gamma], atol=1e-6)
  # Approaching the ends from inside, the slope goes to 0 continuously.
  inside = jnp.array([-gamma / 2 + 1e-3 * gamma, gamma / 2 - 1e-3 * gamma])
  assert np.all(np.abs(slope(inside)) < 1e-2 / gamma)


def test_symmetric_uniform_initializers():
  gate = gates.DSelectKGate(num_experts=256, k=256, gamma=2.0)
  params = gate.init(jax.random.key(0))['params']
  z, w = np.asarray(params['z_logits']), np.asarray(params['w_logits'])
  assert np.all(np.abs(z) < 0.02) and z.min() < -0.015 and z.max() > 0.015
  assert np.all(np.abs(w) < 0.05) and w.min() < -0.04 and w.max() > 0.04


# ----------------------------------------------------------------------------
# DSelect-k against the reference.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('num_experts,k,gamma', CASES)
def test_static_gate_matches_reference(num_experts, k, gamma):
  rng = np.random.default_rng(num_experts * 100 + k)
  z, w = _random_static(rng, num_experts, k, gamma)
  gate = gates.DSelectKGate(num_experts=num_experts, k=k, gamma=gamma)
  variables = {'params': {'z_logits': z, 'w_logits': w}}
  want_w, want_r, want_ent, want_reach = ref_static(z, w, num_experts, gamma)
  for fn in _eager_and_jit(gate.apply, (num_experts, k, gamma), CASES):
    weights, aux = fn(variables)
    assert weights.shape == (num_experts,)
    np.testing.assert_allclose(weights, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
      aux['selector_outputs'], want_r, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(aux['entropy'], want_ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux['reachability'], want_reach, rtol=1e-5)


@pytest.mark.parametrize('num_experts,k,gamma', CASES[::2])
def test_per_example_gate_matches_reference(num_experts, k, gamma):
  rng = np.random.default_rng(num_experts * 100 + k + 7)
  m, d, b = ref_bits(num_experts), 6, 5
  x = rng.normal(size=(b, d)).astype(np.float32)
  zk = rng.uniform(-0.3 * gamma, 0.3 * gamma, (d, k * m)).astype(np.float32)
  zb = rng.uniform(-0.3 * gamma, 0.3 * gamma, (k * m,)).astype(np.float32)
  wk = rng.normal(size=(d, k)).astype(np.float32)
  wb = rng.normal(size=(k,)).astype(np.float32)
  gate = gates.DSelectKGate(
    num_experts=num_experts, k=k, gamma=gamma, per_example=True
  )
  variables = {
    'params': {
      'z_logits': {'kernel': zk, 'bias': zb},
      'w_logits': {'kernel': wk, 'bias': wb},
    }
  }
  want = ref_per_example(x, zk, zb, wk, wb, k, num_experts, gamma)
  for fn in _eager_and_jit(gate.apply, (num_experts, k, gamma), CASES[::2]):
    weights, aux = fn(variables, x)
    assert weights.shape == (b, num_experts)
    np.testing.assert_allclose(weights, want[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
      aux['selector_outputs'], want[1], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(aux['entropy'], want[2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux['reachability'], want[3], rtol=1e-4)


def _numeric_grad(f, x, eps=1e-6):
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[idx] += eps
    minus[idx] -= eps
    grad[idx] = (f(plus) - f(minus)) / (2 * eps)
  return grad


GRADIENT_CASES = [
  (4, 2, 1.0),
  (5, 2, 1.0),
  (7, 3, 0.5),
  (8, 8, 2.0),
  (9, 1, 1.0),
  (16, 4, 1.0),
]


@pytest.mark.parametrize('num_experts,k,gamma', GRADIENT_CASES)
def test_static_gradients_match_finite_differences(num_experts, k, gamma):
  rng = np.random.default_rng(num_experts)
  z, w = _random_static(rng, num_experts, k, gamma)
  # Keep every bit logit away from the kinks at +-gamma/2, where a finite
  # difference would straddle two pieces.
  z = np.where(np.abs(np.abs(z) - gamma / 2) < 0.02 * gamma, 0.1 * gamma, z)
  c = rng.normal(size=num_experts)
  gate = gates.DSelectKGate(num_experts=num_experts, k=k, gamma=gamma)

  def loss(params):
    weights, aux = gate.apply({'params': params})
    return (
      jnp.dot(weights, c) + 0.3 * aux['entropy'] + 0.1 * aux['reachability']
    )

  def ref_loss(zz, ww):
    weights, _, ent, reach = ref_static(zz, ww, num_experts, gamma)
    return weights @ c + 0.3 * ent + 0.1 * reach

  params = {'z_logits': jnp.asarray(z), 'w_logits': jnp.asarray(w)}
  numeric = {
    'z_logits': _numeric_grad(lambda zz: ref_loss(zz, w), z),
    'w_logits': _numeric_grad(lambda ww: ref_loss(z, ww), w),
  }
  case = (num_experts, k, gamma)
  for grad_fn in _eager_and_jit(jax.grad(loss), case, GRADIENT_CASES):
    grads = grad_fn(params)
    for name, want in numeric.items():
      np.testing.assert_allclose(grads[name], want, rtol=2e-3, atol=2e-4)
  saturated = np.abs(z) > gamma / 2
  assert np.all(np.asarray(grads['z_logits'])[saturated] == 0)


def test_per_example_gradients_match_finite_differences():
  num_experts, k, gamma, d, b = 6, 2, 1.0, 3, 4
  m = ref_bits(num_experts)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, d)).astype(np.float32)
  zk = rng.uniform(-0.1, 0.1, (d, k * m)).astype(np.float32)
  zb = rng.uniform(-0.1, 0.1, (k * m,)).astype(np.float32)
  wk = rng.normal(size=(d, k)).astype(np.float32)
  wb = rng.normal(size=(k,)).astype(np.float32)
  c = rng.normal(size=(b, num_experts))
  gate = gates.DSelectKGate(
    num_experts=num_experts, k=k, gamma=gamma, per_example=True
  )

  def loss(params):
    weights, aux = gate.apply({'params': params}, x)
    return jnp.sum(weights * c) + 0.3 * aux['entropy'] + aux['reachability']

  def ref_loss(zk_):
    weights, _, ent, reach = ref_per_example(
      x, zk_, zb, wk, wb, k, num_experts, gamma
    )
    return np.sum(weights * c) + 0.3 * ent + reach

  params = {
    'z_logits': {'kernel': zk, 'bias': zb},
    'w_logits': {'kernel': wk, 'bias': wb},
  }
  grads = jax.grad(loss)(params)
  np.testing.assert_allclose(
    grads['z_logits']['kernel'],
    _numeric_grad(ref_loss, zk),
    rtol=2e-3,
    atol=2e-4,
  )


@pytest.mark.parametrize('gamma', [0.5, 1.0])
def test_saturated_selectors_are_one_hot_by_hand(gamma):
  # E = 4, M = 2. Selector 0: bits (1, 0) -> expert 2; selector 1: (0, 1) ->
  # expert 1. w = (0, log 3) -> alpha = (1/4, 3/4).
  z = np.array([[gamma, -gamma], [-0.6 * gamma, 2 * gamma]], np.float32)
  w = np.array([0.0, np.log(3.0)], np.float32)
  gate = gates.DSelectKGate(num_experts=4, k=2, gamma=gamma)
  weights, aux = gate.apply({'params': {'z_logits': z, 'w_logits': w}})
  np.testing.assert_array_equal(
    aux['selector_outputs'], [[0, 0, 1, 0], [0, 1, 0, 0]]
  )
  np.testing.assert_allclose(weights, [0, 0.75, 0.25, 0], rtol=1e-6)
  assert np.count_nonzero(weights) == 2
  # One-hot selectors: entropy -1 * log(1 + 1e-6) per selector.
  np.testing.assert_allclose(aux['entropy'], -2 * np.log1p(1e-6), atol=2e-7)
  assert aux['reachability'] == 0.0  # E is a power of two.


def test_saturated_gate_has_at_most_k_nonzeros():
  rng = np.random.default_rng(3)
  for num_experts in (3, 5, 8, 13):
    for k in (1, 2, 3):
      m = ref_bits(num_experts)
      # Random saturated bits that address reachable experts only.
      experts = rng.integers(0, num_experts, size=k)
      bits = ref_codes(num_experts)[experts]  # (K, M)
      z = np.where(bits, 0.7, -0.7).astype(np.float32)
      w = rng.normal(size=k).astype(np.float32)
      gate = gates.DSelectKGate(num_experts=num_experts, k=k)
      weights, aux = gate.apply({'params': {'z_logits': z, 'w_logits': w}})
      assert np.count_nonzero(weights) == len(set(experts))
      np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-6)
      # Every selector sums to 1 over reachable experts: 1/1 per selector.
      np.testing.assert_allclose(
        aux['reachability'], 0.0 if num_experts == 2**m else k, rtol=1e-6
      )


def test_unreachable_codes_are_not_renormalized():
  # E = 3, M = 2: code 11 is unreachable. Both bits at S = 1/2 give each code
  # 1/4, so the three reachable experts get 1/4 each and the sum is 3/4.
  gate = gates.DSelectKGate(num_experts=3, k=1)
  weights, aux = gate.apply(
    {'params': {'z_logits': np.zeros((1, 2)), 'w_logits': np.zeros((1,))}}
  )
  np.testing.assert_allclose(weights, [0.25, 0.25, 0.25])
  np.testing.assert_allclose(aux['reachability'], 4 / 3, rtol=1e-6)


def test_params_from_tf_static_and_per_example():
  rng = np.random.default_rng(5)
  z_tf = rng.uniform(-0.4, 0.4, (3, 1, 3)).astype(np.float32)  # (K, 1, M)
  w_tf = rng.normal(size=(3, 1)).astype(np.float32)  # (K, 1)
  params = gates.params_from_tf({'z_logits': z_tf, 'w_logits': w_tf})
  gate = gates.DSelectKGate(num_experts=6, k=3)
  weights, _ = gate.apply({'params': params})
  np.testing.assert_allclose(
    weights, ref_static(z_tf[:, 0], w_tf[:, 0], 6, 1.0)[0], rtol=1e-5
  )
  dense = {
    'z_logits': {'kernel': np.ones((4, 9)), 'bias': np.zeros(9)},
    'w_logits': {'kernel': np.ones((4, 3)), 'bias': np.zeros(3)},
  }
  converted = gates.params_from_tf(dense)
  assert jax.tree.map(jnp.shape, converted) == jax.tree.map(np.shape, dense)
  with pytest.raises(ValueError, match=r'\(K, 1, M\)'):
    gates.params_from_tf({'z_logits': np.zeros((3, 3)), 'w_logits': w_tf})
  with pytest.raises(
    TypeError,
    match='params_from_tf: tf_weights must be a mapping, got NoneType',
  ):
    gates.params_from_tf(None)


def test_param_shapes_by_eval_shape():
  static = gates.DSelectKGate(num_experts=9, k=3)
  shapes = jax.eval_shape(static.init, jax.random.key(0))['params']
  assert shapes['z_logits'].shape == (3, 4) and shapes['w_logits'].shape == (3,)
  per_ex = gates.DSelectKGate(num_experts=9, k=3, per_example=True)
  shapes = jax.eval_shape(per_ex.init, jax.random.key(0), jnp.zeros((2, 7)))[
    'params'
  ]
  assert jax.tree.map(lambda s: s.shape, shapes) == {
    'z_logits': {'kernel': (7, 12), 'bias': (12,)},
    'w_logits': {'kernel': (7, 3), 'bias': (3,)},
  }


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(num_experts=4, k=0), 'k=0'),
    (dict(num_experts=4, k=5), 'k=5'),
    (dict(num_experts=1, k=1), 'num_experts=1'),
    (dict(num_experts=4, k=2, gamma=0.0), 'gamma=0.0'),
    (dict(num_experts=4, k=2, gamma=-1.0), 'gamma=-1.0'),
  ],
)
def test_bad_attributes_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gates.DSelectKGate(**kwargs)


def test_routing_inputs_checked():
  static = gates.DSelectKGate(num_experts=4, k=2)
  variables = static.init(jax.random.key(0))
  with pytest.raises(ValueError, match='per_example=False'):
    static.apply(variables, jnp.ones((2, 3)))
  per_ex = gates.DSelectKGate(num_experts=4, k=2, per_example=True)
  with pytest.raises(ValueError, match='needs routing_inputs'):
    per_ex.init(jax.random.key(0))
  with pytest.raises(ValueError, match=r'shape \(B, D\)'):
    per_ex.init(jax.random.key(0), jnp.ones((2, 3, 4)))


# ----------------------------------------------------------------------------
# Baselines.
# ----------------------------------------------------------------------------


def test_softmax_gate_by_hand():
  gate = gates.SoftmaxGate(num_experts=4)
  weights, aux = gate.apply(gate.init(jax.random.key(0)))
  np.testing.assert_allclose(weights, [0.25] * 4)  # Zero logits: uniform.
  assert aux == {}
  logits = np.log(np.array([1.0, 2.0, 3.0, 4.0], np.float32))
  weights, _ = gate.apply({'params': {'logits': logits}})
  np.testing.assert_allclose(weights, [0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def test_top_k_gate_by_hand():
  gate = gates.TopKGate(num_experts=4, k=2, noisy=False)
  logits = np.array([1.0, 3.0, 2.0, 0.0], np.float32)
  weights, aux = gate.apply({'params': {'logits': logits}})
  e = np.e
  want = np.array([0, e / (e + 1), 1 / (e + 1), 0])
  np.testing.assert_allclose(weights, want, rtol=1e-6)
  # Static gate = batch of one: importance is the weights themselves.
  np.testing.assert_allclose(
    aux['importance'], want.var() / want.mean() ** 2, rtol=1e-5
  )
  # Hard load counts (0, 1, 1, 0): mean 1/2, variance 1/4, CV^2 = 1.
  np.testing.assert_allclose(aux['load'], 1.0, rtol=1e-6)


def test_noisy_top_k_per_example():
  gate = gates.TopKGate(num_experts=6, k=2, per_example=True)
  x = jax.random.normal(jax.random.key(0), (16, 5))
  variables = gate.init(jax.random.key(1), x)
  # Zero-initialized logits tie: without noise, 2 experts at 1/2 each.
  weights, _ = gate.apply(variables, x)
  np.testing.assert_allclose(
    np.sort(weights, axis=1)[:, -3:], np.tile([0, 0.5, 0.5], (16, 1))
  )
  noisy, aux = gate.apply(
    variables, x, deterministic=False, rngs={'gating': jax.random.key(2)}
  )
  assert noisy.shape == (16, 6)
  assert np.all(np.count_nonzero(np.asarray(noisy), axis=1) == 2)
  np.testing.assert_allclose(np.sum(noisy, axis=1), 1.0, rtol=1e-6)

  # With noise the load estimate is smooth: it has a gradient.
  def load(params):
    return gate.apply(
      {'params': params},
      x,
      deterministic=False,
      rngs={'gating': jax.random.key(2)},
    )[1]['load']

  grads = jax.jit(jax.grad(load))(variables['params'])
  assert np.any(np.asarray(grads['logits']['kernel']) != 0)
  assert np.isfinite(aux['importance']) and np.isfinite(aux['load'])


def test_make_gate_unknown_name():
  with pytest.raises(ValueError, match="Unknown gate 'dselect'"):
    gates.make_gate('dselect', 4)
  assert isinstance(gates.make_gate('top_k', 4, k=1), gates.TopKGate)
