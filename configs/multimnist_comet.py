"""DSelect-k on the `comet` MultiMNIST: an easier variant than PaddleRec's data.

The reference recipe (8 CNN experts, one DSelect-k gate per task with k = 2
and gamma = 1, Adam at 1e-3, batch 256, 100 epochs, checkpoint chosen on
validation) on the construction the DSelect-k authors describe: both digits
at fixed, far-apart positions (rows/cols 0..27 and 8..35). Much easier than
the Pareto MTL data of PaddleRec's 0.930460 / 0.916088, so its accuracies
are not comparable with those (configs/multimnist.py and configs/paddlerec.py
are).

  python train.py --config=configs/multimnist_comet.py --workdir=ckpts_comet
  python eval.py --workdir=ckpts_comet

Data: 100,000 train / 20,000 validation / 20,000 test. Measured:
results/multimnist_comet/ (100 epochs, 3 seeds).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'multi_mnist'
  config.data.recipe = 'comet'
  config.lock()
  return config
