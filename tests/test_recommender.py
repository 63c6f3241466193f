"""The recommender side: task losses and metrics by hand, and RecommenderMoE."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dselect_jax import models
from dselect_jax import tasks


def test_auc_by_hand():
  # Positives score 0.9, 0.4; negatives 0.5, 0.1. Pairs (pos > neg): 0.9 >
  # both, 0.4 > 0.1 only: 3 of 4.
  assert tasks.auc([0.9, 0.5, 0.4, 0.1], [1, 0, 1, 0]) == 0.75
  # A tie between a positive and a negative counts half: 0.5 against 0.5.
  assert tasks.auc([0.5, 0.5, 0.9], [1, 0, 0]) == 0.25
  assert tasks.auc([3.0, 2.0, 1.0], [1, 1, 0]) == 1.0
  assert math.isnan(tasks.auc([0.1, 0.2], [1, 1]))


def test_auc_equals_counting_every_pair():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 20, 300) / 20  # Many ties.
  labels = rng.random(300) < 0.3
  pos, neg = scores[labels], scores[~labels]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (
    pos[:, None] == neg[None, :]
  ).sum()
  assert tasks.auc(scores, labels) == pytest.approx(
    wins / (len(pos) * len(neg))
  )


def test_losses_and_metrics_keep_to_the_weighted_examples():
  output = jnp.array([0.0, 2.0, 5.0])
  target = jnp.array([1.0, 0.0, 3.0])
  weight = jnp.array([1.0, 1.0, 0.0])  # The third is unknown.
  # Squared error: (1 + 4) / 2; RMSE over the two known: sqrt(2.5).
  assert float(tasks.loss('regression', output, target, weight)) == 2.5
  assert tasks.metric('regression', output, target, weight) == pytest.approx(
    math.sqrt(2.5)
  )
  # Sigmoid cross-entropy: logit 0 on label 1 is log 2; logit 2 on label 0
  # is log(1 + e^2); mean of the two.
  expected = (math.log(2) + math.log(1 + math.e**2)) / 2
  assert float(tasks.loss('binary', output, target, weight)) == pytest.approx(
    expected, rel=1e-6
  )
  with pytest.raises(ValueError, match="unknown task kind 'ranking'"):
    tasks.loss('ranking', output, target, weight)


CARDS = (('user', 5), ('movie', 7))


def _inputs(batch=4):
  categorical = {
    'user': jnp.arange(batch) % 5,
    'movie': jnp.arange(batch) % 7,
  }
  return categorical, jnp.ones((batch, 3))


def test_feature_embedding_concatenates_lookups_and_dense():
  layer = models.FeatureEmbedding(CARDS, dim=2)
  categorical, dense = _inputs()
  variables = layer.init(jax.random.key(0), categorical, dense)
  out = layer.apply(variables, categorical, dense)
  assert out.shape == (4, 2 + 2 + 3)
  table = variables['params']['embed_movie']['embedding']  # (7, 2)
  np.testing.assert_array_equal(out[2, 2:4], table[2])
  np.testing.assert_array_equal(out[:, 4:], np.ones((4, 3)))
  with pytest.raises(ValueError, match=r"features \['movie'\] are missing"):
    layer.init(jax.random.key(0), {'user': categorical['user']}, dense)


@pytest.mark.parametrize('per_example', [False, True])
def test_recommender_moe_outputs_one_value_per_task(per_example):
  model = models.RecommenderMoE(
    num_tasks=2,
    cardinalities=CARDS,
    embed_dim=4,
    num_experts=4,
    gate_kwargs={'k': 2, 'per_example': per_example},
    expert_kwargs={'hidden': (8,), 'features': 6},
  )
  categorical, dense = _inputs()
  variables = model.init(
    {'params': jax.random.key(0), 'gating': jax.random.key(1)},
    categorical,
    dense,
    train=False,
  )
  outputs, aux = model.apply(variables, categorical, dense, train=False)
  assert outputs.shape == (2, 4)
  weights = aux['expert_weights']
  assert weights.shape == ((2, 4, 4) if per_example else (2, 4))
  # 4 experts are all 2^2 codes: each gate's weights sum to 1.
  np.testing.assert_allclose(
    weights.sum(-1), np.ones(weights.shape[:-1]), rtol=1e-5
  )
  # Shapes by hand: the experts see F = 4 + 4 (two embeddings) + 3 (dense)
  # features, 11 -> 8 -> 6; each tower 6 -> 32 -> 1.
  moe = variables['params']['moe']
  expert = moe['experts']['expert_0']
  assert expert['Dense_0']['kernel'].shape == (11, 8)
  assert expert['Dense_1']['kernel'].shape == (8, 6)
  assert moe['tower_0']['Dense_0']['kernel'].shape == (6, 32)
  assert moe['tower_0']['Dense_1']['kernel'].shape == (32, 1)
