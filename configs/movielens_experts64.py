"""Per-example DSelect-k over 64 experts on MovieLens-100K, dispatched.

configs/movielens.py (watch and rating, embedded features, MLP experts
64 -> 32, k = 2, the entropy term ramped in over the second and third
epochs, Adam 3e-3, batch 512, 20 epochs) with E = 64 experts and one
per-example gate per task: each (user, movie) pair picks its own k
experts per task. With ``model.sparse_dispatch`` each batch computes each
expert only on the examples some task routes to it (steps.Dispatcher:
exact, kept where it measured faster than the dense step), so a step
costs about what the examples' T·k experts cost, not what 64 cost.

  python train.py --config=configs/movielens_experts64.py --workdir=ckpts_ml64
  python eval.py --workdir=ckpts_ml64

Dense against dispatched, 3 seeds each, test AUC / RMSE and wall time:
results/movielens_experts64/ (experiments/grid.py's
dselect_k_per_example and dselect_k_per_example_dispatch variants).
"""

from configs import movielens


def get_config():
  config = movielens.get_config()  # Locked: only its own fields are set.
  config.model.num_experts = 64
  config.model.gate.per_example = True
  config.model.sparse_dispatch = True
  return config
