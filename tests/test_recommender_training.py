"""MovieLens through the trainer: feature batches, per-kind losses, the
evaluator's AUC and RMSE, and a run that trains, resumes and evaluates.

The data are files of the MovieLens-100K format written here (GroupLens's
terms forbid shipping the real ones): 40 users who each rate 15 of the first
60 movies, so the watch task (rated or a random unrated movie of all 1,682)
is learnable from the movie alone.
"""

import functools
import json
import math
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import movielens as movielens_config
from dselect_jax import config_schema
from dselect_jax import datasets
from dselect_jax import dispatch
from dselect_jax import evaluate
from dselect_jax import factory
from dselect_jax import metric_writers
from dselect_jax import steps
from dselect_jax import tasks
from dselect_jax import trainer
from dselect_jax.datasets import batching
from dselect_jax.datasets import movielens
from tests import helpers

NUM_USERS, NUM_MOVIES, PER_USER = 40, 60, 15


def _write_files(folder):
  """u.data / u.user / u.item of the toy catalogue above."""
  folder.mkdir(parents=True)
  ratings = []
  for u in range(1, NUM_USERS + 1):
    for j in range(PER_USER):
      m = 1 + (u * 7 + j * 4) % NUM_MOVIES  # 15 distinct movies per user.
      ratings.append(f'{u}\t{m}\t{1 + (u + m) % 5}\t{880000000 + j}')
  users = [
    f'{u}|{20 + u}|{"MF"[u % 2]}|{movielens.OCCUPATIONS[u % 21]}|00000'
    for u in range(1, NUM_USERS + 1)
  ]
  genres = lambda m: '|'.join('1' if g == m % 19 else '0' for g in range(19))
  items = [
    f'{m}|Movie {m}|01-Jan-{1950 + m}||http://x|{genres(m)}'
    for m in range(1, NUM_MOVIES + 1)
  ]
  for name, lines in (
    ('u.data', ratings),
    ('u.user', users),
    ('u.item', items),
  ):
    (folder / name).write_text('\n'.join(lines) + '\n', encoding='latin-1')


@pytest.fixture(scope='module')
def movielens_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('movielens_data')
  _write_files(root / 'movielens' / 'ml-100k')
  return str(root)


def tiny_config(data_dir, num_train_steps=40, **overrides):
  """configs/movielens.py on the toy files: 4 experts, batch 32."""
  config = movielens_config.get_config()
  config.data.data_dir = data_dir
  config.data.download = False
  config.model.num_experts = 4
  config.model.embed_dim = 4
  config.model.expert_hidden = 16
  config.model.expert_features = 8
  config.model.tower_hidden = 8
  config.batch_size = 32
  config.eval_batch_size = 56  # 120 examples: the last batch padded.
  config.num_train_steps = num_train_steps
  config.log_every_steps = 10
  config.eval_every_steps = 20
  config.checkpoint_every_steps = 20
  config.schedule.warmup_steps = 5
  config.loss.entropy_start_step = 10
  config.loss.entropy_ramp_steps = 10
  config.optimizer.learning_rate = 1e-2
  return helpers.set_fields(config, overrides)


def test_the_toy_data_are_what_the_tests_assume(movielens_dir):
  data = movielens.load(0, data_dir=movielens_dir)
  # 600 ratings and one unrated movie per rating: 1,200 examples, 80/10/10.
  assert [len(data[s]) for s in ('train', 'validation', 'test')] == [
    960,
    120,
    120,
  ]
  spec = movielens.spec()
  assert spec.task_kinds == ('binary', 'regression') and not spec.is_image


def test_feature_batches_hold_the_rows_of_each_device(movielens_dir):
  split = movielens.load(0, data_dir=movielens_dir)['train']
  batch = next(batching.train_batches(split, 8, 2, seed=3))
  # The first batch of epoch 0: the first 8 of that epoch's permutation,
  # sorted, 4 rows per device.
  rows = np.sort(batching.epoch_permutation(len(split), 3, 0)[:8])
  assert batch['dense'].shape == (2, 4, movielens.NUM_DENSE)
  assert batch['target'].shape == batch['weight'].shape == (2, 4, 2)
  np.testing.assert_array_equal(
    batch['categorical']['movie'],
    split.categorical['movie'][rows].reshape(2, 4),
  )
  np.testing.assert_array_equal(batch['target'][1], split.targets[rows[4:]])


def test_eval_batches_pad_the_last_batch_with_masked_zeros(movielens_dir):
  split = movielens.load(0, data_dir=movielens_dir)['test']
  batches = list(batching.eval_batches(split, 56, 4))
  # 120 = 56 + 56 + 8: the third batch has 8 real rows, on device 0 (rows
  # 0-13 of the batch), and 48 zero rows.
  assert len(batches) == 3
  last = batches[2]
  assert last['mask'].shape == (4, 14)
  assert last['mask'].sum() == 8 and last['mask'][0, :8].all()
  assert not last['categorical']['user'][1:].any()
  assert not last['weight'][0, 8:].any()
  np.testing.assert_array_equal(last['dense'][0, :8], split.dense[112:])


