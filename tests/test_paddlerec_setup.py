"""PaddleRec's setup: its loss, its initializers, its statistic, its order.

Expected numbers are derived by hand in the comments.
"""

import functools
import json
import math
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dselect_jax import config_schema
from dselect_jax import datasets
from dselect_jax import evaluate
from dselect_jax import experts
from dselect_jax import metric_writers
from dselect_jax import steps
from dselect_jax import tasks
from dselect_jax import trainer
from dselect_jax.datasets import batching
from tests import helpers


def _loss_config(**fields):
  return ml_collections.ConfigDict(
    dict({'name': 'cross_entropy', 'label_smoothing': 0.0}, **fields)
  )


def _classification_losses(logits, labels, loss_config):
  """steps.task_losses of one classification task on one device: logits
  (1, B, C), labels (B, 1), every example of weight 1."""
  batch = {
    'target': jnp.asarray(labels)[None],
    'weight': jnp.ones((1,) + np.shape(labels)),
  }
  return steps.one_device(
    functools.partial(
      steps.task_losses,
      task_kinds=('classification',),
      loss_config=loss_config,
    )
  )(jnp.asarray(logits)[None], batch)[0]


def test_double_softmax_by_hand():
  # One task, two examples, three classes.
  logits = np.array([[[2.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])  # (T, B, C)
  labels = np.array([[0], [0]])  # (B, T): the second is confidently wrong.
  want = []
  for row in logits[0]:
    p = np.exp(row) / np.exp(row).sum()
    p = np.clip(p, 1e-15, 1 - 1e-15)
    want.append(-np.log(np.exp(p[0]) / np.exp(p).sum()))
  per_example = tasks.example_losses(
    'classification', jnp.asarray(logits[0]), labels[:, 0], double_softmax=True
  )
  np.testing.assert_allclose(per_example, want, rtol=1e-6)
  got = _classification_losses(
    logits, labels, _loss_config(name='double_softmax')
  )
  np.testing.assert_allclose(got, [np.mean(want)], rtol=1e-6)
  # Bounded by log(1 + (C - 1) e) (p = 0 on the label, 1 elsewhere); the
  # confidently wrong example (p ~ (0, 0, 1)) is at log(2 + e), almost
  # there, and its loss barely moves with its logits.
  assert max(want) < math.log(1 + 2 * math.e)
  np.testing.assert_allclose(want[1], math.log(2 + math.e), rtol=1e-3)


def test_label_smoothing_by_hand():
  logits = np.array([[[1.0, 2.0, 3.0, 4.0]]])
  labels = np.array([[3]])
  eps = 0.2
  log_p = logits[0, 0] - np.log(np.exp(logits[0, 0]).sum())
  target = np.full(4, eps / 4)
  target[3] += 1 - eps  # 0.85 on the label, 0.05 elsewhere.
  got = _classification_losses(
    logits, labels, _loss_config(label_smoothing=eps)
  )
  np.testing.assert_allclose(got, [-(target * log_p).sum()], rtol=1e-6)
  plain = _classification_losses(logits, labels, _loss_config())
  np.testing.assert_allclose(plain, [-log_p[3]], rtol=1e-6)


def test_paddlerec_initializers():
  expert = experts.MultiMNISTExpert(init_scheme='paddlerec')
  params = expert.init(
    jax.random.key(0), jnp.zeros((1, 36, 36, 1)), train=False
  )['params']
  # Dense_0: (720, 50), truncated at 2 sigma, sigma = 1/sqrt(720), not
  # rescaled: std = sigma * sqrt(1 - 2 phi(2) * 2 / (2 Phi(2) - 1)) ~ 0.880.
  dense = np.asarray(params['Dense_0']['kernel'])
  sigma = 1 / math.sqrt(720)
  assert np.abs(dense).max() <= 2 * sigma + 1e-7
  assert abs(dense.std() / sigma - 0.880) < 0.02
  # Conv_1: (5, 5, 10, 20), Xavier normal: std = sqrt(2 / (250 + 500)).
  conv = np.asarray(params['Conv_1']['kernel'])
  assert abs(conv.std() / math.sqrt(2 / 750) - 1) < 0.05
  assert np.abs(conv).max() > 2.5 * math.sqrt(2 / 750)  # Not truncated.
  for layer in ('Conv_0', 'Dense_1'):
    assert not np.any(np.asarray(params[layer]['bias']))
  # The gate's weight logits: U(-1, 1) instead of U(-0.05, 0.05).
  config = helpers.tiny_config(**{'model.init_scheme': 'paddlerec'})
  w_init = helpers.create_model(config).gate_kwargs['w_init']
  w = np.asarray(w_init(jax.random.key(1), (4000,)))
  assert -1 <= w.min() < -0.99 and 0.99 < w.max() <= 1
  assert abs(w.mean()) < 0.05
  assert 'w_init' not in helpers.create_model(helpers.tiny_config()).gate_kwargs


def _record(step, acc1, acc2, n=100):
  return {
    'step': step,
    'split': evaluate.TEST_EPOCH,
    'num_examples': n,
    'accuracy_1': acc1,
    'accuracy_2': acc2,
  }


def test_test_statistics_by_hand():
  records = [
    _record(10, 0.5, 0.9),
    _record(20, 0.7, 0.6),
    {'step': 20, 'split': 'validation', 'accuracy_1': 1.0},
    _record(30, 0.6, 0.8),
    _record(30, 0.9, 0.7),
  ]  # 30 twice: last.
  selected = {
    'step': 20,
    'checkpoint': 'best',
    'accuracy_1': 0.65,
    'accuracy_2': 0.61,
  }
  stats = evaluate.test_statistics(records, selected)
  assert stats['num_passes'] == 3
  assert stats['best_validation']['accuracy_1'] == 0.65
  assert stats['last_epoch'] == {
    'step': 30,
    'accuracy_1': 0.9,
    'accuracy_2': 0.7,
  }
  # Task 1 peaks at step 30 (0.9), task 2 at step 10 (0.9).
  assert stats['max_over_epochs']['accuracy_1'] == 0.9
  assert stats['max_over_epochs']['step_1'] == 30
  assert stats['max_over_epochs']['step_2'] == 10
  # Equal counts: (0.5 + 0.7 + 0.9) / 3 = 0.7, (0.9 + 0.6 + 0.7) / 3.
  np.testing.assert_allclose(stats['pooled_over_epochs']['accuracy_1'], 0.7)
  np.testing.assert_allclose(stats['pooled_over_epochs']['accuracy_2'], 2.2 / 3)
  # Unequal counts weigh by examples: (0.5 * 100 + 1.0 * 300) / 400.
  stats = evaluate.test_statistics(
    [_record(1, 0.5, 0.5), _record(2, 1.0, 1.0, n=300)], selected
  )
  np.testing.assert_allclose(stats['pooled_over_epochs']['accuracy_1'], 0.875)
  assert evaluate.test_statistics([], selected) == {}


def test_stored_order_batches():
  split = helpers.sample('train')
  batches = batching.train_batches(split, 1000, 1, seed=0, shuffle=False)
  for _ in range(2):  # Two epochs, the same order.
    for i in range(4):
      np.testing.assert_array_equal(
        next(batches)['target'][0], split.labels[i * 1000 : (i + 1) * 1000]
      )


def test_epoch_splits_feed_their_epoch():
  split = helpers.sample('train')
  flipped = datasets.multimnist.Split(split.images[::-1], split.labels[::-1])
  seen = []

  def epoch_split(epoch):
    seen.append(epoch)
    return split if epoch % 2 == 0 else flipped

  batches = batching.train_batches(
    split, 2000, 1, seed=0, shuffle=False, start_step=1, epoch_split=epoch_split
  )
  np.testing.assert_array_equal(
    next(batches)['target'][0], split.labels[2000:]
  )  # Epoch 0, batch 1.
  np.testing.assert_array_equal(
    next(batches)['target'][0], flipped.labels[:2000]
  )  # Epoch 1, batch 0.
  assert seen[:2] == [0, 1]


def test_fresh_train_needs_a_built_data_set():
  config = helpers.tiny_config(**{'data.fresh_train': True})
  with pytest.raises(config_schema.ConfigError, match='data.fresh_train=True'):
    helpers.validate(config, 4)


@pytest.mark.parametrize(
  'with_validation', [pytest.param(True, marks=pytest.mark.slow), False]
)
def test_a_run_with_test_passes_reports_the_four_statistics(
  with_validation, tmp_path, monkeypatch
):
  """2 epochs of 64 PaddleRec-format examples at batch 32 (2 steps each):
  two test passes; without a validation split the last checkpoint is the
  one tested."""
  data = tmp_path / 'paddlerec'
  data.mkdir()
  sample = helpers.sample('train')
  # 80 train examples, of which PaddleRec's split holds out a fifth for
  # validation; 200 test examples.
  for name, rows in (('train', slice(0, 80)), ('test', slice(80, 280))):
    (data / f'{name}.pickle').write_bytes(
      pickle.dumps((sample.images[rows], sample.labels[rows]))
    )
  config = helpers.tiny_config(
    num_train_steps=4,
    **{
      'data.name': 'paddlerec',
      'data.paddlerec_dir': str(data),
      'test_every_epoch': True,
      'eval_every_steps': -1,
      'checkpoint_every_steps': -1,
      'data.shuffle': False,
    },
  )
  workdir = str(tmp_path / 'run')
  if not with_validation:
    real = datasets.resolve

    def no_validation(data):
      full = real(data)
      empty = datasets.multimnist.Split(
        full.validation.images[:0], full.validation.labels[:0]
      )
      splits = {'train': full.train, 'validation': empty, 'test': full.test}
      return datasets.Dataset(full.name, full.spec, lambda names: splits)

    monkeypatch.setattr(datasets, 'resolve', no_validation)
  result = trainer.train_and_evaluate(config, workdir)
  passes = [
    r
    for r in metric_writers.read_metrics(workdir)
    if r['split'] == evaluate.TEST_EPOCH
  ]
  assert [r['step'] for r in passes] == [2, 4]
  stats = result['test_statistics']
  assert stats['num_passes'] == 2
  np.testing.assert_allclose(
    stats['pooled_over_epochs']['accuracy_2'],
    (passes[0]['accuracy_2'] + passes[1]['accuracy_2']) / 2,
  )
  assert stats['last_epoch']['accuracy_1'] == passes[1]['accuracy_1']
  if not with_validation:
    assert result['checkpoint'] == 'last' and result['step'] == 4
    assert result['accuracy_1'] == passes[1]['accuracy_1']
  with open(os.path.join(workdir, 'test_metrics.json')) as f:
    assert json.load(f)['test_statistics'] == stats
  if with_validation:  # eval.py prints the four side by side.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
      [sys.executable, 'eval.py', f'--workdir={workdir}'],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
    )
    pooled = stats['pooled_over_epochs']
    assert "pooled over epochs (PaddleRec's statistic)" in out.stdout
    assert f'{pooled["accuracy_1"]:.6f} / {pooled["accuracy_2"]:.6f}' in (
      out.stdout
    )
  evaluated = evaluate.evaluate_workdir(workdir)
  assert (
    evaluated['test_statistics']['pooled_over_epochs']
    == (stats['pooled_over_epochs'])
  )
