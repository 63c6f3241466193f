"""Training and evaluation speed against PyTorch, in alternating windows.

  python -m benchmarks.train_speed                        # batches 128, 256, 512
  python -m benchmarks.train_speed --batches=256 --rounds=9 --out=FILE.md
  python -m benchmarks.train_speed --modes=eval --contenders=ours,ours_xla,torch_channels_last

The same network on every side: 8 MultiMNIST experts (conv-BN-ReLU-pool x2,
Dense 50 x2), one static DSelect-k gate (k = 2) and one tower per task,
summed cross-entropies, Adam 1e-3, float32. Contenders, each a process of
its own, started one after another and then kept waiting on a pipe:

- ``ours``: the training step train.py runs for ``configs/multimnist.py``
  (``steps.SparseTrainSteps`` at step 0, every expert in use; the CPU
  kernels where ``model.conv``/``model.norm`` 'auto' picks them) on one batch
  that stays on the device; evaluation: the evaluator's ``eval_step``.
- ``ours, train.py loop``: the same step fed as train.py feeds it, by
  ``batching.train_batches`` over a 100,000-image split (gather,
  uint8 -> float, shard, transfer), with the loop's host work (the metrics
  history, read back every ``log_every_steps``): against ``ours`` it shows
  what the input pipeline and the loop cost.
- ``ours_xla``, ``ours_vmap`` and ``ours_unfused`` (not in the default
  set): ``ours`` with XLA's convolution and BatchNorm instead of the CPU
  paths, with the experts as one ``nn.vmap`` (``model.expert_bank='vmap'``,
  XLA's ops), and evaluating expert by expert (``model.fused_eval=False``).
- PyTorch eager NCHW, eager channels_last, and ``torch.compile`` (inductor)
  of the model in NCHW; a line says why where one fails on the machine.
- Freed memory: train.py keeps freed host memory for reuse
  (``--keep_freed_memory``, ``cpu.memory``), and so does every ``ours``
  contender but ``ours_default_malloc``. Each PyTorch contender runs twice,
  with glibc's default malloc and with the same setting (``_keepmem``), and
  the fastest of all six is the baseline.

Each round runs one window of ``--steps`` steps of every contender in turn,
the order rotated from round to round, so a slow minute of a shared machine
hits all of them alike; only one process computes at a time. The table gives
the median images/s over the rounds, the spread (min-max), and the ratio of
medians against the fastest PyTorch row of the same batch and mode, which is
picked after the measurement, never beforehand; the last column is the
median of the process's minor page faults per step over the windows.
``--threads`` (default 2) sets PyTorch's intra-op threads and, through the
CPUs each process may use, XLA's CPU thread pool alike. torch is a
benchmark-only dependency: ``pip install torch==2.13.0``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import flags

from dselect_jax import cli
from dselect_jax.cpu import memory

_BATCHES = flags.DEFINE_list('batches', ['128', '256', '512'], 'Batch sizes.')
_STEPS = flags.DEFINE_integer(
  'steps', 20, 'Steps per timed window.', lower_bound=1
)
_ROUNDS = flags.DEFINE_integer(
  'rounds', 7, 'Windows of each contender.', lower_bound=1
)
_THREADS = flags.DEFINE_integer(
  'threads', 2, 'Threads of each contender.', lower_bound=1
)
_CONTENDERS = flags.DEFINE_list(
  'contenders',
  [
    'ours',
    'ours_loop',
    'torch_nchw',
    'torch_channels_last',
    'torch_compile',
    'torch_nchw_keepmem',
    'torch_channels_last_keepmem',
    'torch_compile_keepmem',
  ],
  'What to time.',
)
_OUT = flags.DEFINE_string('out', None, 'Also write the table here.')
_TORCH_DEVICE = flags.DEFINE_string(
  'torch_device',
  'cpu',
  "Where PyTorch runs: 'cpu' or 'cuda' (JAX runs on its default backend).",
)
_WORKER = flags.DEFINE_string('worker', None, 'Internal: be this contender.')

NAMES = {
  'ours': "ours (train.py's step; the evaluator's)",
  'ours_loop': 'ours, train.py loop (input pipeline + host work)',
  'ours_xla': "ours with XLA's convolution and BatchNorm (model.conv=xla, norm=xla)",
  'ours_vmap': 'ours, experts as one nn.vmap (model.expert_bank=vmap)',
  'ours_unfused': 'ours, evaluation expert by expert (model.fused_eval=False)',
  'ours_toeplitz': 'ours, Toeplitz convolutions (model.conv=toeplitz)',
  'ours_direct': "ours, the kernels' direct convolutions (model.conv=kernel)",
  'torch_nchw': 'PyTorch eager, NCHW',
  'torch_channels_last': 'PyTorch eager, channels_last',
  'torch_compile': 'PyTorch torch.compile (inductor), NCHW',
  'ours_default_malloc': "ours with glibc's default malloc (--nokeep_freed_memory)",
}
# Every PyTorch contender also runs with freed memory kept, as ours does.
for _name in [n for n in NAMES if n.startswith('torch_')]:
  NAMES[_name + '_keepmem'] = NAMES[_name] + ', freed memory kept'

_MODES = flags.DEFINE_list('modes', ['train', 'eval'], 'What to time.')


# ---------------------------------------------------------------------------
# Workers: build, warm up, then run windows on request.
# ---------------------------------------------------------------------------


def jax_worker(batches, loop: bool, variant: str = ''):
  """{(mode, batch): run(n)} for our train and eval steps. XLA:CPU sizes
  its thread pool by the CPUs worker_main leaves the process."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import multimnist  # pylint: disable=g-import-not-at-top
  from dselect_jax import datasets  # pylint: disable=g-import-not-at-top
  from dselect_jax import factory  # pylint: disable=g-import-not-at-top
  from dselect_jax import steps  # pylint: disable=g-import-not-at-top
  from dselect_jax.datasets import batching  # pylint: disable=g-import-not-at-top

  config = multimnist.get_config()
  with config.unlocked():
    if variant == 'xla':
      config.model.conv = config.model.norm = 'xla'
    elif variant == 'vmap':
      config.model.expert_bank = 'vmap'
    elif variant == 'unfused':
      config.model.fused_eval = False
    elif variant == 'toeplitz':
      config.model.conv = 'toeplitz'
    elif variant == 'direct':
      config.model.conv = 'kernel'
  spec = datasets.resolve(config.data).spec
  model = factory.create_model(config, spec, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, 100_000)
  devices = jax.local_device_count()
  rng = np.random.default_rng(0)
  runs = {}
  info = {
    'conv': factory.conv_impl(config),
    'norm': factory.norm_impl(config),
    'devices': devices,
  }
  p_eval = steps.parallel(functools.partial(steps.eval_step, model))
  split = datasets.multimnist.Split(
    images=rng.integers(0, 256, (100_000, 36, 36), np.uint8),
    labels=rng.integers(0, 10, (100_000, 2)).astype(np.int32),
  )
  for batch in batches:
    holder = {
      'state': steps.replicate(
        factory.initial_state(model, tx, jax.random.key(0), spec)
      ),
      'step': 0,
    }
    p_train = steps.SparseTrainSteps(model, config, spec.task_kinds)(
      holder['state'], 0
    )
    key = jax.random.key(1)
    per_device = batch // devices
    fixed = jax.device_put(
      {
        'image': rng.random((devices, per_device, 36, 36, 1), np.float32),
        'target': rng.integers(0, 10, (devices, per_device, 2)).astype(
          np.int32
        ),
        'weight': np.ones((devices, per_device, 2), np.float32),
      }
    )
    eval_batch = dict(
      fixed, mask=jax.device_put(np.ones((devices, per_device)))
    )
    batches_iter = batching.train_batches(split, batch, devices, seed=0)

    def train(
      n, p_train=p_train, holder=holder, fixed=fixed, key=key, it=batches_iter
    ):
      history = []
      for _ in range(n):
        data = next(it) if loop else fixed
        holder['state'], metrics = p_train(holder['state'], data, key)
        holder['step'] += 1
        if loop:  # train.py's host work: the history, read every log step.
          history.append(metrics)
          if holder['step'] % config.log_every_steps == 0:
            for m in history:  # The device-to-host reads of a log step.
              jax.tree.map(lambda x: float(np.asarray(x)[0]), m)
            history = []
      jax.block_until_ready(holder['state'])

    def evaluate(n, holder=holder, eval_batch=eval_batch):
      for _ in range(n):
        out = p_eval(holder['state'], eval_batch)
      jax.block_until_ready(out)

    runs['train', batch] = train
    if not loop:
      runs['eval', batch] = evaluate
  return runs, info


