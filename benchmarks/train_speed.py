"""Training and eval throughput of the MultiMNIST MoE: ours against PyTorch.

  python benchmarks/train_speed.py                      # table to stdout
  python benchmarks/train_speed.py --out=results/train_speed.md

The same network on both sides: 8 MultiMNIST experts (conv-BN-ReLU-pool x2,
Dense 50 x2), two static DSelect-k gates (k = 2), two towers, summed
cross-entropies, Adam. Each framework runs in its own subprocess (so its peak
memory is its own), one after the other, on random images; times are warm
(after compilation), best of --repeats windows of --steps steps.

Ours is the real training step of dselect_jax.trainer, mapped over the
devices as the trainer maps it (jit(vmap) on one device, pmap over N when
--cpu_devices lists N > 1; tables written before 2026-11-30 used pmap on one
device as well, 1.19x slower on the 2-core CPU by results/data_parallel.txt),
with the experts (and each
convolution of --convs and each BatchNorm-ReLU-pool of --norms); PyTorch is
eager mode on --torch_device (torch is an optional, benchmark-only
dependency: pip install torch==2.13.0). On a GPU, JAX runs there by default;
pass --torch_device=cuda and more --steps (a window should last well past
the launch overhead). Achieved GFLOP/s uses
2.03 MFLOP per expert per image forward (conv1 0.51, conv2 1.44, dense 0.08)
and 3x forward for a training step; the machine's rate is a float32 matmul
measured in the same command.
"""

import functools
import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

_BATCHES = flags.DEFINE_list('batches', ['128', '256', '512'], 'Batch sizes.')
_STEPS = flags.DEFINE_integer(
  'steps',
  30,
  'Steps per timed window (10-step windows understated our '
  'step on the 2-core CPU: results/train_speed_mapping.md).',
)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed windows; best is kept.')
_CHILD = flags.DEFINE_string('child', None, 'Internal: run one framework.')
_IMPL = flags.DEFINE_string('impl', 'loop', 'Internal: our expert impl.')
_CONV = flags.DEFINE_string(
  'conv', 'xla', "Internal: our loop experts' convolution."
)
_NORM = flags.DEFINE_string(
  'norm', 'xla', "Internal: our loop experts' BatchNorm-ReLU-pool blocks."
)
_OUT = flags.DEFINE_string('out', None, 'Also write the table here.')
_CPU_DEVICES = flags.DEFINE_list(
  'cpu_devices',
  ['1'],
  'Also time ours with the CPU split into this many XLA devices '
  '(--xla_force_host_platform_device_count; the trainer pmaps over them, '
  'each device gets batch / N).',
)
_TORCH_DEVICE = flags.DEFINE_string(
  'torch_device', 'cpu', 'Where PyTorch runs: cpu or cuda.'
)
_IMPLS = flags.DEFINE_list(
  'impls',
  ['loop'],
  "Our expert implementations to time: 'loop' (one module per expert; "
  'the fused implementations are gone).',
)
_CONVS = flags.DEFINE_list(
  'convs',
  ['xla', 'toeplitz'],
  'Convolutions of the "loop" experts to time (see factory.CONV_IMPLS).',
)
_NORMS = flags.DEFINE_list(
  'norms',
  ['xla', 'kernel'],
  'BatchNorm-ReLU-pool blocks of the "loop" experts '
  'to time (see factory.NORM_IMPLS).',
)

NUM_EXPERTS = 8
FWD_FLOP_PER_EXPERT = 2.03e6


def _best_rate(run, batch, steps, repeats):
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    run(steps)
    best = max(best, batch * steps / (time.perf_counter() - start))
  return best


