"""PaddleRec's DSelect-k MultiMNIST setup, as faithfully as we know it.

PaddleRec (models/multitask/dselect_k) reports test accuracy 0.930460 /
0.916088. Its setup, reproduced here field by field:
- data: the Pareto MTL MultiMNIST (`paretomtl`: digits on the diagonal,
  16 placements, sum clipped at 255), 100,000 train composites read in
  stored order every epoch (no shuffling; the last partial batch dropped);
- model: 8 CNN experts, ONE DSelect-k gate shared by both tasks (k = 2,
  gamma = 1), PaddleRec's initializers (Xavier-normal convolutions,
  truncated-normal dense layers, gate weight logits U(-1, 1));
- loss: softmax in the tower and another in the loss (`double_softmax`);
- Adam at a constant 1e-3, batch 256, 100 epochs.
- its figure: the test accuracy pooled over the test passes after all ~100
  epochs (its tools/infer.py never reset its metric), which
  test_metrics.json reports as test_statistics.pooled_over_epochs.

What PaddleRec did not have: the 20,000 validation composites (the last
ones of Pareto MTL's 120,000 train composites, as PaddleRec's readme splits
them) and the best-on-validation checkpoint, reported beside it.

  python train.py --config=configs/paddlerec.py --workdir=ckpts_paddlerec
  python eval.py --workdir=ckpts_paddlerec

PaddleRec's own pickles: --config.data.name=paddlerec
--config.data.paddlerec_dir=DIR. Measured: results/paddlerec_comparison/paddlerec/ (experiments/
paddlerec_comparison.sh).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'multi_mnist'
  config.data.recipe = 'paretomtl'
  config.data.shuffle = False
  config.model.shared_gate = True
  config.model.init_scheme = 'paddlerec'
  config.loss.name = 'double_softmax'
  config.test_every_epoch = True
  config.lock()
  return config