def torch_worker(batches, variant: str, threads: int, device: str):
  """{(mode, batch): run(n)} for PyTorch on ``device``."""
  import torch  # pylint: disable=g-import-not-at-top

  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = torch_reference.MultiMNISTMoE().to(device)
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  memory = torch.contiguous_format
  if variant == 'channels_last':
    memory = torch.channels_last
    model = model.to(memory_format=memory)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  forward = torch.compile(model) if variant == 'compile' else model
  loss_fn = torch.nn.CrossEntropyLoss()
  runs = {}
  for batch in batches:
    x = torch.rand(batch, 1, 36, 36, device=device)
    x = x.contiguous(memory_format=memory)
    y = torch.randint(0, 10, (batch, 2), device=device)

    def train(n, x=x, y=y):
      model.train()
      for _ in range(n):
        opt.zero_grad(set_to_none=True)
        logits = forward(x)
        loss = loss_fn(logits[0], y[:, 0]) + loss_fn(logits[1], y[:, 1])
        loss.backward()
        opt.step()
      sync()

    def evaluate(n, x=x):
      model.eval()
      with torch.no_grad():
        for _ in range(n):
          forward(x)
      sync()

    runs['train', batch] = train
    runs['eval', batch] = evaluate
  return runs, {
    'threads': torch.get_num_threads(),
    'torch': torch.__version__,
    'device': device,
  }


