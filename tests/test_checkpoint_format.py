"""Checkpoints written by earlier code restore with today's.

``tests/data/checkpoint_fixture/`` holds a workdir's checkpoints as commit
9801201 wrote them (Orbax 0.12 with its deprecated ``max_to_keep`` and
``item_handlers`` options; ``tests/data/make_checkpoint_fixture.py`` wrote
them): periodic checkpoints at steps 1 and 2, the best at step 1 with
selection_score 0.25. Every array of the state holds one constant, array i
of the flattened state ``1000 * (step - 1) + i``, so what each restored
array must hold follows from the state's structure alone.
"""

import os
import shutil

import jax
import numpy as np

from dselect_jax import checkpointing
from dselect_jax import evaluate
from dselect_jax import factory
from tests import helpers

FIXTURE = os.path.join(os.path.dirname(__file__), 'data', 'checkpoint_fixture')


def _abstract(workdir):
  config = evaluate.load_workdir_config(workdir)
  model = helpers.create_model(config)
  return helpers.abstract_state(
    config, model, factory.create_optimizer(config, 1)
  )


def _assert_filled(state, step):
  leaves = jax.tree.leaves(state)
  assert len(leaves) > 10
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(
      np.asarray(leaf), np.full(np.shape(leaf), 1000.0 * (step - 1) + i)
    )


def test_checkpoints_of_an_earlier_commit_restore(tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(FIXTURE, workdir)
  abstract = _abstract(workdir)
  ckpts = checkpointing.Checkpoints(workdir, create=False)
  assert ckpts.all_steps() == [1, 2]
  assert ckpts.latest_step() == 2 and ckpts.best_step() == 1
  _assert_filled(ckpts.restore(abstract, 2), 2)
  _assert_filled(ckpts.restore(abstract, 1), 1)
  _assert_filled(ckpts.restore_best(abstract), 1)
  ckpts.close()
  # What eval.py restores: the best checkpoint.
  restored = evaluate.restore_workdir(workdir)
  assert (restored.kind, restored.step) == ('best', 1)
  _assert_filled(restored.state, 1)


def test_a_resumed_run_keeps_its_policies_on_old_checkpoints(tmp_path):
  """Written on by today's code: the periodic checkpoints keep the newest
  two, the best keeps the one with the highest score."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(FIXTURE, workdir)
  abstract = _abstract(workdir)
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  ckpts = checkpointing.Checkpoints(workdir, max_to_keep=2)
  ckpts.save(3, state)
  assert ckpts.all_steps() == [2, 3]
  ckpts.save_best(3, state, 0.125)  # Lower than step 1's 0.25: dropped.
  assert ckpts.best_step() == 1
  ckpts.save_best(4, state, 0.5)
  assert ckpts.best_step() == 4
  assert sorted(os.listdir(os.path.join(workdir, 'best'))) == ['4']
  ckpts.close()
