"""Per-class test accuracy of one checkpoint, and how often each class is
predicted: shows a model that never predicts some classes.

  python scripts/per_class.py WORKDIR [--step=N]

Restores the checkpoint as eval.py does (--step=N: that periodic one; by
default the best-on-validation one, else the newest); prints, for each
task, the accuracy, the accuracy on each true class 0..9 and the share of the
test split predicted as each class.
"""

import argparse
import sys

import jax
import numpy as np

from dselect_jax import checkpointing
from dselect_jax import config_schema
from dselect_jax import evaluate
from dselect_jax.datasets import multimnist
from dselect_jax.datasets import sources


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdir')
  parser.add_argument('--step', type=int, default=None)
  parser.add_argument('--batch_size', type=int, default=1000)
  args = parser.parse_args()
  if args.batch_size < 1:
    sys.exit(f'error: --batch_size={args.batch_size}: give a positive integer.')
  try:
    config, model, dataset, state, _, step = evaluate.restore_workdir(
      args.workdir, args.step, best=False
    )
  except (
    checkpointing.CheckpointError,
    config_schema.ConfigError,
    sources.DataError,
  ) as e:
    sys.exit(f'error: {e}')
  if not dataset.spec.is_image:
    sys.exit(
      f'error: per-class accuracy is for the image data sets; '
      f'{config.data.name!r} has tasks of kinds {dataset.spec.task_kinds} '
      '(eval.py reports their metrics).'
    )

  @jax.jit
  def logits(images):  # (B, H, W, 1) -> (T, B, C)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return model.apply(variables, images, train=False)[0]

  test = dataset.test
  predicted = np.concatenate(
    [
      np.asarray(
        logits(multimnist.to_model_input(test.images[i : i + args.batch_size]))
      ).argmax(-1)
      for i in range(0, len(test.images), args.batch_size)
    ],
    axis=1,
  )  # (T, N)
  num_classes = dataset.spec.num_classes
  print(
    f'{args.workdir}, checkpoint at step {step}, test split '
    f'({len(test.images)} examples)'
  )
  for t in range(predicted.shape[0]):
    truth = test.labels[:, t]
    per_class = [
      (predicted[t][truth == c] == c).mean() for c in range(num_classes)
    ]
    share = np.bincount(predicted[t], minlength=num_classes) / len(truth)
    print(f'task {t + 1}: accuracy {np.mean(predicted[t] == truth):.4f}')
    print(
      '  accuracy per true class  ', ' '.join(f'{a:.2f}' for a in per_class)
    )
    print('  share predicted per class', ' '.join(f'{s:.2f}' for s in share))


if __name__ == '__main__':
  main()
