"""The README's "Using the gate" example runs as printed and does what its
comments say."""

import os
import re

from conftest import REPO
import jax
import jax.numpy as jnp
import numpy as np


def _using_the_gate_block() -> str:
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  section = readme.split('## Using the gate', 1)[1]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_using_the_gate_example_runs_as_its_comments_say():
  # Run up to the per-example gate, keep the static gate's outputs, go on.
  block = _using_the_gate_block()
  cut = block.index('# Per-example gate')
  static_part, rest = block[:cut], block[cut:]
  namespace = {}
  exec(static_part, namespace)  # pylint: disable=exec-used
  static, static_aux = namespace['weights'], namespace['aux']
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

  # The static gate: one weight vector.
  assert static.shape == (8,)
  np.testing.assert_allclose(float(static.sum()), 1.0, rtol=1e-6)
  assert float(static_aux['reachability']) == 0.0

  # The last model of the example (Toeplitz convolutions, C++ BatchNorm
  # kernels): two tasks' logits over 10 classes for 36 x 36 MultiMNIST images.
  model = namespace['model']
  x = jnp.zeros((3, 36, 36, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  logits, model_aux = model.apply(variables, x, train=False)
  assert logits.shape == (2, 3, 10)
  assert model_aux['expert_weights'].shape == (2, 8)