def worker_main(name: str, batches, threads: int, torch_device: str):
  """Builds, warms every run up (compilation), says ready, then serves
  ``MODE BATCH STEPS`` lines with the seconds they took."""
  # The same cores for every contender: XLA:CPU sizes its thread pool by
  # the CPUs this process may use, PyTorch takes set_num_threads.
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) > threads:
    os.sched_setaffinity(0, cpus[:threads])
  # train.py's --keep_freed_memory (its default), before any allocation
  # of the contender's own.
  keep = name.endswith('_keepmem') or (
    name.startswith('ours') and name != 'ours_default_malloc'
  )
  info = {'keep_freed_memory': keep and memory.keep_freed_memory()}
  try:
    if name.startswith('ours'):
      plain = name in ('ours_loop', 'ours_default_malloc')
      runs, more = jax_worker(
        batches, name == 'ours_loop', '' if plain else name[len('ours_') :]
      )
    else:
      runs, more = torch_worker(
        batches,
        name.removeprefix('torch_').removesuffix('_keepmem'),
        threads,
        torch_device,
      )
    info.update(more)
    start = time.perf_counter()
    for run in runs.values():
      run(2)
    info['warmup_s'] = round(time.perf_counter() - start, 1)
    if name.startswith('ours'):
      import jax  # pylint: disable=g-import-not-at-top

      info['jax'] = f'{jax.__version__} on {jax.devices()[0].device_kind}'
  except Exception as e:  # pylint: disable=broad-except
    print(json.dumps({'error': f'{type(e).__name__}: {e}'.splitlines()[0]}))
    return
  print(json.dumps({'ready': True, **info}), flush=True)
  for line in sys.stdin:
    mode, batch, n = line.split()
    key = (mode, int(batch))
    if key not in runs:
      print(json.dumps({'seconds': None}), flush=True)
      continue
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    runs[key](int(n))
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
      json.dumps(
        {
          'seconds': seconds,
          'peak_rss_mb': usage.ru_maxrss / 1024,
          'faults_per_step': (usage.ru_minflt - faults) / int(n),
        }
      ),
      flush=True,
    )


