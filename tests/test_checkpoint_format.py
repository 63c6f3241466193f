"""Checkpoints written the way earlier code wrote them restore with today's.

Until 62f73aa, checkpointing.py opened its Orbax managers with options that
Orbax 0.12 documents as deprecated: ``max_to_keep`` and ``item_handlers``
(and a ``best_fn`` reading the score under its name). ``_write_old_style``
writes a workdir's checkpoints through such managers here, every array of the
state holding one constant (array i of the flattened state ``1000 * (step -
1) + i``), so what each restored array must hold follows from the state's
structure alone; today's ``Checkpoints`` must restore them and keep its
policies when it writes on them.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from dselect_jax import checkpointing
from dselect_jax import evaluate
from dselect_jax import factory
from tests import helpers


def _config():
  return helpers.tiny_config(**{'optimizer.name': 'sgd'})


def _abstract(config):
  model = helpers.create_model(config)
  return helpers.abstract_state(
    config, model, factory.create_optimizer(config, 1)
  )


def _filled(abstract, step):
  leaves, tree = jax.tree.flatten(abstract)
  return jax.tree.unflatten(
    tree,
    [
      np.full(x.shape, 1000.0 * (step - 1) + i, x.dtype)
      for i, x in enumerate(leaves)
    ],
  )


def _write_old_style(workdir, config):
  """Periodic checkpoints at steps 1 and 2, the best at step 1 with
  selection_score 0.25, through the managers' deprecated options."""
  abstract = _abstract(config)
  latest = ocp.CheckpointManager(
    os.path.join(workdir, 'checkpoints'),
    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    item_handlers=ocp.StandardCheckpointHandler(),
  )
  best = ocp.CheckpointManager(
    os.path.join(workdir, 'best'),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=1,
      create=True,
      best_fn=lambda metrics: metrics['selection_score'],
      best_mode='max',
    ),
    item_handlers=ocp.StandardCheckpointHandler(),
  )
  for step in (1, 2):
    latest.save(step, args=ocp.args.StandardSave(_filled(abstract, step)))
  best.save(
    1,
    args=ocp.args.StandardSave(_filled(abstract, 1)),
    metrics={'selection_score': 0.25},
  )
  for manager in (latest, best):
    manager.wait_until_finished()
    manager.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2) + '\n')
  return abstract


def _assert_filled(state, step):
  leaves = jax.tree.leaves(state)
  assert len(leaves) > 10
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(
      np.asarray(leaf), np.full(np.shape(leaf), 1000.0 * (step - 1) + i)
    )


def test_checkpoints_of_the_deprecated_options_restore(tmp_path):
  workdir = str(tmp_path / 'run')
  abstract = _write_old_style(workdir, _config())
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
  with open(os.path.join(workdir, 'best', '1', 'metrics', 'metrics')) as f:
    assert json.load(f) == {'selection_score': 0.25}


def test_a_resumed_run_keeps_its_policies_on_old_checkpoints(tmp_path):
  """Written on by today's code: the periodic checkpoints keep the newest
  two, the best keeps the one with the highest score."""
  workdir = str(tmp_path / 'run')
  abstract = _write_old_style(workdir, _config())
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
