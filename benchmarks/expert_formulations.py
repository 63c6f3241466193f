"""Times formulations of the 8-expert MultiMNIST bank on this machine.

  python benchmarks/expert_formulations.py [--batch=256] [--experts=8]

Forward + backward of sum(experts(x)**2) (BatchNorm in training mode), jitted,
warm, best of --repeats. Prints images/s and the ratio to the per-expert loop
with XLA's convolutions (the baseline, run in the same process); the loop
with Toeplitz convolutions (models.ToeplitzConv) and the fused layouts follow.
"""

import functools
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dselect_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position

_BATCH = flags.DEFINE_integer('batch', 256, 'Images per step.')
_EXPERTS = flags.DEFINE_integer('experts', 8, 'Experts.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed steps.')


def bench(impl, conv, batch, experts, repeats):
  kwargs = {'conv': conv} if impl == 'loop' else {}
  bank = models.ExpertBank(experts, impl=impl, expert_kwargs=kwargs)
  x = jax.random.uniform(jax.random.key(0), (batch, 36, 36, 1))
  variables = bank.init(jax.random.key(1), x, train=False)

  @jax.jit
  def step(params, batch_stats, x):
    def loss(p):
      out, upd = bank.apply({'params': p, 'batch_stats': batch_stats}, x,
                            train=True, mutable=['batch_stats'])
      return jnp.sum(out**2), upd
    return jax.grad(loss, has_aux=True)(params)

  start = time.perf_counter()
  jax.block_until_ready(step(variables['params'], variables['batch_stats'], x))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(variables['params'], variables['batch_stats'],
                               x))
    times.append(time.perf_counter() - start)
  return batch / min(times), compile_s


def main(argv):
  del argv
  print(f'{jax.devices()[0].platform}, batch {_BATCH.value}, '
        f'{_EXPERTS.value} experts; forward+backward of the expert bank')
  base = None
  variants = [('loop', conv) for conv in models.CONV_IMPLS]
  variants += [(impl, None) for impl in models.EXPERT_IMPLS if impl != 'loop']
  for impl, conv in variants:
    rate, compile_s = bench(impl, conv, _BATCH.value, _EXPERTS.value,
                            _REPEATS.value)
    base = base or rate
    name = f'{impl}, {conv} conv' if conv else impl
    print(f'{name:18s} {rate:9.0f} images/s  x{rate / base:5.2f} vs loop  '
          f'compile {compile_s:5.1f} s', flush=True)


if __name__ == '__main__':
  app.run(main)