def child_jax(batch, steps, repeats, impl, conv, norm, devices):
  if devices > 1:
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + ' --xla_'
      f'force_host_platform_device_count={devices}'
    )
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import multimnist  # pylint: disable=g-import-not-at-top
  from dselect_jax import factory  # pylint: disable=g-import-not-at-top
  from dselect_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top

  config = multimnist.get_config()
  del impl  # One expert implementation now: a module per expert.
  config.model.conv = conv
  config.model.norm = norm
  model = factory.create_model(config, bn_axis_name=steps_lib.AXIS)
  tx = factory.create_optimizer(config, 1000)
  assert jax.local_device_count() == devices, jax.devices()
  state = steps_lib.replicate(
    factory.initial_state(config, model, tx, jax.random.key(0))
  )
  rng = np.random.default_rng(0)
  per_device = batch // devices
  batch_data = {
    'image': rng.random((devices, per_device, 36, 36, 1), np.float32),
    'label': rng.integers(0, 10, (devices, per_device, 2)).astype(np.int32),
  }
  eval_data = dict(batch_data, mask=np.ones((devices, per_device), np.float32))
  # Mapped over the devices as the trainer maps them (steps_lib.parallel).
  p_train = steps_lib.parallel(
    functools.partial(steps_lib.train_step, loss_config=config.loss),
    in_axes=(0, 0, None),
    donate_argnums=(0,),
  )
  p_eval = steps_lib.parallel(functools.partial(steps_lib.eval_step, model))
  key = jax.random.key(1)
  start = time.perf_counter()
  state, metrics = p_train(state, batch_data, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  holder = {'state': state}

  def train(n):
    for _ in range(n):
      holder['state'], m = p_train(holder['state'], batch_data, key)
    jax.block_until_ready(m)

  def evaluate(n):
    for _ in range(n):
      out = p_eval(holder['state'], eval_data)
    jax.block_until_ready(out)

  evaluate(1)
  return {
    'train': _best_rate(train, batch, steps, repeats),
    'eval': _best_rate(evaluate, batch, steps, repeats),
    'compile_s': compile_s,
  }


def child_torch(batch, steps, repeats, device):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  device = torch.device(device)

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  class DSelectK(nn.Module):
    """Static DSelect-k gate (the paper's equations)."""

    def __init__(self, num_experts, k, gamma=1.0):
      super().__init__()
      m = (num_experts - 1).bit_length()
      self.gamma = gamma
      self.z = nn.Parameter(
        torch.empty(k, m).uniform_(-gamma / 100, gamma / 100)
      )
      self.w = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))
      codes = [
        [(i >> (m - 1 - j)) & 1 for j in range(m)] for i in range(num_experts)
      ]
      self.register_buffer('codes', torch.tensor(codes, dtype=torch.bool))

    def forward(self):
      g = self.gamma
      t = self.z
      s = torch.where(
        t <= -g / 2,
        torch.zeros_like(t),
        torch.where(
          t >= g / 2,
          torch.ones_like(t),
          -2 / g**3 * t**3 + 3 / (2 * g) * t + 0.5,
        ),
      )
      s = s[:, None, :]
      r = torch.where(self.codes[None], s, 1 - s).prod(-1)  # (K, E)
      return (torch.softmax(self.w, 0)[:, None] * r).sum(0)  # (E,)

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.experts = nn.ModuleList(
        torch_reference.multimnist_expert() for _ in range(NUM_EXPERTS)
      )
      self.gates = nn.ModuleList(DSelectK(NUM_EXPERTS, 2) for _ in range(2))
      self.towers = nn.ModuleList(
        nn.Sequential(
          nn.Linear(50, 50),
          nn.ReLU(),
          nn.Linear(50, 50),
          nn.ReLU(),
          nn.Linear(50, 10),
        )
        for _ in range(2)
      )

    def forward(self, x):
      f = torch.stack([e(x) for e in self.experts])  # (E, B, H)
      return [
        tower(torch.einsum('e,ebh->bh', gate(), f))
        for gate, tower in zip(self.gates, self.towers)
      ]

  torch.manual_seed(0)
  model = Model().to(device)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.rand(batch, 1, 36, 36, device=device)
  y = torch.randint(0, 10, (batch, 2), device=device)
  loss_fn = nn.CrossEntropyLoss()

  def train(n):
    model.train()
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      logits = model(x)
      loss = loss_fn(logits[0], y[:, 0]) + loss_fn(logits[1], y[:, 1])
      loss.backward()
      opt.step()
    sync()

  def evaluate(n):
    model.eval()
    with torch.no_grad():
      for _ in range(n):
        model(x)
    sync()

  start = time.perf_counter()
  train(1)
  warm_s = time.perf_counter() - start
  return {
    'train': _best_rate(train, batch, steps, repeats),
    'eval': _best_rate(evaluate, batch, steps, repeats),
    'compile_s': warm_s,
    'threads': torch.get_num_threads(),
  }


