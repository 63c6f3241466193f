"""Every config that trains also saves, resumes bit-exactly and evaluates.

The variants are not listed here: every value that ``config_schema.FIELDS`` allows
for every field of the tiny config is tried, one field at a time, and the
values whose train state has another structure (tree, shapes or dtypes) than
the others are trained, resumed and evaluated. A field added to the config
and to ``FIELDS`` later is covered without editing this file.
"""

import copy
import functools
import os
import shutil

import jax
import numpy as np
import pytest

from dselect_jax import checkpointing
from dselect_jax import config_schema
from dselect_jax import evaluate
from dselect_jax import factory
from dselect_jax import steps
from dselect_jax import trainer
from tests import helpers

STEPS = 2  # Checkpoints at 1 and 2; the resumed run restarts at 1.


def _base():
  return helpers.tiny_config(
    num_train_steps=STEPS,
    **{
      'log_every_steps': 1,
      'eval_every_steps': 1,
      'checkpoint_every_steps': 1,
      'eval_batch_size': 1000,
    },
  )


def _with(config, field, value):
  config = copy.deepcopy(config)
  *path, last = field.split('.')
  section = config
  for name in path:
    section = section[name]
  with config.unlocked():
    section[last] = value
  return config


def _structure(config):
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  abstract = helpers.abstract_state(
    config, model, factory.create_optimizer(config, STEPS)
  )
  # The arrays' paths, shapes and dtypes: what a checkpoint holds (the
  # treedef's text would also hold the optimizer's and apply_fn's reprs).
  return tuple(
    (jax.tree_util.keystr(path), x.shape, str(x.dtype))
    for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
  )


def _apply(config, changes):
  for field, value in changes.items():
    config = _with(config, field, value)
  return config


@functools.cache
def structural_variants() -> tuple[tuple[str, object], ...]:
  """Each (field, value) that gives the train state another structure."""
  base = _base()
  plain = _structure(base)
  found = []
  for field, default in config_schema.flat_fields(base).items():
    for value in config_schema.FIELDS[field].values(default):
      if value == default:
        continue
      if field == 'data.name' and value == 'movielens':
        continue  # Another model: tests/test_recommender_training.py.
      config = _with(base, field, value)
      try:
        helpers.validate(config, jax.device_count())
      except config_schema.ConfigError:
        continue  # Needs another field changed too.
      if _structure(config) != plain:
        found.append((field, value))
  return tuple(found)


# Variants run alone, among the slow tests: the vmapped bank compiles for
# about 20 s on the CPU (a GPU layout; tests/test_models.py checks that it
# computes the loop's function in the default run).
ALONE = (('model.expert_bank', 'vmap'),)


@functools.cache
def combined_runs() -> tuple[tuple[tuple[str, object], ...], ...]:
  """The structural variants packed into few runs: a variant joins the first
  run that does not set its field yet and stays valid with it, if every
  variant of the run still changes the run's structure (k=2 does nothing to
  a softmax gate's state, so it does not join a softmax run)."""
  base = _base()
  runs = []
  found = structural_variants()
  for field, value in found:
    if (field, value) in ALONE:
      continue
    for run in runs:
      if field in run:
        continue
      joined = dict(run, **{field: value})
      try:
        helpers.validate(_apply(base, joined), jax.device_count())
      except config_schema.ConfigError:
        continue
      whole = _structure(_apply(base, joined))
      if all(
        whole
        != _structure(
          _apply(base, {f: v for f, v in joined.items() if f != left_out})
        )
        for left_out in joined
      ):
        run[field] = value
        break
    else:
      runs.append({field: value})
  return tuple(tuple(run.items()) for run in [{}] + runs) + tuple(
    ((field, value),) for field, value in ALONE if (field, value) in found
  )


