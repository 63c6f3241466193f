"""Times formulations of the 8-expert MultiMNIST bank in evaluation mode.

  python benchmarks/eval_formulations.py [--batch=1000] [--rounds=5]

The forward of the expert bank with running averages, jitted, warm, on one
batch of random images and BatchNorm statistics moved off the identity.
Rounds alternate the contenders (3 calls each); the table gives the median
images/s, the spread and the ratio to the loop, with the largest difference
of each output from the loop's:

- ``loop``: ExpertBank expert by expert, the CPU paths that ``model.conv``
  and ``model.norm`` 'auto' pick (the kernels' direct convolutions, plain
  JAX BatchNorm in evaluation): what evaluation is without ``fused_eval``.
- ``folded``: the same, each BatchNorm folded into its convolution.
- ``shared toeplitz``: folded, and the experts' first convolutions as one
  Toeplitz convolution with E * 10 output channels.
- ``shared xla, toeplitz``: the shared first convolution as XLA's.
- ``grouped``: the shared XLA first convolution, then all second
  convolutions as one grouped XLA convolution.
- ``fused``: ``experts.MultiMNISTExpert.evaluate_bank`` with XLA's convolutions:
  shared first convolution, then XLA's convolution per expert.
- ``fused, kernels``: the same with each block by
  ``cpu.kernels.conv_relu_pool`` (what ``model.fused_eval`` runs on CPU).
"""

import functools
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import multimnist
from dselect_jax import blocks
from dselect_jax import cli
from dselect_jax import datasets
from dselect_jax import experts
from dselect_jax import factory
from dselect_jax.cpu import kernels
from dselect_jax.cpu import layers
from dselect_jax.cpu import memory

_BATCH = flags.DEFINE_integer('batch', 1000, 'Images per call.', lower_bound=1)
_ROUNDS = flags.DEFINE_integer(
  'rounds', 5, 'Alternating rounds.', lower_bound=1
)
EPS = 1e-5


def _folded(p, s, e, i):
  """Expert e's convolution i with its BatchNorm folded in."""
  conv, bn = p[f'expert_{e}'][f'Conv_{i}'], p[f'expert_{e}'][f'BatchNorm_{i}']
  st = s[f'expert_{e}'][f'BatchNorm_{i}']
  mul = jax.lax.rsqrt(st['var'] + EPS) * bn['scale']
  return conv['kernel'] * mul, (conv['bias'] - st['mean']) * mul + bn['bias']


def _xla_conv(x, kernel, groups=1):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )


def _head(p, e, z):
  """Pooled second block (B, 6, 6, 20) -> the expert's output (B, 50)."""
  z = z.reshape(z.shape[0], -1)
  for layer in ('Dense_0', 'Dense_1'):
    z = jax.nn.relu(
      z @ p[f'expert_{e}'][layer]['kernel'] + p[f'expert_{e}'][layer]['bias']
    )
  return z


def _block(z, kernel, bias, conv):
  return blocks.max_pool_2x2(jax.nn.relu(conv(z, kernel) + bias))


def variant(num_experts, first, second):
  """first: 'per_expert' or 'shared_' + a convolution; second: a convolution
  or 'grouped'. Convolutions: 'toeplitz' or 'xla'."""
  convs = {'toeplitz': layers.toeplitz_conv, 'xla': _xla_conv}

  def bank(p, s, x):
    experts = range(num_experts)
    k0, b0 = zip(*[_folded(p, s, e, 0) for e in experts])
    if first == 'per_expert':
      firsts = [_block(x, k0[e], b0[e], layers.toeplitz_conv) for e in experts]
    else:
      conv = convs[first[len('shared_') :]]
      y = _block(x, jnp.concatenate(k0, -1), jnp.concatenate(b0), conv)
      firsts = [y[..., 10 * e : 10 * (e + 1)] for e in experts]
    k1, b1 = zip(*[_folded(p, s, e, 1) for e in experts])
    if second == 'grouped':
      z = _block(
        jnp.concatenate(firsts, -1),
        jnp.concatenate(k1, -1),
        jnp.concatenate(b1),
        functools.partial(_xla_conv, groups=num_experts),
      )
      seconds = [z[..., 20 * e : 20 * (e + 1)] for e in experts]
    else:
      seconds = [
        _block(firsts[e], k1[e], b1[e], convs[second]) for e in experts
      ]
    return jnp.stack([_head(p, e, seconds[e]) for e in experts])

  return bank


def main(argv):
  del argv
  memory.keep_freed_memory()  # As eval.py does; before XLA starts threads.
  config = multimnist.get_config()
  with config.unlocked():
    config.model.fused_eval = False
  spec = datasets.resolve(config.data).spec
  model = factory.create_model(config, spec)
  state = factory.initial_state(
    model, factory.create_optimizer(config, 100), jax.random.key(0), spec
  )
  rng = np.random.default_rng(0)
  stats = jax.tree.map(
    lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32),
    state.batch_stats,
  )['experts']
  params = state.params['experts']
  x = jnp.asarray(rng.random((_BATCH.value, 36, 36, 1)), jnp.float32)
  num_experts = config.model.num_experts
  loop = experts.ExpertBank(num_experts, model.expert, model.expert_kwargs)
  contenders = {
    'loop': lambda p, s, x: loop.apply(
      {'params': p, 'batch_stats': s}, x, train=False
    ),
    'folded': variant(num_experts, 'per_expert', 'toeplitz'),
    'shared toeplitz': variant(num_experts, 'shared_toeplitz', 'toeplitz'),
    'shared xla, toeplitz': variant(num_experts, 'shared_xla', 'toeplitz'),
    'grouped': variant(num_experts, 'shared_xla', 'grouped'),
    'fused': lambda p, s, x: experts.MultiMNISTExpert.evaluate_bank(
      {'params': p, 'batch_stats': s}, x, tuple(range(num_experts))
    ),
    'fused, kernels': lambda p, s, x: experts.MultiMNISTExpert.evaluate_bank(
      {'params': p, 'batch_stats': s},
      x,
      tuple(range(num_experts)),
      conv_relu_pool=kernels.conv_relu_pool,
    ),
  }
  contenders = {k: jax.jit(f) for k, f in contenders.items()}
  reference = contenders['loop'](params, stats, x)
  diffs = {
    k: float(jnp.max(jnp.abs(f(params, stats, x) - reference)))
    for k, f in contenders.items()
  }
  rates = {k: [] for k in contenders}
  for r in range(_ROUNDS.value):
    names = list(contenders)
    names = names[r % len(names) :] + names[: r % len(names)]
    for name in names:
      start = time.perf_counter()
      for _ in range(3):
        out = contenders[name](params, stats, x)
      out.block_until_ready()
      rates[name].append(3 * _BATCH.value / (time.perf_counter() - start))
  base = np.median(rates['loop'])
  print(
    f'{jax.devices()[0].platform}, batch {_BATCH.value}, {num_experts} '
    f'experts, evaluation forward of the bank, {_ROUNDS.value} rounds'
  )
  for name, values in rates.items():
    print(
      f'{name:22s} {np.median(values):6.0f} img/s ({min(values):.0f}-'
      f'{max(values):.0f})  x{np.median(values) / base:.2f} vs loop  '
      f'max |diff| {diffs[name]:.1e}'
    )


if __name__ == '__main__':
  cli.run(main)
