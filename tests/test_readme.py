"""The README's "Using the gate" example runs as printed and does what its
comments say."""

import os
import re

from conftest import REPO
import jax
import jax.numpy as jnp
import numpy as np


def _using_the_gate_block(index: int = 0) -> str:
  """The section's ``index``-th python block: 0 linen, 1 NNX."""
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  section = readme.split('## Using the gate', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```python\n(.*?)```', section, re.S)[index]


def _dselect_k_by_hand(z, w, num_experts, gamma=1.0):
  """The paper's Equations 4-5 in NumPy: (..., K, M) bit logits z and
  (..., K) mixing logits w to (..., E) expert weights and the (..., K, E)
  selector outputs."""
  t = np.asarray(z, np.float64)
  s = np.where(
    t <= -gamma / 2,
    0.0,
    np.where(
      t >= gamma / 2, 1.0, -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5
    ),
  )
  m = t.shape[-1]
  r = np.ones(t.shape[:-1] + (num_experts,))  # (..., K, E)
  for i in range(num_experts):
    for j in range(m):
      bit = (i >> (m - 1 - j)) & 1  # Bit j of i, most significant first.
      r[..., i] *= s[..., j] if bit else 1 - s[..., j]
  alpha = np.exp(w) / np.exp(w).sum(-1, keepdims=True)
  return (alpha[..., None] * r).sum(-2), r


def test_using_the_gate_example_runs_as_its_comments_say():
  # Run up to the per-example gate, keep the static gate's outputs, go on.
  block = _using_the_gate_block()
  cut = block.index('# Per-example gate')
  static_part, rest = block[:cut], block[cut:]
  namespace = {}
  exec(static_part, namespace)  # pylint: disable=exec-used
  static, static_aux = namespace['weights'], namespace['aux']
  static_params = namespace['variables']['params']
  exec(rest, namespace)  # pylint: disable=exec-used

  # The per-example gate: 8 experts, 4 routing inputs.
  weights, aux = namespace['weights'], namespace['aux']
  assert weights.shape == (4, 8)
  # 8 experts are all 2^3 codes of 3 bits, so each selector's outputs sum to
  # 1 over the experts, and the softmax mixing the 2 selectors sums to 1:
  # every example's weights sum to 1, and the reachability term is 0.
  assert np.all(weights >= 0)
  np.testing.assert_allclose(weights.sum(axis=1), np.ones(4), rtol=1e-6)
  assert {'entropy', 'reachability'} <= set(aux)
  assert float(aux['reachability']) == 0.0
  # The weights are the paper's formula of the gate's parameters: z and w
  # are Dense layers of the routing inputs x; z's K*M outputs are K rows of
  # M bits.
  params = namespace['variables']['params']
  x = np.ones((4, 16))
  z = x @ params['z_logits']['kernel'] + params['z_logits']['bias']
  w = x @ params['w_logits']['kernel'] + params['w_logits']['bias']
  np.testing.assert_allclose(
    weights, _dselect_k_by_hand(z.reshape(4, 2, 3), w, 8)[0], atol=1e-6
  )

  # The static gate: one weight vector, the same formula of its parameters.
  assert static.shape == (8,)
  by_hand, r = _dselect_k_by_hand(
    static_params['z_logits'], static_params['w_logits'], 8
  )
  np.testing.assert_allclose(static, by_hand, atol=1e-6)
  np.testing.assert_allclose(float(static.sum()), 1.0, rtol=1e-6)
  assert float(static_aux['reachability']) == 0.0
  # Entropy: sum over the K = 2 selectors of -sum_i r_i log(r_i + 1e-6).
  np.testing.assert_allclose(
    float(static_aux['entropy']), -np.sum(r * np.log(r + 1e-6)), rtol=1e-5
  )
  # At initialization every z is uniform in +-gamma/100 = +-0.01, inside
  # [-gamma/2, gamma/2]: no selector is one-hot yet and all 8 experts have
  # weight near 1/8. S(z) = 3z/2 + 1/2 - 2z^3 is within 0.5 +- 0.015 there,
  # so each of r's 3-bit products is within [0.485^3, 0.515^3], which is
  # 1/8 - 0.0110 to 1/8 + 0.0116, and so is their mixture.
  assert np.all(np.abs(np.asarray(static) - 1 / 8) < 0.0117)

  # The last model of the example (Toeplitz convolutions, C++ BatchNorm
  # kernels): two tasks' logits over 10 classes for 36 x 36 MultiMNIST images.
  model = namespace['model']
  x = jnp.zeros((3, 36, 36, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  logits, model_aux = model.apply(variables, x, train=False)
  assert logits.shape == (2, 3, 10)
  assert model_aux['expert_weights'].shape == (2, 8)
  # One static DSelect-k gate per task, each the paper's formula of its own
  # parameters.
  for task in range(2):
    gate = variables['params'][f'gate_{task}']
    np.testing.assert_allclose(
      model_aux['expert_weights'][task],
      _dselect_k_by_hand(gate['z_logits'], gate['w_logits'], 8)[0],
      atol=1e-6,
    )


def test_the_nnx_example_runs_as_its_comments_say():
  namespace = {}
  exec(_using_the_gate_block(1), namespace)  # pylint: disable=exec-used
  gate = namespace['gate']
  want, _ = _dselect_k_by_hand(
    np.asarray(gate.z_logits[...]), np.asarray(gate.w_logits[...]), 8
  )
  weights = namespace['weights']
  assert weights.shape == (8,)
  np.testing.assert_allclose(weights, want, rtol=1e-5)
  outputs, aux = namespace['outputs'], namespace['aux']
  assert outputs.shape == (2, 4, 10) and np.all(np.isfinite(outputs))
  assert aux['expert_weights'].shape == (2, 8)
