"""train.py --multihost: two processes on this machine, talking through
jax.distributed (gloo collectives on CPU), against one process.

The two processes of 2 CPU devices each train the same 4 devices as the
test process does on its own (conftest.py: 4 fake devices), with the same
global batch: each process feeds its half, each device the same 8 rows as
in the single-process run. So parameters, BatchNorm statistics and test
accuracy must agree to float rounding; a process feeding the wrong rows,
or not averaging across processes, would not.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import multimnist_sample
from dselect_jax import checkpointing
from dselect_jax import factory
from dselect_jax import steps
from dselect_jax import trainer
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _override_flags(config, base) -> list[str]:
  """``--config.a.b=value`` for every field where ``config`` differs from
  ``base``."""

  def flat(d, prefix=''):
    for key, value in d.items():
      if isinstance(value, dict):
        yield from flat(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value

  base = dict(flat(base.to_dict()))
  return [
    f'--config.{k}={v}' for k, v in flat(config.to_dict()) if base[k] != v
  ]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _train_on_two_processes(config, workdir, logs):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  # Logs to files: a full stderr pipe would stall a process.
  paths = [os.path.join(logs, f'process_{i}.log') for i in range(2)]
  procs = []
  for i, path in enumerate(paths):
    with open(path, 'w') as log:
      procs.append(
        subprocess.Popen(
          [
            sys.executable,
            'train.py',
            '--config=configs/multimnist_sample.py',
            f'--workdir={workdir}',
            '--multihost',
            f'--coordinator_address=localhost:{port}',
            '--num_processes=2',
            f'--process_id={i}',
          ]
          + _override_flags(config, multimnist_sample.get_config()),
          cwd=REPO,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
        )
      )
  # A process that fails leaves the other waiting for it: stop both.
  deadline = time.time() + 400
  while any(p.poll() is None for p in procs) and time.time() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.5)
  for p in procs:
    if p.poll() is None:
      p.kill()
  codes = [p.wait() for p in procs]
  assert codes == [0, 0], '\n\n'.join(
    f'process {i} ({code}):\n{open(path).read()[-3000:]}'
    for i, (code, path) in enumerate(zip(codes, paths))
  )


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  assert jax.local_device_count() == 4
  # SGD: Adam's first steps move every parameter by about +-lr whatever the
  # size of its gradient, and the convolutions' biases (followed by
  # BatchNorm) have gradients of pure float noise, which differs between
  # the two runs; SGD keeps such differences as small as they are.
  config = helpers.tiny_config(
    **{'optimizer.name': 'sgd', 'optimizer.learning_rate': 0.05}
  )
  one = str(tmp_path / 'one')
  expected = trainer.train_and_evaluate(config, one)
  two = str(tmp_path / 'two')
  _train_on_two_processes(config, two, str(tmp_path))

  # Both workdirs' checkpoints restore here, in one process: the multi-host
  # one was saved as arrays replicated over the 4 devices of 2 processes.
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, config.num_train_steps)
  abstract = helpers.abstract_state(config, model, tx)
  states = []
  for workdir in (one, two):
    ckpts = checkpointing.Checkpoints(workdir, create=False)
    assert ckpts.all_steps() == [3, 6]
    states.append(jax.device_get(ckpts.restore(abstract)))
  assert int(states[1].step) == 6
  arrays = lambda s: (s.params, s.batch_stats, s.opt_state)
  helpers.assert_states_close(arrays(states[0]), arrays(states[1]), 1e-5)
  # The parameters did move: the comparison above is not of two inits.
  first_kernel = lambda s: jax.tree.leaves(s.params)[0]
  init = helpers.initial_state(config, model, tx, jax.random.key(config.seed))
  assert np.abs(first_kernel(states[1]) - first_kernel(init)).max() > 1e-3

  # Process 0 alone wrote the results: the test split, 500 rows a process.
  with open(os.path.join(two, 'test_metrics.json')) as f:
    got = json.load(f)
  assert got['num_examples'] == expected['num_examples'] == 1000
  for key in ('accuracy_1', 'accuracy_2'):  # At most 1 of 1000 flips.
    assert abs(got[key] - expected[key]) <= 0.001, key
  assert got['step'] == expected['step']
