"""The training loop: data parallelism, resume, eval, configs and the CLI.

Runs on the 4 fake CPU devices set up in conftest.py.
"""

import functools
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import flags
from conftest import assert_png
import flax
import jax
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import multimnist
from configs import multimnist_sample
from dselect_jax import checkpointing
from dselect_jax import config_schema
from dselect_jax import cpu
from dselect_jax import datasets
from dselect_jax import evaluate
from dselect_jax import factory
from dselect_jax import metric_writers
from dselect_jax import provenance
from dselect_jax import steps
from dselect_jax import trainer
from dselect_jax.cpu import kernels as cpu_kernels
from dselect_jax.datasets import batching
from tests import helpers

# MultiMNIST's tasks (``multimnist.spec``): two digit classifications.
KINDS = ('classification', 'classification')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  'gate,per_example',
  [
    ('dselect_k', False),
    pytest.param('dselect_k', True, marks=pytest.mark.slow),
    pytest.param('softmax', False, marks=pytest.mark.slow),
  ],
)
def test_pmap_step_equals_single_device_step(gate, per_example):
  # SGD, not Adam: the conv biases feed BatchNorm, so their true gradient is
  # 0 and float noise is all they get; Adam's first step would blow that
  # noise up to +-learning_rate, SGD keeps it at noise.
  config = helpers.tiny_config(
    **{
      'model.gate.name': gate,
      'model.gate.per_example': per_example,
      'loss.entropy_weight': 0.1,
      'optimizer.name': 'sgd',
      'optimizer.learning_rate': 0.1,
    }
  )
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, 10)
  state = helpers.initial_state(config, model, tx, jax.random.key(0))
  split = helpers.sample('train')
  batch = next(batching.train_batches(split, 16, 1, seed=0))
  rng = jax.random.key(1)
  step = functools.partial(
    steps.train_step, loss_config=config.loss, task_kinds=KINDS
  )

  results = []
  for n in (1, 4):
    devices = jax.devices()[:n]
    p_step = jax.pmap(
      step, axis_name=steps.AXIS, in_axes=(0, 0, None), devices=devices
    )
    sharded = jax.tree.map(
      lambda x: x.reshape((n, 16 // n) + x.shape[2:]), batch
    )
    new_state, metrics = p_step(
      flax.jax_utils.replicate(state, devices), sharded, rng
    )
    # All replicas agree.
    for leaf in jax.tree.leaves((new_state.params, new_state.batch_stats)):
      np.testing.assert_array_equal(leaf[0], leaf[-1])
    results.append(
      jax.tree.map(
        lambda x: np.asarray(x)[0],
        (new_state.params, new_state.batch_stats, new_state.opt_state, metrics),
      )
    )
  # What the trainer maps on a single device: jit(vmap) over an axis of
  # size 1.
  alone = steps.one_device(  # pylint: disable=protected-access
    step, in_axes=(0, 0, None)
  )
  new_state, metrics = alone(
    jax.tree.map(lambda x: np.asarray(x)[None], state), batch, rng
  )
  results.append(
    jax.tree.map(
      lambda x: np.asarray(x)[0],
      (new_state.params, new_state.batch_stats, new_state.opt_state, metrics),
    )
  )
  single, multi, one_device = results

  for other in (multi, one_device):
    helpers.assert_states_close(single, other, rtol=2e-4)
  # The step moved the parameters and the BatchNorm statistics.
  moved = jax.tree.map(
    lambda a, b: np.max(np.abs(a - b)), single[0], jax.device_get(state.params)
  )
  assert max(jax.tree.leaves(moved)) > 1e-4
  assert np.any(single[1]['experts']['expert_0']['BatchNorm_0']['mean'] != 0)


def test_the_mapped_step_compiles_once_for_the_replicated_state():
  """On the four devices, the train step compiled for steps.replicate's
  state runs on its own outputs without compiling again. (It did compile
  again for flax.jax_utils.replicate's, whose mesh axis has another name.)
  Counted as lowerings to MLIR, which a warm persistent compilation cache
  does not skip."""
  config = helpers.tiny_config()
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, 10)
  state = helpers.initial_state(config, model, tx, jax.random.key(0))
  split = helpers.sample('train')
  batch = next(batching.train_batches(split, 16, 4, seed=0))
  step = steps.parallel(  # pylint: disable=protected-access
    functools.partial(
      steps.train_step, loss_config=config.loss, task_kinds=KINDS
    ),
    in_axes=(0, 0, None),
    donate_argnums=(0,),
  )
  replicated = steps.replicate(state)
  for got, want in zip(jax.tree.leaves(replicated), jax.tree.leaves(state)):
    assert got.shape == (4,) + np.shape(want)
    for copy in np.asarray(got):
      np.testing.assert_array_equal(copy, want)

  lowerings = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/jaxpr_to_mlir_module_duration':
      lowerings.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    replicated, _ = step(replicated, batch, jax.random.key(1))
    assert lowerings  # The listener hears the first call's compilation.
    del lowerings[:]
    for _ in range(2):
      replicated, metrics = step(replicated, batch, jax.random.key(1))
    jax.block_until_ready(metrics)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not lowerings
  np.testing.assert_array_equal(np.asarray(replicated.step), [3, 3, 3, 3])


class _Crash(Exception):
  pass


def _crashing_batches(crash_after):
  real = batching.train_batches

  def batches(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == crash_after:
        raise _Crash()
      yield batch

  return batches


def _restore_latest(workdir, config):
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, config.num_train_steps)
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  return ckpts.latest_step(), ckpts.restore(
    helpers.abstract_state(config, model, tx)
  )


@pytest.mark.slow  # For the 5-minute default run.
def test_interrupted_run_resumes_to_the_same_state(tmp_path, monkeypatch):
  config = helpers.tiny_config()
  whole = str(tmp_path / 'whole')
  trainer.train_and_evaluate(config, whole)

  broken = str(tmp_path / 'broken')
  with monkeypatch.context() as m:
    # Dies while fetching the 5th batch: the last checkpoint is step 3.
    m.setattr(batching, 'train_batches', _crashing_batches(4))
    with pytest.raises(_Crash):
      trainer.train_and_evaluate(config, broken)
  assert checkpointing.Checkpoints(broken, create=False).latest_step() == 3
  resumed_result = trainer.train_and_evaluate(config, broken)

  step_a, state_a = _restore_latest(whole, config)
  step_b, state_b = _restore_latest(broken, config)
  assert step_a == step_b == 6
  arrays = lambda s: jax.device_get(
    (s.step, s.params, s.batch_stats, s.opt_state)
  )
  jax.tree.map(np.testing.assert_array_equal, arrays(state_a), arrays(state_b))
  with open(os.path.join(whole, 'test_metrics.json')) as f:
    assert json.load(f)['accuracy_1'] == resumed_result['accuracy_1']
  # run_info.json: one record per start, the resume's at step 3.
  assert [s['start_step'] for s in provenance.read(broken)] == [0, 3]
  assert [s['start_step'] for s in provenance.read(whole)] == [0]


@pytest.fixture
def sample_run(tiny_run):
  """A short run of the tiny config, finished and tested (conftest's
  tiny_run, shared by the session: read only)."""
  return tiny_run


@pytest.mark.slow
def test_sample_config_learns(tmp_path):
  """The quick-start config as README runs it (4 epochs of the sample)."""
  result = trainer.train_and_evaluate(
    multimnist_sample.get_config(), str(tmp_path)
  )
  assert result['num_examples'] == 1000
  # Chance is 0.1 per task.
  assert result['accuracy_1'] > 0.6 and result['accuracy_2'] > 0.5


def test_eval_reproduces_the_trainers_test_metrics(sample_run):
  workdir, result = sample_run
  evaluated = evaluate.evaluate_workdir(workdir)
  assert evaluated['checkpoint'] == 'best'
  for key in (
    'step',
    'accuracy_1',
    'accuracy_2',
    'loss_1',
    'loss_2',
    'expert_weights',
    'selected_experts',
  ):
    assert evaluated[key] == result[key], key


@pytest.mark.slow  # For the 5-minute default run.
def test_eval_cli_writes_results_and_plots(sample_run, tmp_path):
  workdir, result = sample_run
  out_dir = str(tmp_path / 'out')
  out = subprocess.run(
    [
      sys.executable,
      'eval.py',
      f'--workdir={workdir}',
      '--best',
      f'--out_dir={out_dir}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert f'accuracy {result["accuracy_1"]:.6f}' in out.stdout
  stem = os.path.join(out_dir, f'test_best_{result["step"]}')
  with open(stem + '.json') as f:
    assert json.load(f)['accuracy_2'] == result['accuracy_2']
  # plots.py: figsize (4 per task, 3) and (10, 3.5) inches at 100 dpi.
  assert_png(stem + '_expert_weights.png', 800, 300)
  assert_png(os.path.join(out_dir, 'training_curves.png'), 1000, 350)
  # (5 per task, 3.2) inches: the static gates' weights at each log step.
  assert_png(
    os.path.join(out_dir, 'expert_weights_over_training.png'), 1000, 320
  )
  assert not os.path.exists(os.path.join(workdir, 'eval'))


@pytest.mark.parametrize('after_s', [0.3, 2.5])
def test_ctrl_c_stops_eval_in_one_line_and_it_writes_nothing(
  sample_run, tmp_path, after_s
):
  """Ctrl-C while JAX loads (0.3 s) or while the checkpoint is restored and
  evaluated (2.5 s; the evaluation takes longer than that here)."""
  workdir, _ = sample_run
  out_dir = tmp_path / 'out'
  proc = subprocess.Popen(
    [sys.executable, 'eval.py', f'--workdir={workdir}', f'--out_dir={out_dir}'],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(after_s)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-2000:]
  assert 'Traceback' not in err
  assert err.strip().splitlines()[-1] == (
    'stopped: SIGINT; eval.py wrote nothing.'
  )
  assert not out_dir.exists() or not list(out_dir.iterdir())


@pytest.mark.slow
def test_eval_reads_the_data_from_another_folder(
  tmp_path, data_dir, monkeypatch
):
  """A workdir whose config names a data folder this machine does not have:
  eval.py says so and how to fix it; --data_dir evaluates on the data moved
  elsewhere, with the trainer's own test metrics."""
  # A private cache of built data sets, so the raw files are really read.
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  config = helpers.tiny_config(
    num_train_steps=3,
    **{
      'data.name': 'multi_mnist',
      'data.data_dir': data_dir,
      'data.download': False,
      'eval_batch_size': 2000,
    },
  )
  workdir = str(tmp_path / 'w')
  result = trainer.train_and_evaluate(config, workdir)
  # The data "were" in a folder that is gone; they now live in moved/.
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  saved['data']['data_dir'] = str(tmp_path / 'gone')
  with open(path, 'w') as f:
    json.dump(saved, f)
  moved = tmp_path / 'moved'
  shutil.copytree(os.path.join(data_dir, 'mnist'), moved / 'mnist')
  # From here on an empty cache: the data must come from a data folder.
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache2'))

  out = subprocess.run(
    [sys.executable, 'eval.py', f'--workdir={workdir}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {tmp_path / "gone"}') and (
    '--data_dir=DIR reads DIR instead' in last
  ), last

  evaluated = evaluate.evaluate_workdir(workdir, data_dir=str(moved))
  for key in ('step', 'accuracy_1', 'accuracy_2', 'loss_1', 'loss_2'):
    assert evaluated[key] == result[key], key


def test_metrics_file_and_tensorboard(sample_run):
  workdir, _ = sample_run
  records = metric_writers.read_metrics(workdir)
  splits = {r['split'] for r in records}
  assert splits == {'train', 'validation', 'test'}
  train = [r for r in records if r['split'] == 'train']
  for key in (
    'loss',
    'loss_1',
    'loss_2',
    'accuracy_1',
    'aux_entropy',
    'aux_reachability',
    'weight_entropy',
    'num_nonzero_1',
    'images_per_second',
    'peak_rss_mb',
  ):
    assert key in train[0], key
  # The loss is the sum of the task losses plus the weighted aux terms.
  for r in train:
    want = (
      r['loss_1']
      + r['loss_2']
      + r['weight_entropy'] * r['aux_entropy']
      + r['weight_reachability'] * r['aux_reachability']
    )
    assert abs(r['loss'] - want) < 1e-4 * max(1, abs(want))
  valid = [r for r in records if r['split'] == 'validation']
  assert len(valid[0]['expert_weights']) == 2
  # Train records carry the static gates' weights read from the params on the
  # host; at the last step they equal what the eval step's forward pass gave.
  assert train[-1]['step'] == valid[-1]['step']
  np.testing.assert_allclose(
    train[-1]['expert_weights'], valid[-1]['expert_weights'], rtol=1e-6
  )
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def _parse(*args):
  """Parses train.py-style arguments as absl would, into a config."""
  argv = ['train.py', f'--config={REPO}/configs/multimnist.py', *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config', None, flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def test_config_overrides_reach_the_model():
  config = _parse('--config.model.gate.k=4', '--config.model.gate.gamma=0.5')
  model = helpers.create_model(config)
  assert model.gate_kwargs['k'] == 4 and model.gate_kwargs['gamma'] == 0.5
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, 36, 36, 1)), train=False)
  )
  # 4 selectors of 3 bits (8 experts) per task gate.
  assert shapes['params']['gate_0']['z_logits'].shape == (4, 3)


@pytest.mark.slow  # A whole train.py run; the compiler-less paths are
# tested in-process by the skipped-kernel tests and the fallback tests.
def test_train_py_without_a_compiler_trains_on_xlas_ops(tmp_path):
  """The CPU kernels are optional: with no C++ compiler (CXX pointing
  nowhere, an empty kernel cache) train.py warns, runs the experts on XLA's
  ops (Toeplitz convolutions, nn.BatchNorm), trains and evaluates, and
  writes the run's facts."""
  env = dict(
    os.environ,
    CXX='/nonexistent/c++',
    DSELECT_JAX_KERNEL_CACHE=str(tmp_path / 'kernels'),
  )
  workdir = tmp_path / 'w'
  out = subprocess.run(
    [
      sys.executable,
      'train.py',
      '--config=configs/multimnist_sample.py',
      f'--workdir={workdir}',
      '--config.num_train_steps=2',
      '--config.batch_size=32',
      '--config.model.num_experts=2',
      '--config.model.gate.k=1',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "no C++ compiler: '/nonexistent/c++'" in out.stderr
  assert 'experts with toeplitz convolutions and xla BatchNorm' in out.stderr
  with open(workdir / 'test_metrics.json') as f:
    assert json.load(f)['step'] == 2
  kernels = tmp_path / 'kernels'  # Nothing half-built left there.
  assert not kernels.exists() or not os.listdir(kernels)
  with open(workdir / 'run_info.json') as f:
    (start,) = json.load(f)['starts']
  assert start['start_step'] == 0 and start['backend'] == 'cpu'


def test_mistyped_override_fails(tmp_path):
  with pytest.raises(AttributeError, match='gamm'):
    _parse('--config.model.gate.gamm=0.5')
  out = subprocess.run(
    [
      sys.executable,
      'train.py',
      '--config=configs/multimnist_sample.py',
      f'--workdir={tmp_path}/w',
      '--config.model.gate.gamm=0.5',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: bad flag:') and 'gamma' in last
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize(
  'field,value,match',
  [
    ('model.gate.k', 0, 'model.gate.k=0'),
    ('model.gate.k', 9, 'model.gate.k=9'),
    ('model.gate.gamma', 0.0, 'model.gate.gamma=0.0'),
    ('model.gate.name', 'moe', "model.gate.name='moe'"),
    ('data.name', 'cifar', "data.name='cifar'"),
    ('optimizer.name', 'lamb', "optimizer.name='lamb'"),
    ('optimizer.learning_rate', 0.0, 'learning_rate=0.0'),
    ('batch_size', 254, 'multiple of the 4 devices'),
    ('model.conv', 'fft', "model.conv='fft'"),
  ],
)
def test_invalid_config_values(field, value, match):
  config = multimnist.get_config()
  section = config
  *path, last = field.split('.')
  for name in path:
    section = section[name]
  section[last] = value
  with pytest.raises(config_schema.ConfigError, match=match):
    helpers.validate(config, jax.device_count())


@pytest.mark.parametrize(
  'field,value',
  [('norm', 'kernel'), ('conv', 'kernel')],
)
def test_the_cpu_kernels_are_refused_off_the_cpu(monkeypatch, field, value):
  config = multimnist.get_config()
  config.model[field] = value
  monkeypatch.setattr(factory.jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(
    config_schema.ConfigError,
    match=rf"config.model.{field}='{value}': the kernels are for the CPU, "
    rf'and JAX runs on gpu; set --config.model.{field}=auto',
  ):
    helpers.validate(config, 1)


def test_conv_choice_reaches_the_experts(cpu_kernels_built, monkeypatch):
  config = multimnist.get_config()
  # 'auto' on the CPU is the kernels' direct convolution where it measured
  # faster (forced here), and evaluation then runs each block in one kernel.
  assert jax.default_backend() == 'cpu'
  with monkeypatch.context() as m:
    m.setattr(factory.calibrate, 'direct_conv_is_faster', lambda: True)
    model = helpers.create_model(config)
  assert model.expert_kwargs['conv_module'] is cpu.DirectConv
  assert model.bank_kwargs['eval_block'] is cpu_kernels.conv_relu_pool
  config.model.conv = 'kernel'  # By name: whatever the measurement.
  assert helpers.create_model(config).bank_kwargs['eval_block'] is (
    cpu_kernels.conv_relu_pool
  )
  config.model.conv = 'toeplitz'
  assert helpers.create_model(config).bank_kwargs['eval_block'] is None
  kwargs = helpers.create_model(config).expert_kwargs
  assert kwargs['conv_module'] is cpu.ToeplitzConv
  config.model.conv = 'xla'
  assert helpers.create_model(config).expert_kwargs['conv_module'] is None


def test_entropy_weight_schedule_by_hand():
  config = helpers.tiny_config(
    **{
      'loss.entropy_weight': 0.2,
      'loss.entropy_start_step': 10,
      'loss.entropy_ramp_steps': 4,
    }
  )
  # 0 up to step 10, then 1/4, 2/4, 3/4, 4/4 of 0.2 at steps 11..14.
  got = [float(steps.entropy_weight(config.loss, s)) for s in range(8, 16)]
  np.testing.assert_allclose(
    got, [0, 0, 0, 0.05, 0.1, 0.15, 0.2, 0.2], atol=1e-7
  )
  config.loss.entropy_ramp_steps = 0  # A step at entropy_start_step.
  got = [float(steps.entropy_weight(config.loss, s)) for s in (9, 10, 11)]
  assert got == [0, 0.2, 0.2]


@pytest.mark.parametrize(
  'poisoned_step,steps,saved,kept',
  [
    (4, 'steps 4 and 6', 'the last good checkpoint is step 3', [3]),
    (2, 'steps 1 and 3', 'no checkpoint was saved yet', []),
  ],
)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
  tmp_path, monkeypatch, poisoned_step, steps, saved, kept
):
  real = batching.train_batches

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == poisoned_step - 1:  # This step's images are NaN.
        batch = dict(batch, image=batch['image'] * np.nan)
      yield batch

  monkeypatch.setattr(batching, 'train_batches', poisoned)
  workdir = str(tmp_path / 'w')
  with pytest.raises(trainer.TrainingError) as e:
    trainer.train_and_evaluate(helpers.tiny_config(), workdir)
  message = str(e.value)
  assert f'NaN or Inf between {steps}' in message
  assert f'stopped without saving ({saved})' in message
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  assert ckpts.all_steps() == kept


def test_second_process_on_a_workdir_is_refused(tmp_path):
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  held = checkpointing.WorkdirLock(workdir)
  try:
    with pytest.raises(
      checkpointing.CheckpointError,
      match=f'another training process \\(pid {os.getpid()}',
    ):
      trainer.train_and_evaluate(helpers.tiny_config(), workdir)
  finally:
    held.release()
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


@pytest.mark.slow  # For the 5-minute default run.
def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path, monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top

  real = batching.train_batches

  def batches(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 3:  # While step 4 is about to run.
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  workdir = str(tmp_path / 'w')
  with monkeypatch.context() as m:
    m.setattr(batching, 'train_batches', batches)
    with pytest.raises(trainer.Interrupted, match='SIGTERM at step 4'):
      trainer.train_and_evaluate(helpers.tiny_config(), workdir)
  assert checkpointing.Checkpoints(workdir, create=False).all_steps() == [3, 4]
  # The handler is gone again, and the run resumes from step 4 to the end.
  assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
  trainer.train_and_evaluate(helpers.tiny_config(), workdir)
  assert checkpointing.Checkpoints(workdir, create=False).latest_step() == 6


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.slow  # For the 5-minute default run.
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  workdir = str(tmp_path / 'w')
  trainer.train_and_evaluate(
    helpers.tiny_config(), workdir
  )  # Checkpoints 3 and 6.
  victim = _largest_file(os.path.join(workdir, 'checkpoints', '6'))
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  # eval.py names the damaged step.
  with pytest.raises(
    checkpointing.CheckpointError,
    match='periodic checkpoint 6 .* cannot be restored',
  ):
    evaluate.evaluate_workdir(workdir, step=6)
  config = helpers.tiny_config(num_train_steps=9)
  with caplog.at_level('WARNING'):
    trainer.train_and_evaluate(config, workdir)
  assert 'periodic checkpoint 6' in caplog.text and 'damaged' in caplog.text
  assert os.path.isdir(os.path.join(workdir, 'damaged', '6'))
  records = metric_writers.read_metrics(workdir)
  # The second run restarted after step 3: it logged steps 6 and 9 again.
  assert [r['step'] for r in records if r['split'] == 'train'][-2:] == [6, 9]


@pytest.mark.parametrize(
  'overrides,names,fields',
  [
    # 3 experts instead of 2: an expert the checkpoint lacks.
    (
      {'model.num_experts': 3},
      r"this config has 'params/experts/expert_2/",
      r'model.num_experts \(2 there, 3 here\)\.$',
    ),
    # k = 2 instead of 1: the gate's k selectors, w_logits (k,), differ.
    (
      {'model.gate.k': 2},
      r"'params/gate_0/w_logits' is float32\[1\] in the checkpoint, "
      r'float32\[2\] here',
      r'model.gate.k \(1 there, 2 here\)\.$',
    ),
  ],
)
def test_checkpoint_of_another_config_is_a_clear_error(
  tmp_path, monkeypatch, overrides, names, fields
):
  workdir = str(tmp_path / 'w')
  trainer.train_and_evaluate(helpers.tiny_config(), workdir)

  def no_reads(*args, **kwargs):
    raise AssertionError('a checkpoint of another config was read')

  # The metadata alone refuses it: Orbax starts no array reads.
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', no_reads)
  other = helpers.tiny_config(**overrides)
  with pytest.raises(
    checkpointing.CheckpointError,
    match=r'periodic checkpoint 6 .* cannot be restored into '
    r'the model of this config \(made with another config\): ' + names,
  ) as e:
    trainer.train_and_evaluate(other, workdir)
  # The fields that differ from the workdir's config.json, and only those.
  assert re.search(
    r" The workdir's config.json differs in " + fields, str(e.value)
  ), str(e.value)
  model = helpers.create_model(other, bn_axis_name=steps.AXIS)
  abstract = helpers.abstract_state(
    other, model, factory.create_optimizer(other, 6)
  )
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  with pytest.raises(
    checkpointing.CheckpointError,
    match=r'best checkpoint \d .* another config\): ' + names,
  ):
    ckpts.restore_best(abstract)
  assert ckpts.all_steps() == [3, 6]
  assert not os.path.exists(os.path.join(workdir, 'damaged'))


def model_and_state(config, **bit_logits):
  """The config's model and a replicated initial state whose gates (by name)
  have the given DSelect-k bit logits."""
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, 10)
  state = helpers.initial_state(config, model, tx, jax.random.key(0))
  params = flax.core.unfreeze(state.params)
  for gate, logits in bit_logits.items():
    params[gate]['z_logits'] = np.array(logits, np.float32)
  return model, flax.jax_utils.replicate(state.replace(params=params))


def test_the_evaluator_scores_every_image_once():
  """Accuracy and cross-entropy of each task over the whole split, by hand
  from the model's logits, against the Evaluator's padded batches on the
  four devices (96 does not divide the split)."""
  config = helpers.tiny_config()
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, 10)
  state = helpers.initial_state(config, model, tx, jax.random.key(0))
  split = helpers.sample('test')
  assert len(split) % 96
  result = evaluate.Evaluator(model, 4, KINDS)(
    steps.replicate(state), split, 96
  )
  logits, _ = helpers.create_model(config).apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    split.batch(np.arange(len(split)))['image'],
    train=False,
  )
  logits = np.asarray(logits, np.float64)  # (T, N, C)
  assert result['num_examples'] == len(split)
  assert result['metric_names'] == ['accuracy', 'accuracy']
  scores = result[metric_writers.PER_TASK]
  for t in range(2):
    labels = split.labels[:, t]
    accuracy = np.mean(np.argmax(logits[t], -1) == labels)
    log_z = np.log(np.sum(np.exp(logits[t]), -1))
    ce = np.mean(log_z - logits[t][np.arange(len(split)), labels])
    assert scores['metric'][t] == accuracy
    np.testing.assert_allclose(scores['loss'][t], ce, rtol=1e-5)
  assert result['selection_score'] == pytest.approx(np.mean(scores['metric']))


@pytest.mark.parametrize('shared_gate', [True, False])
def test_sparse_eval_equals_dense_eval(shared_gate):
  config = helpers.tiny_config(
    **{
      'model.num_experts': 5,
      'model.gate.k': 2,
      'model.shared_gate': shared_gate,
    }
  )
  # Bits MSB first over 3 bits: gate 0 picks experts 1 (001) and 4 (100),
  # gate 1 (when there is one) experts 1 and 2 (010).
  logits = {'gate_0': [[-1, -1, 1], [1, -1, -1]]}
  if not shared_gate:
    logits['gate_1'] = [[-1, -1, 1], [-1, 1, -1]]
  model, state = model_and_state(config, **logits)
  split = helpers.sample('test')
  dense = evaluate.Evaluator(model, 4, KINDS, sparse=False)
  sparse = evaluate.Evaluator(model, 4, KINDS, sparse=True)
  assert dense.active(state) is None
  assert sparse.active(state) == ((1, 4) if shared_gate else (1, 2, 4))
  want, got = dense(state, split, 200), sparse(state, split, 200)
  assert want['selected_experts'] == got['selected_experts']
  assert want['num_examples'] == got['num_examples'] == len(split)
  assert want['metric_names'] == got['metric_names'] == ['accuracy'] * 2
  want, got = want[metric_writers.PER_TASK], got[metric_writers.PER_TASK]
  np.testing.assert_array_equal(got['metric'], want['metric'])
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)


@pytest.mark.slow  # For the 5-minute default run.
def test_sparse_train_step_matches_the_dense_step():
  config = helpers.tiny_config(
    **{
      'model.num_experts': 4,
      'model.gate.k': 1,
      'model.sparse_train': True,
      'optimizer.name': 'sgd',
      'optimizer.learning_rate': 0.1,
    }
  )
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, 10)
  state = helpers.initial_state(config, model, tx, jax.random.key(0))
  params = flax.core.unfreeze(state.params)
  params['gate_0']['z_logits'] = np.array([[1.0, -1.0]], np.float32)  # 2
  params['gate_1']['z_logits'] = np.array([[-1.0, 1.0]], np.float32)  # 1
  state = state.replace(params=params)
  split = helpers.sample('train')
  batch = next(batching.train_batches(split, 16, 4, seed=0))
  replicated = flax.jax_utils.replicate(state)
  sparse = steps.SparseTrainSteps(model, config, KINDS)
  sparse_step = sparse(replicated, 0)
  assert sparse.active == (1, 2)
  dense = steps.SparseTrainSteps(
    model,
    helpers.tiny_config(**{'model.num_experts': 4, 'model.gate.k': 1}),
    KINDS,
  )
  dense_step = dense(replicated, 0)
  assert dense.active is None
  rng = jax.random.key(1)
  got, got_metrics = sparse_step(flax.jax_utils.replicate(state), batch, rng)
  want, want_metrics = dense_step(flax.jax_utils.replicate(state), batch, rng)
  take = lambda s: jax.tree.map(lambda x: np.asarray(x)[0], s.params)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
    take(got),
    take(want),
  )
  np.testing.assert_allclose(
    got_metrics['loss'], want_metrics['loss'], rtol=1e-6
  )
  # Experts 0 and 3 got no gradient: SGD left them where they were.
  for e in (0, 3):
    jax.tree.map(
      np.testing.assert_array_equal,
      take(got)['experts'][f'expert_{e}'],
      jax.device_get(state.params['experts'][f'expert_{e}']),
    )


