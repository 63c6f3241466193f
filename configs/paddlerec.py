"""PaddleRec's exact DSelect-k setup, for a like-for-like comparison.

One gate shared by both tasks, `paretomtl`-style MultiMNIST (or PaddleRec's
own pickles with --config.data.name=paddlerec
--config.data.paddlerec_dir=DIR), Adam 1e-3, batch 256, 100 epochs. What we
keep from our own recipe: one softmax (in the loss) and the validation split
for checkpoint selection.

  python train.py --config=configs/paddlerec.py --workdir=ckpts_paddlerec
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'multi_mnist'
  config.data.recipe = 'paretomtl'
  config.model.shared_gate = True
  config.lock()
  return config