def matmul_gflops():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  n = 2048
  a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
  return {
    'gflops': 2 * n**3 / best / 1e9,
    'device': f'{jax.default_backend()}: {jax.devices()[0].device_kind}',
  }


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _run_child(name, batch, impl='loop', conv='xla', norm='xla', devices=1):
  cmd = [
    sys.executable,
    __file__,
    f'--child={name}',
    f'--impl={impl}',
    f'--conv={conv}',
    f'--norm={norm}',
    f'--cpu_devices={devices}',
    f'--torch_device={_TORCH_DEVICE.value}',
    f'--batches={batch}',
    f'--steps={_STEPS.value}',
    f'--repeats={_REPEATS.value}',
  ]
  out = subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    check=False,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  if out.returncode:
    return {'error': out.stderr.strip().splitlines()[-1]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    batch = int(_BATCHES.value[0])
    if _CHILD.value == 'torch':
      result = child_torch(
        batch, _STEPS.value, _REPEATS.value, _TORCH_DEVICE.value
      )
    elif _CHILD.value == 'matmul':
      result = matmul_gflops()
    else:
      result = child_jax(
        batch,
        _STEPS.value,
        _REPEATS.value,
        _IMPL.value,
        _CONV.value,
        _NORM.value,
        int(_CPU_DEVICES.value[0]),
      )
    result['peak_rss_mb'] = (
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps(result))
    return

  matmul = _run_child('matmul', 256)
  peak = matmul['gflops']
  lines = [
    f'# Training throughput, MultiMNIST MoE (8 experts, 2 DSelect-k '
    f'gates), {os.cpu_count()} CPUs, JAX on {matmul["device"]}',
    '',
    f'float32 matmul (2048^2, XLA): {peak:.0f} GFLOP/s',
    '',
    '| batch | implementation | train img/s | x PyTorch | train '
    'GFLOP/s | % of matmul | eval img/s | x PyTorch | compile s | '
    'peak RSS MB |',
    '|' + ' --- |' * 10,
  ]
  options = lambda flag, impl: flag.value
  variants = [
    (impl, conv, norm, n)
    for impl in _IMPLS.value
    for conv in options(_CONVS, impl)
    for norm in options(_NORMS, impl)
    for n in map(int, _CPU_DEVICES.value)
  ]
  for batch in map(int, _BATCHES.value):
    torch_result = _run_child('torch', batch)

    def add_row(name, r, batch=batch, torch_result=torch_result):
      """Formats one measurement and prints it at once."""
      if 'error' in r:
        lines.append(f'| {batch} | {name} | error: {r["error"]} |')
      else:
        flops = r['train'] * 3 * NUM_EXPERTS * FWD_FLOP_PER_EXPERT / 1e9
        tr = r['train'] / torch_result.get('train', float('nan'))
        ev = r['eval'] / torch_result.get('eval', float('nan'))
        lines.append(
          f'| {batch} | {name} | {r["train"]:.0f} | {tr:.2f} | '
          f'{flops:.1f} | {100 * flops / peak:.0f}% | '
          f'{r["eval"]:.0f} | {ev:.2f} | {r["compile_s"]:.1f} | '
          f'{r["peak_rss_mb"]:.0f} |'
        )
      print(lines[-1], flush=True)

    add_row(f'pytorch eager ({_TORCH_DEVICE.value})', torch_result)
    for impl, conv, norm, n in variants:
      add_row(
        f'ours: {impl}'
        + (f', {conv} conv, {norm} BN' if impl == 'loop' else '')
        + (f', {n} CPU devices' if n > 1 else ''),
        _run_child('jax', batch, impl, conv, norm, n),
      )
  text = '\n'.join(lines) + '\n'
  print(text)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(f'$ python {" ".join(sys.argv)}\n\n')
      f.write(text)


if __name__ == '__main__':
  app.run(main)
