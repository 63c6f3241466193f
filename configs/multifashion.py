"""DSelect-k on MultiFashion (two Fashion-MNIST articles), as multimnist.py.

python train.py --config=configs/multifashion.py --workdir=ckpts_fashion
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'multi_fashion'
  config.lock()
  return config
