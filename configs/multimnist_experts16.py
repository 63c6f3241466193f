"""Per-example DSelect-k over 16 CNN experts on MultiMNIST, dispatched.

configs/multimnist_entropy.py (the comet MultiMNIST, 5 epochs, batch 256,
Adam with warmup and cosine decay, DSelect-k's entropy term ramped in over
the first 100 steps) with E = 16 experts and one per-example gate per
task (k = 2): each composite picks its own experts per task. With
``model.sparse_dispatch`` each expert computes only the composites some
task routes to it, a bucket of slots per expert sized by its own load
(``steps.Dispatcher``, ``MultiTaskMoE.dispatch_buckets``; exact, and kept
only where it measured faster than the dense step), with its BatchNorm
statistics over those composites (``model.routed_statistics``), dense
or dispatched.

  python train.py --config=configs/multimnist_experts16.py --workdir=ckpts_mm16
  python eval.py --workdir=ckpts_mm16

Dense against dispatched, one seed each, test accuracy and wall time:
``bash results/multimnist_experts16/run.sh DATA`` (experiments/grid.py's
dselect_k_per_example and dselect_k_per_example_dispatch variants).
"""

from configs import multimnist_entropy


def get_config():
  config = multimnist_entropy.get_config()  # Locked: only its own fields.
  config.model.num_experts = 16
  config.model.gate.per_example = True
  config.model.sparse_train = False  # For static gates only.
  config.model.sparse_dispatch = True
  return config
