"""The MultiMNIST recipe tuned for time to accuracy on a 2-core CPU.

The model and optimizer of configs/default.py (8 experts, one DSelect-k
gate per task with k = 2, Adam, batch 256) on the comet MultiMNIST, trained
for 5 epochs with a 300-step linear warmup to 1e-3 and a cosine decay to 0.

  python train.py --config=configs/multimnist_fast.py --workdir=ckpts_fast
  python eval.py --workdir=ckpts_fast

Target: test accuracy >= 0.930460 (task 1) and >= 0.916088 (task 2), the
checkpoint chosen on validation (PaddleRec's figures are on other data, its
Pareto MTL MultiMNIST, and another statistic: a target, not a comparison). What it reached,
over 3 seeds, and how long it took: results/multimnist_fast/ (generated
summary in docs/results.md).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'multi_mnist'
  config.data.recipe = 'comet'
  config.num_epochs = 5
  config.schedule.name = 'warmup_cosine'
  config.schedule.warmup_steps = 300
  config.lock()
  return config
