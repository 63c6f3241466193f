"""Quick start: the MultiMNIST recipe on the sample shipped in the package.

No download, no data directory; 1 min 44 s on a 2-core CPU for train.py
and eval.py together, the CPU kernels' first build included
(results/benchmarks/quickstart.txt): test accuracy 0.911 / 0.910.

  python train.py --config=configs/multimnist_sample.py --workdir=/tmp/sample
  python eval.py --workdir=/tmp/sample

4,000 train / 1,000 validation / 1,000 test composites (`multi_mnist_sample`).
The model and optimizer are the reference recipe's (8 experts, DSelect-k
k = 2, Adam 1e-3); batch 128 for more steps in the short run.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'multi_mnist_sample'
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 4
  config.log_every_steps = 10
  config.lock()
  return config
