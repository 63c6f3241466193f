"""Times formulations of the 8-expert MultiMNIST bank on this machine.

  python benchmarks/expert_formulations.py [--batch=256] [--experts=8]
      [--ablations] [--torch]

Forward + backward of sum(experts(x)**2) (BatchNorm in training mode), jitted,
warm, best of --repeats. Prints images/s and the ratio to the per-expert loop
with XLA's convolutions (the baseline, run in the same process); the loop
with Toeplitz convolutions (cpu.ToeplitzConv), the same with the CPU
kernels for BatchNorm-ReLU-pool (cpu.BatchNormReLUPool) follow.

--ablations adds two networks that are *not* the expert, to bound what the
layers between the matmuls cost: the Toeplitz loop without BatchNorm, and
with only the convolutions and Dense layers (also without the ReLU and the
pooling after each convolution; its output is subsampled 2x2 instead, so
the shapes stay the expert's). --torch adds the same bank and loss in
PyTorch eager (CPU; torch is an optional, benchmark-only dependency) and
prints every rate against it too.
"""

import functools
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from dselect_jax import blocks
from dselect_jax import cli
from dselect_jax import config_schema
from dselect_jax import cpu
from dselect_jax import experts
from dselect_jax import factory

_BATCH = flags.DEFINE_integer('batch', 256, 'Images per step.', lower_bound=1)
_EXPERTS = flags.DEFINE_integer('experts', 8, 'Experts.', lower_bound=2)
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed steps.', lower_bound=1)
_ABLATIONS = flags.DEFINE_bool(
  'ablations',
  False,
  'Also time the Toeplitz expert without BatchNorm, and '
  'with its convolutions and Dense layers only.',
)
_TORCH = flags.DEFINE_bool('torch', False, 'Also time PyTorch eager on CPU.')


class _AblatedExpert(nn.Module):
  """The Toeplitz MultiMNIST expert without BatchNorm (not the network), and
  with relu_and_pool=False without ReLU and pooling after the convolutions."""

  relu_and_pool: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train  # No BatchNorm.
    for features in (10, 20):
      x = cpu.ToeplitzConv(features, (5, 5))(x)
      if self.relu_and_pool:
        x = blocks.max_pool_2x2(nn.relu(x))
      else:
        x = x[:, ::2, ::2]  # The pooled shape, without the pooling.
    x = x.reshape(x.shape[0], -1)  # (B, 720)
    x = nn.relu(nn.Dense(50)(x))
    return nn.relu(nn.Dense(50)(x))  # (B, H)


def bench(bank, batch, repeats):
  x = jax.random.uniform(jax.random.key(0), (batch, 36, 36, 1))
  variables = bank.init(jax.random.key(1), x, train=False)
  batch_stats = variables.get('batch_stats', {})

  @jax.jit
  def step(params, batch_stats, x):
    def loss(p):
      out, upd = bank.apply(
        {'params': p, 'batch_stats': batch_stats},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      return jnp.sum(out**2), upd

    return jax.grad(loss, has_aux=True)(params)

  start = time.perf_counter()
  jax.block_until_ready(step(variables['params'], batch_stats, x))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(variables['params'], batch_stats, x))
    times.append(time.perf_counter() - start)
  return batch / min(times), compile_s


def bench_torch(batch, experts, repeats):
  """The same bank and loss in PyTorch eager (torch_reference.py)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  bank = torch.nn.ModuleList(
    torch_reference.multimnist_expert() for _ in range(experts)
  ).train()
  x = torch.rand(batch, 1, 36, 36)

  def step():
    bank.zero_grad(set_to_none=True)
    torch.stack([e(x) for e in bank]).pow(2).sum().backward()

  start = time.perf_counter()
  step()
  warm_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return batch / min(times), warm_s


def main(argv):
  del argv
  batch, num_experts = _BATCH.value, _EXPERTS.value
  print(
    f'{jax.devices()[0].platform}, batch {batch}, {num_experts} experts; '
    'forward+backward of the expert bank'
  )
  torch_rate = None
  if _TORCH.value:
    torch_rate, warm_s = bench_torch(batch, num_experts, _REPEATS.value)
  variants = [
    (
      f'loop, {conv} conv',
      functools.partial(
        experts.ExpertBank, expert_kwargs=factory.expert_modules(conv, 'xla')
      ),
    )
    for conv in config_schema.CONV_IMPLS
  ]
  variants.append(
    (
      'loop, toeplitz, kernel BN',
      functools.partial(
        experts.ExpertBank,
        expert_kwargs=factory.expert_modules('toeplitz', 'kernel'),
      ),
    )
  )
  if _ABLATIONS.value:
    variants += [
      (
        'ablation: no BatchNorm',
        functools.partial(experts.ExpertBank, expert=_AblatedExpert),
      ),
      (
        'ablation: convs+dense',
        functools.partial(
          experts.ExpertBank,
          expert=_AblatedExpert,
          expert_kwargs={'relu_and_pool': False},
        ),
      ),
    ]
  base = None
  for name, make_bank in variants:
    rate, compile_s = bench(make_bank(num_experts), batch, _REPEATS.value)
    base = base or rate
    vs_torch = f'  x{rate / torch_rate:5.2f} vs PyTorch' if torch_rate else ''
    print(
      f'{name:24s} {rate:9.0f} images/s  x{rate / base:5.2f} vs loop'
      f'{vs_torch}  compile {compile_s:5.1f} s',
      flush=True,
    )
  if torch_rate:
    print(
      f'{"pytorch eager":24s} {torch_rate:9.0f} images/s  '
      f'x{torch_rate / base:5.2f} vs loop  x 1.00 vs PyTorch  '
      f'first step {warm_s:5.1f} s'
    )


if __name__ == '__main__':
  cli.run(main)
