"""The 5-epoch MultiMNIST recipe with DSelect-k's entropy regularizer.

configs/multimnist_fast.py plus the paper's entropy term (Section 4), which
pushes every selector to a one-hot vector so that each task ends up with at
most k = 2 experts, and sparse training: once a static gate gives an expert
weight exactly 0 for every task, the train step stops computing it (the
dense step would give it zero gradient anyway; see steps.SparseTrainSteps).

  python train.py --config=configs/multimnist_entropy.py --workdir=ckpts_ent
  python eval.py --workdir=ckpts_ent

The entropy weight ramps from 0 to 1 over the first 100 steps; once the
selectors saturate, sparse training computes only the experts still in use.
Its runs are in results/grid/ (cells multi_mnist-dselect_k-seed*).
"""

from configs import multimnist_fast


def get_config():
  config = multimnist_fast.get_config()
  config.loss.entropy_weight = 1.0
  config.loss.entropy_ramp_steps = 100
  config.model.sparse_train = True
  config.lock()
  return config
