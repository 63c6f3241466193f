"""PNG figures: data samples, expert weights, training curves (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from dselect_jax import metric_writers


def sample_grid(
  images: np.ndarray,
  labels: np.ndarray,
  title: str,
  path: str,
  rows: int = 4,
  cols: int = 8,
) -> str:
  """A grid of composites, each titled with its (task 1, task 2) labels."""
  fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows + 0.4))
  for i, ax in enumerate(np.ravel(axes)):
    ax.axis('off')
    if i < len(images):
      ax.imshow(images[i], cmap='gray', vmin=0, vmax=255)
      ax.set_title(f'{labels[i][0]} | {labels[i][1]}', fontsize=9)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def expert_weights(
  weights: np.ndarray, path: str, task_names: Sequence[str] | None = None
) -> str:
  """Bar chart of each task's gate weights over the experts, (T, E)."""
  weights = np.asarray(weights)
  num_tasks, num_experts = weights.shape
  fig, axes = plt.subplots(
    1, num_tasks, figsize=(4 * num_tasks, 3), squeeze=False
  )
  for t, ax in enumerate(axes[0]):
    ax.bar(np.arange(num_experts), weights[t])
    ax.set_xticks(np.arange(num_experts))
    ax.set_ylim(0, 1)
    ax.set_xlabel('expert')
    ax.set_ylabel('weight')
    ax.set_title(task_names[t] if task_names else f'task {t + 1}')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def expert_weights_over_training(
  metrics_file: str, path: str, title: str = ''
) -> str:
  """Each task's static gate weights against the training step, a line per
  expert (the train records' ``expert_weights``, (T, E) per log step), on
  a log step axis: the gates settle early in a long run."""
  records = metric_writers.read_records(metrics_file)
  train = [r for r in records if r.get('split') == 'train']
  train = [r for r in train if 'expert_weights' in r]
  if not train:
    raise ValueError(
      f'{metrics_file}: no train record holds expert_weights (per-example '
      'gates log none); nothing to plot.'
    )
  steps = np.array([r['step'] for r in train])
  weights = np.array([r['expert_weights'] for r in train])  # (N, T, E)
  num_tasks, num_experts = weights.shape[1:]
  fig, axes = plt.subplots(
    1, num_tasks, figsize=(5 * num_tasks, 3.2), sharey=True, squeeze=False
  )
  colors = plt.get_cmap('tab10')
  for t, ax in enumerate(axes[0]):
    final = weights[-1, t]
    for e in range(num_experts):
      ax.plot(
        steps,
        weights[:, t, e],
        color=colors(e % 10),
        lw=1.6 if final[e] > 0 else 0.8,
        ls='-' if final[e] > 0 else ':',
        label=f'expert {e}',
      )
    ax.set_xscale('log')
    ax.set_xlabel('training step')
    ax.set_title(f'task {t + 1}')
  axes[0][0].set_ylabel('gate weight')
  axes[0][-1].legend(fontsize=7, ncol=2)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def training_curves(metrics_file: str, path: str) -> str:
  """Train loss and each task's validation metric (accuracy, AUC, RMSE)
  against the step."""
  records = metric_writers.read_records(metrics_file)
  train = [r for r in records if r.get('split') == 'train']
  valid = [r for r in records if r.get('split') == 'validation']
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
  if train:
    ax_loss.plot([r['step'] for r in train], [r['loss'] for r in train])
  ax_loss.set_xlabel('step')
  ax_loss.set_ylabel('train loss')
  ax_loss.set_yscale('log')
  # Each task's metric (accuracy, AUC or RMSE), named as the first
  # validation record names it.
  metrics = [metric_writers.task_metrics(r) for r in valid]
  for t, (name, _) in enumerate(metrics[0] if metrics else []):
    ax_acc.plot(
      [r['step'] for r in valid],
      [pairs[t][1] for pairs in metrics],
      marker='.',
      label=f'task {t + 1} ({name})',
    )
  ax_acc.set_xlabel('step')
  ax_acc.set_ylabel('validation metric')
  if valid:
    ax_acc.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return os.path.abspath(path)