# ---------------------------------------------------------------------------
# The parent: alternate windows, then the table.
# ---------------------------------------------------------------------------


class Worker:
  def __init__(self, name, batches, threads):
    self.name = name
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    self.proc = subprocess.Popen(
      [
        sys.executable,
        '-m',
        'benchmarks.train_speed',
        f'--worker={name}',
        f'--batches={",".join(map(str, batches))}',
        f'--threads={threads}',
        f'--torch_device={_TORCH_DEVICE.value}',
      ],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
      cwd=root,
      env=env,
    )
    self.info = self._read()
    self.error = self.info.get('error')

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith('{'):
        return json.loads(line)
    return {'error': f'exited with status {self.proc.wait()}'}

  def window(self, mode, batch, steps):
    self.proc.stdin.write(f'{mode} {batch} {steps}\n')
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait()


def table(rates, workers, batches, faults):
  lines = [
    '| batch | mode | contender | median img/s | min-max | x fastest PyTorch '
    '| page faults / step |',
    '| --- | --- | --- | --- | --- | --- | --- |',
  ]
  for batch in batches:
    for mode in _MODES.value:
      rows = {
        w.name: rates[w.name, mode, batch]
        for w in workers
        if rates.get((w.name, mode, batch))
      }
      torch_rows = [
        statistics.median(r) for n, r in rows.items() if 'torch' in n
      ]
      fastest = max(torch_rows) if torch_rows else float('nan')
      for name, r in rows.items():
        med = statistics.median(r)
        lines.append(
          f'| {batch} | {mode} | {NAMES[name]} | {med:.0f} | '
          f'{min(r):.0f}-{max(r):.0f} | {med / fastest:.2f} | '
          f'{statistics.median(faults[name, mode, batch]):.0f} |'
        )
  return lines


def main(argv):
  del argv
  batches = cli.positive_ints('batches', _BATCHES.value)
  cli.output_file('out', _OUT.value)
  if _WORKER.value:
    worker_main(_WORKER.value, batches, _THREADS.value, _TORCH_DEVICE.value)
    return
  workers, failed = [], []
  for name in _CONTENDERS.value:
    w = Worker(name, batches, _THREADS.value)
    print(f'{NAMES[name]}: {w.error or w.info}', flush=True)
    (failed if w.error else workers).append(w)
  rates, faults = {}, {}
  for r in range(_ROUNDS.value):
    order = workers[r % len(workers) :] + workers[: r % len(workers)]
    for batch in batches:
      for mode in _MODES.value:
        for w in order:
          out = w.window(mode, batch, _STEPS.value)
          if out.get('seconds'):
            rates.setdefault((w.name, mode, batch), []).append(
              batch * _STEPS.value / out['seconds']
            )
            faults.setdefault((w.name, mode, batch), []).append(
              out['faults_per_step']
            )
    print(f'round {r + 1}/{_ROUNDS.value} done', flush=True)
  for w in workers:
    w.close()
  lines = [
    f'{os.cpu_count()} CPUs; {_THREADS.value} threads each; {_ROUNDS.value} '
    f'rounds of {_STEPS.value}-step windows, alternating.',
    '',
    *table(rates, workers, batches, faults),
    '',
    *(f'{NAMES[w.name]}: {w.info}' for w in workers),
    *(f'{NAMES[w.name]}: failed: {w.error}' for w in failed),
  ]
  text = '\n'.join(lines) + '\n'
  print(text)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(
        f'$ python -m benchmarks.train_speed {" ".join(sys.argv[1:])}\n\n'
      )
      f.write(text)


if __name__ == '__main__':
  cli.run(main)
