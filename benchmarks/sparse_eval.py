"""Sparse against dense evaluation once a static gate has converged.

  python benchmarks/sparse_eval.py [--experts=8] [--k=2] [--examples=10000]

A MultiTaskMoE whose DSelect-k gates are saturated (each selector one-hot),
as after training: with --shared_gate (PaddleRec's setup, the default) both
tasks use the same k experts; without it each task has its own. Times
evaluate.Evaluator over the same split with sparse=False (all experts) and
sparse=True (only the used ones), in one process, and checks that both give
the same accuracies, losses and weights.
"""

import time

from absl import flags
import flax
import jax
import numpy as np

from configs import multimnist
from dselect_jax import cli
from dselect_jax import datasets
from dselect_jax import evaluate
from dselect_jax import factory
from dselect_jax import gates
from dselect_jax import metric_writers
from dselect_jax import steps
from dselect_jax.datasets import multimnist as multimnist_data

_EXPERTS = flags.DEFINE_integer('experts', 8, 'Experts.', lower_bound=2)
_K = flags.DEFINE_integer('k', 2, 'Selectors per gate.', lower_bound=1)
_SHARED = flags.DEFINE_bool('shared_gate', True, 'One gate for both tasks.')
_EXAMPLES = flags.DEFINE_integer(
  'examples', 10000, 'Examples evaluated.', lower_bound=1
)
_BATCH = flags.DEFINE_integer('batch', 1000, 'Eval batch.', lower_bound=1)


def saturated_params(params, num_experts, k, rng):
  """Gate params whose selectors each pick one distinct expert."""
  params = flax.core.unfreeze(params)
  codes = gates.binary_codes(num_experts)
  for name in [n for n in params if n.startswith('gate_')]:
    chosen = rng.choice(num_experts, k, replace=False)
    params[name]['z_logits'] = np.where(codes[chosen], 1.0, -1.0).astype(
      np.float32
    )
  return params


def main(argv):
  del argv
  config = multimnist.get_config()
  config.model.num_experts = _EXPERTS.value
  config.model.gate.k = _K.value
  config.model.shared_gate = _SHARED.value
  spec = datasets.resolve(config.data).spec
  model = factory.create_model(config, spec, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, 100)
  state = factory.initial_state(model, tx, jax.random.key(0), spec)
  state = state.replace(
    params=saturated_params(
      state.params, _EXPERTS.value, _K.value, np.random.default_rng(0)
    )
  )
  state = steps.replicate(state)
  rng = np.random.default_rng(1)
  split = multimnist_data.Split(
    rng.integers(0, 256, (_EXAMPLES.value, 36, 36), dtype=np.uint8),
    rng.integers(0, 10, (_EXAMPLES.value, 2)).astype(np.int32),
  )
  n = jax.local_device_count()
  results, rates = {}, {}
  for sparse in (False, True):
    evaluator = evaluate.Evaluator(model, n, spec.task_kinds, sparse=sparse)
    evaluator(state, split, _BATCH.value)  # Compile.
    best = float('inf')
    for _ in range(3):
      start = time.perf_counter()
      results[sparse] = evaluator(state, split, _BATCH.value)
      best = min(best, time.perf_counter() - start)
    rates[sparse] = _EXAMPLES.value / best
    print(
      f'{"sparse" if sparse else "dense ":6s} experts computed: '
      f'{evaluator.active(state) or "all"}  {rates[sparse]:8.0f} '
      'examples/s',
      flush=True,
    )
  dense, sparse = (results[s][metric_writers.PER_TASK] for s in (False, True))
  same = np.array_equal(dense['metric'], sparse['metric']) and (
    results[False]['expert_weights'] == results[True]['expert_weights']
  )
  loss_diff = np.max(np.abs(dense['loss'] - sparse['loss']))
  print(
    f'sparse / dense speed: x{rates[True] / rates[False]:.2f}; same '
    f'accuracies and weights: {same}; largest loss difference: '
    f'{loss_diff:.2e}'
  )


if __name__ == '__main__':
  cli.run(main)