KINDS = ('binary', 'regression')
# Options of classification tasks only: no effect on these.
LOSS_CONFIG = movielens_config.get_config().loss


def test_kind_losses_by_hand():
  # Task 1 (binary) logits 0, 2, -1 on labels 1, 0, 0: log 2, log(1 + e^2),
  # log(1 + e^-1). Task 2 (regression) 3, 4, 5 on 4, -, 5 with the second
  # unknown (weight 0): (1 + 0) / 2.
  outputs = jnp.array([[0.0, 2.0, -1.0], [3.0, 4.0, 5.0]])
  batch = {
    'target': jnp.array([[1.0, 4.0], [0.0, 0.0], [0.0, 5.0]]),
    'weight': jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]),
  }
  losses = steps.one_device(
    functools.partial(
      steps.task_losses, task_kinds=KINDS, loss_config=LOSS_CONFIG
    )
  )(outputs[None], jax.tree.map(lambda x: x[None], batch))[0]
  expected = (
    math.log(2) + math.log(1 + math.e**2) + math.log1p(math.e**-1)
  ) / 3
  np.testing.assert_allclose(losses, [expected, 0.5], rtol=1e-6)


def test_kind_losses_average_over_devices_to_the_whole_batch():
  # Two shards of two examples; the rating is known for 1 example of the
  # first and 2 of the second, squared errors 1 | (9, 4) on the known ones.
  # The whole batch: (1 + 9 + 4) / 3. Each device: its weighted sum over the
  # mean weight 1.5, so 1 / 1.5 and 13 / 1.5, whose mean is 14 / 3.
  outputs = jnp.array([[[0.0, 0.0], [1.0, 9.0]], [[0.0, 0.0], [0.0, 3.0]]])
  batch = {
    'target': jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 3.0], [0.0, 1.0]]]),
    'weight': jnp.array([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]),
  }
  per_device = steps.one_device(
    functools.partial(
      steps.task_losses, task_kinds=KINDS, loss_config=LOSS_CONFIG
    )
  )(outputs, batch)
  np.testing.assert_allclose(per_device[:, 1], [1 / 1.5, 13 / 1.5], rtol=1e-6)
  assert float(per_device[:, 1].mean()) == pytest.approx(14 / 3)


@pytest.mark.slow  # 18 s; the image steps' equivalent runs by default.
def test_the_sharded_step_equals_the_step_on_the_whole_batch(movielens_dir):
  config = tiny_config(movielens_dir)
  model = helpers.create_model(config)
  tx = factory.create_optimizer(config, 10)
  state = helpers.initial_state(config, model, tx, jax.random.key(0))
  split = datasets.resolve(config.data).train
  batch = next(batching.train_batches(split, 32, 1, seed=0))
  step = steps.one_device(
    functools.partial(
      steps.train_step, loss_config=config.loss, task_kinds=KINDS
    ),
    in_axes=(0, 0, None),
  )
  results = []
  for n in (1, 4):
    # jit(vmap) over n shards: the collectives of n devices.
    sharded = jax.tree.map(
      lambda x: x.reshape((n, 32 // n) + x.shape[2:]), batch
    )
    replicated = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), state
    )
    new_state, metrics = step(replicated, sharded, jax.random.key(1))
    results.append(
      jax.tree.map(lambda x: np.asarray(x)[0], (new_state.params, metrics))
    )
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6),
    results[0],
    results[1],
  )
  # The shards' rated examples differ, so a per-shard mean would not do.
  per_shard = batch['weight'][0, :, 1].reshape(4, 8).sum(1)
  assert len(set(per_shard.tolist())) > 1


def test_classification_kind_by_hand():
  logits = jnp.array([[0.0, 0.0], [2.0, 0.0]])
  target = jnp.array([1, 1])
  # Cross-entropy: log 2 and log(1 + e^2); the second example is wrong.
  expected = (math.log(2) + math.log(1 + math.e**2)) / 2
  loss = tasks.loss('classification', logits, target, jnp.ones(2))
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert (
    tasks.metric('classification', np.array([[0, 1], [2, 0]]), [1, 1], [1, 1])
    == 0.5
  )


