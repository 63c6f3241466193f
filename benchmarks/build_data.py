"""Times building the MultiMNIST family from the raw files (no cache).

  python benchmarks/build_data.py --data_dir=../shared/data

Prints, per data set and recipe, the seconds to read the raw files and the
seconds to build all composites (train + validation + test), and the ratio of
the total to the 10 s budget of the data issue.
"""

import time

from absl import flags

from dselect_jax import cli
from dselect_jax.datasets import multimnist
from dselect_jax.datasets import sources

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Raw files folder.')
_REPEATS = flags.DEFINE_integer(
  'repeats', 3, 'Builds per cell; best is kept.', lower_bound=1
)
BUDGET_S = 10.0


def main(argv):
  del argv
  print(
    f'{"data set":22s} {"recipe":10s} {"images":>8s} {"read s":>7s} '
    f'{"build s":>8s} {"total/budget":>12s}'
  )
  for dataset in sorted(multimnist.SOURCES):
    for recipe in multimnist.RECIPES:
      best_total, best_read = float('inf'), float('inf')
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        for source in set(multimnist.SOURCES[dataset]):
          for split in ('train', 'test'):
            sources.load_source(source, split, _DATA_DIR.value, False)
        read = time.perf_counter() - start
        start = time.perf_counter()
        splits = multimnist.build(
          dataset, recipe, 0, _DATA_DIR.value, download=False
        )
        total = time.perf_counter() - start  # Includes its own file reads.
        best_total, best_read = min(best_total, total), min(best_read, read)
      n = sum(len(s) for s in splits.values())
      print(
        f'{dataset:22s} {recipe:10s} {n:8d} {best_read:7.2f} '
        f'{best_total - best_read:8.2f} {best_total / BUDGET_S:12.2f}'
      )


if __name__ == '__main__':
  cli.run(main)