def test_every_field_of_every_config_has_a_spec():
  """A field without a spec would escape validation and this file."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  names = [
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(repo, 'configs', '*.py'))
    if not p.endswith('__init__.py')
  ]
  assert 'default' in names and len(names) > 3
  for name in names:
    config = importlib.import_module(f'configs.{name}').get_config()
    missing = set(config_schema.flat_fields(config)) - set(config_schema.FIELDS)
    assert not missing, (name, missing)


def test_the_variants_include_the_states_that_broke_restore():
  """AdamW (an EmptyState in its chain) and gradient clipping (one more
  chain level) each give a structure of their own, as do the gates; every
  variant is trained in exactly one of the combined runs."""
  variants = set(structural_variants())
  trained = [v for run in combined_runs() for v in run]
  assert sorted(trained, key=str) == sorted(variants, key=str)  # Once each.
  for variant in [
    ('optimizer.name', 'adamw'),
    ('optimizer.name', 'sgd'),
    ('optimizer.grad_clip_norm', 1.0),
    ('model.gate.name', 'softmax'),
    ('model.gate.name', 'top_k'),
    ('model.shared_gate', True),
    ('model.gate.per_example', True),
    ('model.num_experts', 3),
  ]:
    assert variant in variants, variant


def _default_runs() -> list:
  """The runs of the default test set: the base config and the run that
  combines the most variants; the others are slow tests."""
  runs = [r for r in combined_runs() if r[:1] not in [ALONE]]
  return [(), max(runs, key=len)]


@pytest.mark.parametrize(
  'changes',
  [
    run if run in _default_runs() else pytest.param(run, marks=pytest.mark.slow)
    for run in combined_runs()
  ],
  ids=lambda run: ','.join(f'{f}={v}' for f, v in run) or 'base',
)
def test_train_stop_resume_evaluate(changes, tmp_path):
  config = _apply(_base(), dict(changes))
  whole = str(tmp_path / 'whole')
  trainer.train_and_evaluate(config, whole)

  # The same run stopped after step 1: only its step-1 checkpoint is left.
  resumed = str(tmp_path / 'resumed')
  os.makedirs(os.path.join(resumed, 'checkpoints'))
  shutil.copytree(
    os.path.join(whole, 'checkpoints', '1'),
    os.path.join(resumed, 'checkpoints', '1'),
  )
  result = trainer.train_and_evaluate(config, resumed)

  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  abstract = helpers.abstract_state(
    config, model, factory.create_optimizer(config, STEPS)
  )
  states = [
    checkpointing.Checkpoints(w, create=False).restore(abstract, STEPS)
    for w in (whole, resumed)
  ]
  arrays = lambda s: jax.device_get(
    (s.step, s.params, s.batch_stats, s.opt_state)
  )
  jax.tree.map(np.testing.assert_array_equal, *map(arrays, states))
  assert int(states[1].step) == STEPS

  evaluated = evaluate.evaluate_workdir(resumed)
  assert evaluated['checkpoint'] == 'best'
  for key in ('step', 'accuracy_1', 'accuracy_2', 'loss_1', 'loss_2'):
    assert evaluated[key] == result[key], key


# ---------------------------------------------------------------------------
# What a failed restore says, and what a run keeps to itself.
# ---------------------------------------------------------------------------


def _state(config, seed=0):
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, STEPS)
  return (
    helpers.initial_state(config, model, tx, jax.random.key(seed)),
    helpers.abstract_state(config, model, tx),
  )


def test_another_optimizers_checkpoint_names_the_state_that_differs(tmp_path):
  adam = _base()
  state, _ = _state(adam)
  ckpts = checkpointing.Checkpoints(str(tmp_path))
  ckpts.save(1, state)
  ckpts.wait()
  _, clipped = _state(_with(adam, 'optimizer.grad_clip_norm', 1.0))
  # clip_by_global_norm comes first in the chain: Adam's state moves from
  # opt_state/0 to opt_state/1/0.
  with pytest.raises(
    checkpointing.CheckpointError,
    match=r"this config has 'opt_state/1/0/count'.*"
    r"only the checkpoint has 'opt_state/0/count'",
  ):
    ckpts.restore(clipped, 1)
  ckpts.close()


def test_a_reason_is_never_empty():
  def deep_inside():
    raise AssertionError()  # As a bare `assert` deep in a library does.

  try:
    deep_inside()
  except AssertionError as e:
    text = checkpointing.reason(e)
  assert text.startswith('AssertionError in test_restore.py:')
  assert checkpointing.reason(ValueError('two\n  lines')) == 'two lines'


def test_max_to_keep_zero_is_refused():
  config = _with(_base(), 'max_to_keep', 0)
  with pytest.raises(
    config_schema.ConfigError, match=r'config.max_to_keep=0: must be >= 1'
  ):
    helpers.validate(config, 4)


class _FakeCheckpoints:
  def __init__(self, steps):
    self.steps = steps

  def all_steps(self):
    return self.steps

  def latest_step(self):
    return max(self.steps) if self.steps else None


def test_a_stop_promises_only_a_checkpoint_on_disk():
  message = trainer._stopped_message  # pylint: disable=protected-access
  assert 'saved a checkpoint there' in message(
    'SIGTERM', 6, _FakeCheckpoints([3, 6])
  )
  text = message('SIGTERM', 6, _FakeCheckpoints([3]))
  assert 'not written' in text and 'newest complete checkpoint is step 3' in (
    text
  )
  assert 'no checkpoint was saved' in message('SIGINT', 2, _FakeCheckpoints([]))


@pytest.mark.parametrize('foreign', ['later step', 'other config'])
def test_a_new_run_sets_another_runs_best_checkpoint_aside(foreign, tmp_path):
  """A best checkpoint left in the workdir by another run (from a later step,
  or of another config) with a perfect score: without the check, Orbax keeps
  it as the best, and the final test evaluates it."""
  config = _base()
  workdir = str(tmp_path)
  other = (
    config if foreign == 'later step' else _with(config, 'model.num_experts', 3)
  )
  step = 100 if foreign == 'later step' else 1
  ckpts = checkpointing.Checkpoints(workdir)
  ckpts.save_best(step, _state(other, seed=5)[0], metric=1.0)
  ckpts.close()
  result = trainer.train_and_evaluate(config, workdir)
  assert result['step'] in (1, 2)
  assert os.listdir(os.path.join(workdir, 'previous_best')) == [str(step)]
  assert checkpointing.Checkpoints(workdir, create=False).best_step() in (1, 2)


def test_a_best_checkpoint_without_a_score_ranks_below_scored_ones(
  tmp_path, monkeypatch
):
  state, _ = _state(_base())
  # A best checkpoint whose metric has another name (as an older version
  # saved it) is still found, and any scored checkpoint replaces it.
  monkeypatch.setattr(checkpointing, 'BEST_METRIC', 'accuracy_mean')
  old = checkpointing.Checkpoints(str(tmp_path))
  old.save_best(1, state, 0.8)
  old.close()
  monkeypatch.undo()
  ckpts = checkpointing.Checkpoints(str(tmp_path))
  assert ckpts.best_step() == 1
  ckpts.save_best(2, state, 0.1)
  assert ckpts.best_step() == 2
  assert os.listdir(os.path.join(str(tmp_path), 'best')) == ['2']
  ckpts.close()


def test_a_workdir_is_evaluated_without_its_training_data(tmp_path):
  """A finished workdir is evaluated once its training data are gone:
  PaddleRec's train.pickle is deleted after training, and the evaluation
  (what eval.py runs) reads test.pickle alone and reproduces the trainer's
  test result."""
  import pickle  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  data = tmp_path / 'paddlerec'
  data.mkdir()
  for name, n in (('train', 400), ('test', 100)):
    x = rng.integers(0, 256, (n, 36, 36), dtype=np.uint8)
    y = rng.integers(0, 10, (n, 2))
    (data / f'{name}.pickle').write_bytes(pickle.dumps((x, y)))
  config = helpers.tiny_config(
    **{'data.name': 'paddlerec', 'data.paddlerec_dir': str(data)}
  )
  workdir = str(tmp_path / 'run')
  trained = trainer.train_and_evaluate(config, workdir)
  os.remove(data / 'train.pickle')
  evaluated = evaluate.evaluate_workdir(workdir)
  assert (evaluated['checkpoint'], evaluated['step']) == (
    trained['checkpoint'],
    trained['step'],
  )
  assert evaluated['num_examples'] == 100
  for t in (1, 2):
    assert evaluated[f'accuracy_{t}'] == trained[f'accuracy_{t}']


def test_no_best_checkpoint_points_to_the_periodic_ones(tmp_path):
  state, abstract = _state(_base())
  ckpts = checkpointing.Checkpoints(str(tmp_path))
  for step in (1, 2):
    ckpts.save(step, state)
  with pytest.raises(
    checkpointing.CheckpointError,
    match=r'holds no best checkpoint .*give --step=N for a periodic one '
    r'\(steps \[1, 2\]\)\.$',
  ):
    ckpts.restore_best(abstract)
  ckpts.close()