@pytest.mark.slow  # For the 5-minute default run.
def test_the_evaluator_scores_every_example_once(movielens_dir):
  config = tiny_config(movielens_dir)
  dataset = datasets.resolve(config.data)
  model = helpers.create_model(config)
  tx = factory.create_optimizer(config, 10)
  state = helpers.initial_state(config, model, tx, jax.random.key(0))
  test = dataset.test
  scores = evaluate.make_evaluator(config, model, dataset.spec)(
    steps.replicate(state), test, config.eval_batch_size
  )
  assert scores['metric_names'] == ['auc', 'rmse']
  result = metric_writers.flatten(scores)  # As the metrics files hold it.
  # The same outputs on the whole split at once, and the metrics by hand.
  outputs, _ = model.apply(
    {'params': state.params},
    test.categorical,
    test.dense,
    train=False,
  )
  outputs = np.asarray(outputs)
  watch, rating = test.targets[:, 0] > 0, test.weights[:, 1] > 0
  pos, neg = outputs[0][watch], outputs[0][~watch]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (
    pos[:, None] == neg[None, :]
  ).sum()
  assert result['num_examples'] == 120
  assert result['auc_1'] == pytest.approx(wins / (len(pos) * len(neg)))
  errors = outputs[1][rating] - test.targets[rating, 1]
  assert result['rmse_2'] == pytest.approx(
    np.sqrt(np.mean(errors**2)), rel=1e-5
  )
  assert result['loss_2'] == pytest.approx(np.mean(errors**2), rel=1e-5)
  assert result['selection_score'] == pytest.approx(
    -(result['loss_1'] + result['loss_2'])
  )
  assert evaluate.headline(result) == (
    f'auc {result["auc_1"]:.4f}, rmse {result["rmse_2"]:.4f}'
  )


@pytest.mark.parametrize(
  'per_example', [False, pytest.param(True, marks=pytest.mark.slow)]
)
def test_a_movielens_run_trains_resumes_and_evaluates(
  movielens_dir, tmp_path, per_example
):
  workdir = str(tmp_path / 'run')
  # A constant rate: a cosine schedule's length is the call's step count.
  overrides = {
    'model.gate.per_example': per_example,
    'schedule.name': 'constant',
  }
  first = trainer.train_and_evaluate(
    tiny_config(movielens_dir, 20, **overrides), workdir
  )
  assert first['step'] == 20
  result = trainer.train_and_evaluate(
    tiny_config(movielens_dir, 60, **overrides), workdir
  )
  records = [
    json.loads(line)
    for line in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')
  ]
  # Resumed at 20: the train log steps 10, 20 of the first call, then 30..60.
  train_steps = [r['step'] for r in records if r['split'] == 'train']
  assert train_steps == [10, 20, 30, 40, 50, 60]
  valid = [r for r in records if r['split'] == 'validation']
  assert [r['step'] for r in valid] == [20, 40, 60]
  # The kept checkpoint is the validation pass of highest selection score.
  best = max(valid, key=lambda r: r['selection_score'])
  assert result['step'] == best['step'] and result['checkpoint'] == 'best'
  # The watched movies are 60 of 1,682: learnable from the movie embedding.
  assert result['auc_1'] > 0.75
  with open(os.path.join(workdir, 'test_metrics.json')) as f:
    assert json.load(f)['auc_1'] == result['auc_1']
  again = evaluate.evaluate_workdir(workdir)
  assert (
    again['auc_1'] == result['auc_1'] and again['rmse_2'] == result['rmse_2']
  )


@pytest.mark.slow
def test_a_resumed_movielens_run_equals_an_uninterrupted_one(
  movielens_dir, tmp_path
):
  # A constant rate: a cosine schedule's length is the call's step count.
  constant = {'schedule.name': 'constant'}
  resumed = str(tmp_path / 'resumed')
  trainer.train_and_evaluate(
    tiny_config(movielens_dir, 20, **constant), resumed
  )
  result = trainer.train_and_evaluate(
    tiny_config(movielens_dir, 60, **constant), resumed
  )
  straight = trainer.train_and_evaluate(
    tiny_config(movielens_dir, 60, **constant), str(tmp_path / 'straight')
  )
  assert straight['step'] == result['step']
  assert straight['auc_1'] == result['auc_1']
  assert straight['rmse_2'] == result['rmse_2']


@pytest.mark.parametrize(
  'field,value',
  [
    ('model.expert_bank', 'vmap'),
    ('loss.name', 'double_softmax'),
    ('test_every_epoch', True),
    ('data.fresh_train', True),
  ],
)
def test_image_only_fields_are_refused_for_movielens(
  movielens_dir, field, value
):
  config = tiny_config(movielens_dir, **{field: value})
  with pytest.raises(config_schema.ConfigError) as e:
    helpers.validate(config, 1)
  assert str(e.value).startswith(f'config.{field}={value!r}: applies to the')
  assert 'leave it at' in str(e.value)


