"""SIGKILL at several points, restart each time: the end state is the one an
uninterrupted run reaches, bit for bit, and no half-written checkpoint stays.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import multimnist_sample
from dselect_jax import checkpointing
from dselect_jax import factory
from dselect_jax import metric_writers
from dselect_jax import steps
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
  'model.num_experts': 2,
  'model.gate.k': 1,
  'batch_size': 32,
  'eval_batch_size': 200,
  'num_train_steps': 12,
  'log_every_steps': 2,
  'eval_every_steps': 4,
  'checkpoint_every_steps': 2,
  'max_to_keep': 2,
}
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')


def _start(workdir):
  args = [
    sys.executable,
    'train.py',
    '--config=configs/multimnist_sample.py',
    f'--workdir={workdir}',
  ]
  args += [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  return subprocess.Popen(
    args, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )


def _kill_when(proc, condition, timeout=240):
  """SIGKILLs proc as soon as condition() holds; False if it ended first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      return False
    if condition():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.002)
  proc.kill()
  raise AssertionError('condition never met')


def _tmp_entries(workdir):
  found = []
  for sub in ('checkpoints', 'best'):
    folder = os.path.join(workdir, sub)
    if os.path.isdir(folder):
      found += [n for n in os.listdir(folder) if 'tmp' in n]
  return found


def _records(workdir, split):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [
      json.loads(l) for l in f if l.strip() and json.loads(l)['split'] == split
    ]


def _final_arrays(workdir):
  config = multimnist_sample.get_config()
  for key, value in OVERRIDES.items():
    section = config
    *path, last = key.split('.')
    for name in path:
      section = section[name]
    section[last] = value
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, config.num_train_steps)
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  state = ckpts.restore(helpers.abstract_state(config, model, tx))
  return ckpts.latest_step(), jax.device_get(
    (state.step, state.params, state.batch_stats, state.opt_state)
  )


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
  whole = str(tmp_path / 'whole')
  proc = _start(whole)
  assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]

  broken = str(tmp_path / 'broken')
  kills = [
    # While a checkpoint is being written.
    lambda: bool(_tmp_entries(broken)),
    # Right after the first validation was logged.
    lambda: len(_records(broken, 'validation')) >= 2,
    # Mid-interval, after a few more train records.
    lambda: len(_records(broken, 'train')) >= 9,
  ]
  killed = 0
  for condition in kills:
    killed += _kill_when(_start(broken), condition)
  assert killed >= 2  # The kills landed inside the run, not after it.
  proc = _start(broken)
  assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]

  assert _tmp_entries(broken) == []
  step_a, arrays_a = _final_arrays(whole)
  step_b, arrays_b = _final_arrays(broken)
  assert step_a == step_b == 12
  jax.tree.map(np.testing.assert_array_equal, arrays_a, arrays_b)

  # Its metrics read back as the uninterrupted run's: the same records, none
  # twice, with the same losses and accuracies.
  def logged(workdir):
    return [
      (r['split'], r['step'], r.get('loss'), r.get('accuracy_1'))
      for r in metric_writers.read_metrics(workdir)
    ]

  assert logged(broken) == logged(whole)
  assert len(_records(broken, 'train')) > len(_records(whole, 'train'))