def test_sparse_train_needs_static_dselect_k_gates_and_no_weight_decay():
  for field, value in (
    ('optimizer.name', 'adamw'),
    ('model.gate.per_example', True),
    ('model.gate.name', 'top_k'),
    ('model.gate.name', 'softmax'),
  ):
    config = helpers.tiny_config(**{'model.sparse_train': True, field: value})
    with pytest.raises(config_schema.ConfigError, match='model.sparse_train'):
      helpers.validate(config, 4)


def test_sparse_dispatch_needs_per_example_gates_routing_on_the_input():
  for fields in (
    {},  # Static gates.
    {'model.gate.per_example': True, 'model.gate.name': 'softmax'},
    {'model.gate.per_example': True, 'model.routing_input': 'experts'},
  ):
    config = helpers.tiny_config(**{'model.sparse_dispatch': True, **fields})
    with pytest.raises(
      config_schema.ConfigError, match='model.sparse_dispatch'
    ):
      helpers.validate(config, 4)
  helpers.validate(
    helpers.tiny_config(
      **{'model.sparse_dispatch': True, 'model.gate.per_example': True}
    ),
    4,
  )


@pytest.mark.parametrize(
  'name',
  sorted(
    f[:-3]
    for f in os.listdir(os.path.join(REPO, 'configs'))
    if f.endswith('.py') and f not in ('__init__.py', 'default.py')
  ),
)
def test_every_shipped_config_is_valid(name, tmp_path):
  """Valid: the schema of configs/default.py (its fields and their types),
  accepted by the validator, a model and optimizer that build with a tower
  and a gate per task (or one shared gate) over num_experts experts, and
  the same config back from the config.json that eval.py reads."""
  from configs import default  # pylint: disable=g-import-not-at-top

  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.is_locked  # A typo in an override fails, not adds a field.
  schema = config_schema.flat_fields(default.get_config())
  fields = config_schema.flat_fields(config)
  assert set(fields) == set(schema)
  for field, value in fields.items():
    expected = type(schema[field])
    assert isinstance(value, expected) or (
      expected is float and isinstance(value, int)
    ), (field, value)
  helpers.validate(config, 4)

  model = helpers.create_model(config)
  tx = factory.create_optimizer(config, 100)
  params = helpers.abstract_state(config, model, tx).params
  moe = params.get('moe', params)  # The recommender nests it.
  tasks = helpers.spec_of(config).num_tasks
  experts = config.model.num_experts
  gates = sorted(k for k in moe if k.startswith('gate'))
  assert len(gates) == (1 if config.model.shared_gate else tasks)
  assert sorted(k for k in moe if k.startswith('tower')) == [
    f'tower_{t}' for t in range(tasks)
  ]
  if config.model.expert_bank == 'vmap':  # Stacked: E first.
    leaves = jax.tree.leaves(moe['experts'])
    assert leaves and all(x.shape[0] == experts for x in leaves)
  else:
    assert sorted(moe['experts']) == sorted(
      f'expert_{i}' for i in range(experts)
    )

  with open(tmp_path / 'config.json', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  assert config_schema.flat_fields(
    evaluate.load_workdir_config(str(tmp_path))
  ) == (json.loads(json.dumps(fields)))


def test_peak_rss_is_the_kernels_high_water_mark():
  def status_mb(field):  # /proc/self/status, in kB.
    with open('/proc/self/status') as f:
      line = next(l for l in f if l.startswith(field + ':'))
    return int(line.split()[1]) / 1024

  before = trainer.peak_rss_mb()
  # Touch enough memory to exceed the earlier peak by 200 MiB.
  grow_mb = before - status_mb('VmRSS') + 200
  block = np.ones(int(grow_mb * 2**20) // 8)
  after = trainer.peak_rss_mb()
  assert after >= before + 190, (before, after, block.nbytes)
  assert abs(after - status_mb('VmHWM')) < 2


@pytest.mark.slow  # For the 5-minute default run.
def test_a_params_only_export_evaluates_like_its_checkpoint(
  sample_run, tmp_path
):
  """scripts/export_params.py copies the best checkpoint without optimizer
  state; eval.py's evaluate_workdir on the copy gives the trainer's test
  result."""
  workdir, result = sample_run
  out = str(tmp_path / 'export')
  subprocess.run(
    [
      sys.executable,
      'scripts/export_params.py',
      f'--workdir={workdir}',
      f'--out={out}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  assert checkpointing.params_steps(out) == [result['step']]
  got = evaluate.evaluate_workdir(out)
  assert got['checkpoint'] == 'params' and got['step'] == result['step']
  for key in ('accuracy_1', 'accuracy_2', 'loss_1', 'loss_2'):
    assert got[key] == result[key], key


@pytest.mark.slow  # For the 5-minute default run.
def test_per_class_script_agrees_with_the_evaluator(sample_run):
  """scripts/per_class.py predicts on its own (jit of model.apply, argmax);
  its accuracy must be the evaluator's for the same checkpoint, its class
  accuracies weighted by the class counts must give that accuracy back, and
  each task's predicted shares must sum to 1."""
  workdir, _ = sample_run
  step = checkpointing.Checkpoints(workdir, create=False).latest_step()
  expected = evaluate.evaluate_workdir(workdir, step=step)
  out = subprocess.run(
    [sys.executable, 'scripts/per_class.py', workdir, f'--step={step}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout.splitlines()
  assert out[0].startswith(f'{workdir}, checkpoint at step {step}, test split')
  labels = datasets.resolve(evaluate.load_workdir_config(workdir).data).test
  for t in (1, 2):
    head, per_class, share = out[3 * t - 2 : 3 * t + 1]
    assert head == f'task {t}: accuracy {expected[f"accuracy_{t}"]:.4f}'
    counts = np.bincount(labels.labels[:, t - 1], minlength=10)
    accs = np.array([float(x) for x in per_class.split()[-10:]])
    # Two decimals printed: the weighted sum is within 0.005 of the accuracy.
    weighted = float(accs @ counts) / counts.sum()
    assert abs(weighted - expected[f'accuracy_{t}']) <= 0.005 + 1e-9
    assert abs(sum(float(x) for x in share.split()[-10:]) - 1) <= 0.05