def _assert_compiled_ahead(model, config, state, dataset, rng):
  """The Dispatcher compiles new bounds in its thread for the shapes of
  the step's arguments (weak types and placements too): running the
  compiled step then compiles nothing more."""
  train_steps = steps.SparseTrainSteps(model, config, KINDS)
  dispatcher = train_steps.dispatcher
  dispatcher.probe_every = 1  # A look at every dense batch.
  run_state = steps.replicate(state)
  batch = next(batching.train_batches(dataset.train, 128, 4, seed=0))
  for _ in range(2):  # The same load twice: its bounds compile, in a thread.
    run_state, _ = train_steps(run_state, 0)(run_state, batch, rng)
  dispatcher.wait()
  compiled = []  # The threads that compiled an XLA program since.

  def on_compile(event, *_, **__):
    if event == '/jax/core/compile/backend_compile_duration':  # XLA's.
      compiled.append(threading.current_thread().name)

  jax.monitoring.register_event_duration_secs_listener(on_compile)
  try:
    run_state, _ = train_steps(run_state, 0)(run_state, batch, rng)
    jax.block_until_ready(run_state)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_compile)
  dispatcher.read_reports()
  assert dispatcher.dispatched == 1
  assert compiled == []


@pytest.mark.slow  # 18 s; tests/test_dispatch.py covers the parts by default.
def test_sparse_dispatch_trains_and_evaluates_as_the_dense_model(movielens_dir):
  """Per-example DSelect-k gates, saturated (bit logits scaled far outside
  [-gamma/2, gamma/2]): with model.sparse_dispatch each batch
  is dispatched (each expert computes only its routed examples), and the
  steps and the evaluation give what the dense model gives."""
  fields = {
    'model.gate.per_example': True,
    # 64 experts, so that the routed pairs (at most 2 per example) fill at
    # most half of the dense rows' blocks: the Dispatcher dispatches.
    'model.num_experts': 64,
    'model.gate.k': 1,
    'batch_size': 128,
    'eval_batch_size': 120,
    'optimizer.name': 'sgd',
  }
  config = tiny_config(
    movielens_dir, **fields, **{'model.sparse_dispatch': True}
  )
  dense_config = tiny_config(movielens_dir, **fields)
  helpers.validate(config, 4)
  dataset = datasets.resolve(config.data)
  model = helpers.create_model(config, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, 10)
  state = helpers.initial_state(config, model, tx, jax.random.key(0))
  params = jax.tree.map(np.asarray, state.params)
  for g in ('gate_0', 'gate_1'):
    for leaf in ('kernel', 'bias'):
      params['moe'][g]['z_logits'][leaf] = (
        params['moe'][g]['z_logits'][leaf] * 1000
      )
  state = state.replace(params=params)
  rng = jax.random.key(1)

  finals = []
  for run_config in (config, dense_config):
    train_steps = steps.SparseTrainSteps(model, run_config, KINDS)
    assert (train_steps.dispatcher is not None) == (run_config is config)
    if run_config is config:  # Compiled at the batch that needs it.
      train_steps.dispatcher.compile_ahead = False
    run_state = steps.replicate(state)
    batches = batching.train_batches(dataset.train, 128, 4, seed=0)
    for _ in range(3):
      run_state, _ = train_steps(run_state, 0)(run_state, next(batches), rng)
    if run_config is config:  # Each expert computed a part of the batch.
      dispatcher = train_steps.dispatcher
      dispatcher.read_reports()
      # Blocks of the routed pairs, fewer than the dense 8 x 32 rows.
      assert (
        dispatcher.bounds['dispatch_blocks'] <= 64 * 32 // dispatch.BLOCK // 2
      )
      # Bounds come from the batches before: one may not fit (and runs
      # densely, exact either way).
      assert dispatcher.dispatched >= 1
      assert dispatcher.dispatched + dispatcher.fallbacks == 3
    finals.append(run_state)
  _assert_compiled_ahead(model, config, state, dataset, rng)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
    jax.device_get(finals[0].params),
    jax.device_get(finals[1].params),
  )

  sparse_eval = evaluate.make_evaluator(config, model, dataset.spec)
  dense_eval = evaluate.make_evaluator(dense_config, model, dataset.spec)
  assert dense_eval.dispatcher is None
  sparse_eval.dispatcher.compile_ahead = False
  got = sparse_eval(finals[0], dataset.test, config.eval_batch_size)
  want = dense_eval(finals[0], dataset.test, config.eval_batch_size)
  sparse_eval.dispatcher.read_reports()
  assert sparse_eval.dispatcher.bounds is not None
  assert sparse_eval.dispatcher.dispatched > 0
  np.testing.assert_allclose(
    got['per_task']['metric'], want['per_task']['metric'], rtol=1e-5
  )
  np.testing.assert_allclose(
    got['per_task']['loss'], want['per_task']['loss'], rtol=1e-5
  )
  np.testing.assert_allclose(
    got['expert_weights'], want['expert_weights'], rtol=1e-6
  )
