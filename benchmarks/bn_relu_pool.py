"""Times one BatchNorm-ReLU-pool block: the CPU kernels against XLA.

  python benchmarks/bn_relu_pool.py [--batches=128,256,512] [--repeats=30]

The block of the MultiMNIST expert in training mode (batch statistics and
the running-average update), forward and backward (d sum(y * dy) / d x,
scale, bias), jitted, warm, best of --repeats, at the expert's two sizes:
(B, 32, 32, 10) after the first convolution and (B, 12, 12, 20) after the
second. The baseline, run in the same process, is what the expert computes
with ``norm='xla'``: nn.BatchNorm, nn.relu and blocks.max_pool_2x2; the
other row is cpu.BatchNormReLUPool (``norm='kernel'``,
dselect_jax/cpu/kernels.py).
"""

import os
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dselect_jax import blocks
from dselect_jax import cli
from dselect_jax import cpu

_BATCHES = flags.DEFINE_list('batches', ['128', '256', '512'], 'Batch sizes.')
_REPEATS = flags.DEFINE_integer(
  'repeats', 30, 'Timed calls; best is kept.', lower_bound=1
)


class Block(nn.Module):
  """The expert's block either way (experts.MultiMNISTExpert's two norms)."""

  norm: str

  @nn.compact
  def __call__(self, x):
    if self.norm == 'kernel':
      return cpu.BatchNormReLUPool(use_running_average=False)(x)
    return blocks.max_pool_2x2(
      nn.relu(
        nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)(x)
      )
    )


def time_block(norm, shape, repeats):
  """Best milliseconds of one forward + backward of the block."""
  block = Block(norm)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  variables = block.init(jax.random.key(0), x)
  b, h, w, c = shape
  dy = jnp.ones((b, h // 2, w // 2, c), jnp.float32)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      y, upd = block.apply(
        {**variables, 'params': params}, x, mutable=['batch_stats']
      )
      return jnp.sum(y * dy), upd

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  jax.block_until_ready(step(variables['params'], x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(variables['params'], x))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def main(argv):
  del argv
  print(
    f'{jax.devices()[0].platform}, {os.cpu_count()} CPUs; one '
    'BatchNorm-ReLU-pool block, training mode, forward + backward, '
    f'best of {_REPEATS.value}\n'
  )
  print('| input (B, H, W, C) | XLA (nn.BatchNorm) ms | kernels ms | x XLA |')
  print('| --- | --- | --- | --- |')
  for batch in cli.positive_ints('batches', _BATCHES.value):
    for shape in ((batch, 32, 32, 10), (batch, 12, 12, 20)):
      xla = time_block('xla', shape, _REPEATS.value)
      kernel = time_block('kernel', shape, _REPEATS.value)
      print(
        f'| {shape} | {xla:.2f} | {kernel:.2f} | {xla / kernel:.2f} |',
        flush=True,
      )


if __name__ == '__main__':
  cli.run(main)
