"""DSelect-k on Multi-(Fashion+MNIST): a digit top-left, an article
bottom-right, as multimnist.py.

  python train.py --config=configs/multi_fashion_mnist.py --workdir=ckpts_fm
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'multi_fashion_mnist'
  config.lock()
  return config
