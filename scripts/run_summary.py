"""Prints the summary of a run that its notes report, from its workdir.

  python scripts/run_summary.py WORKDIR [--after=28080]

Reads the workdir's metrics.jsonl through metric_writers.read_metrics (so the
records a resumed run wrote twice count once) and prints: the best
validation record (by its selection_score, the trainer's choice of the best
checkpoint), the range of each task's validation metric and the train log
windows' images/s after step --after (the part of the run a session added),
the peak resident memory, each task's expert weights at the last validation,
and the test record, if there is one.
"""

import argparse
import os
import sys

import numpy as np

from dselect_jax import metric_writers


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdir')
  parser.add_argument(
    '--after',
    type=int,
    default=0,
    help='Ranges and speeds over the steps after this one.',
  )
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.workdir, 'metrics.jsonl')):
    sys.exit(f'no metrics.jsonl in {args.workdir}: give a train.py workdir.')
  records = metric_writers.read_metrics(args.workdir)
  val = [r for r in records if r['split'] == 'validation']
  train = [r for r in records if r['split'] == 'train']
  if not val:
    sys.exit(f'{args.workdir}: no validation record yet.')

  # Records written before selection_score existed: the mean accuracy.
  best = max(
    val,
    key=lambda r: (
      r.get('selection_score', r.get('accuracy_mean')),
      -r['step'],
    ),
  )
  print(
    f'validation: {len(val)} records, last at step {val[-1]["step"]}; '
    f'best at step {best["step"]}: {_metrics(best, 4)}'
  )
  later = [r for r in val if r['step'] > args.after]
  if later:
    ranges = [
      f'task {t} {prefix}{min(r[k] for r in later):.4f}-'
      f'{max(r[k] for r in later):.4f}'
      for t, (k, prefix) in enumerate(_keys(later[0]), 1)
    ]
    print(f'validation after step {args.after}: {", ".join(ranges)}')
  speeds = np.array(
    [r['images_per_second'] for r in train if r['step'] > args.after]
  )
  if speeds.size:
    p10, p50, p90 = np.percentile(speeds, [10, 50, 90])
    print(
      f'train log windows after step {args.after}: {speeds.size}, '
      f'median {p50:.0f} images/s (10th-90th percentile {p10:.0f}-'
      f'{p90:.0f})'
    )
  if train:
    print(
      f'peak resident memory: {max(r["peak_rss_mb"] for r in train):.0f} MB'
    )
  for task, weights in enumerate(val[-1]['expert_weights'], start=1):
    print(
      f'task {task} expert weights at step {val[-1]["step"]}: '
      f'{min(weights):.3f}-{max(weights):.3f}, '
      f'{val[-1]["num_nonzero"][task - 1]} experts in use'
    )
  for r in records:
    if r['split'] == 'test':
      print(
        f'test ({r.get("checkpoint", "?")} checkpoint, step {r["step"]}):'
        f' {_metrics(r, 5)}'
      )


def _keys(record) -> list[tuple[str, str]]:
  """Each task's metric key in a record, and how to name it in a line:
  nothing for accuracies, else ``auc ``, ``rmse ``."""
  pairs = metric_writers.task_metrics(record)
  plain = all(name == 'accuracy' for name, _ in pairs)
  return [
    (f'{name}_{t}', '' if plain else f'{name} ')
    for t, (name, _) in enumerate(pairs, 1)
  ]


def _metrics(record, digits: int) -> str:
  """``0.9500 / 0.8500``, or ``auc 0.8229 / rmse 0.9718``."""
  return ' / '.join(
    f'{prefix}{record[key]:.{digits}f}' for key, prefix in _keys(record)
  )


if __name__ == '__main__':
  main()
