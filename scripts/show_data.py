"""Writes a PNG grid of composites per data set and recipe, to check by eye.

  python scripts/show_data.py --out_dir=results/data_samples
  python scripts/show_data.py --datasets=multi_mnist --recipes=comet
  python scripts/show_data.py --paddlerec_pickle=../shared/data/paddlerec_sample/sample_data.pickle

Each image is titled "task-1 label | task-2 label".

  python scripts/show_data.py --npz=first64.npz [--num=64] \
      [--datasets=multi_mnist --recipes=paretomtl]

writes instead the first --num composites of the train split, in stored
order, of the first data set and recipe given (default multi_mnist,
paretomtl): ``images`` uint8 (N, 36, 36) and ``labels`` int (N, 2).
"""

import os
import sys

from absl import flags

from dselect_jax import cli
from dselect_jax import plots
from dselect_jax.datasets import multimnist
from dselect_jax.datasets import sources
from dselect_jax.datasets import stored

_OUT_DIR = flags.DEFINE_string(
  'out_dir', 'results/data_samples', 'Where the PNGs go.'
)
_DATASETS = flags.DEFINE_list(
  'datasets', list(multimnist.SOURCES), 'Data sets to show.'
)
_RECIPES = flags.DEFINE_list(
  'recipes', list(multimnist.RECIPES), 'Recipes to show.'
)
_SEED = flags.DEFINE_integer('seed', 0, 'Build seed.')
_DATA_DIR = flags.DEFINE_string(
  'data_dir', None, 'Raw files folder (default: see sources.py).'
)
_NPZ = flags.DEFINE_string(
  'npz', None, 'Write the first --num train composites to this .npz file.'
)
_NUM = flags.DEFINE_integer(
  'num', 64, 'Composites written by --npz.', lower_bound=1
)
_PICKLE = flags.DEFINE_string(
  'paddlerec_pickle', None, 'Also show this PaddleRec pickle.'
)


def _train_split(dataset: str, recipe: str) -> multimnist.Split:
  return stored.load_built(
    dataset, recipe, _SEED.value, _DATA_DIR.value, names=('train',)
  )['train']


def write_npz(path: str, dataset: str, recipe: str, num: int):
  split = _train_split(dataset, recipe)
  if not 1 <= num <= len(split):
    raise sources.DataError(
      f'--num={num}: must be in 1..{len(split)} (the train split)'
    )
  stored.save_npz(
    os.path.abspath(path),
    {'images': split.images[:num], 'labels': split.labels[:num]},
  )
  print(f'wrote {path}: the first {num} train composites of {dataset}/{recipe}')


def main(argv):
  del argv
  if _NPZ.value:
    given = lambda flag, default: (
      flag.value[0] if flags.FLAGS[flag.name].present else default
    )
    try:
      write_npz(
        _NPZ.value,
        given(_DATASETS, 'multi_mnist'),
        given(_RECIPES, 'paretomtl'),
        _NUM.value,
      )
    except (sources.DataError, OSError) as e:
      sys.exit(f'error: {e}')
    return
  os.makedirs(cli.output_folder('out_dir', _OUT_DIR.value), exist_ok=True)
  try:
    for dataset in _DATASETS.value:
      for recipe in _RECIPES.value:
        split = _train_split(dataset, recipe)
        path = os.path.join(_OUT_DIR.value, f'{dataset}-{recipe}.png')
        print(
          plots.sample_grid(
            split.images,
            split.labels,
            f'{dataset}, {recipe} recipe (train)',
            path,
          )
        )
    split = stored.load_npz_splits(stored.SAMPLE_FILE, ('train',))['train']
    print(
      plots.sample_grid(
        split.images,
        split.labels,
        'multi_mnist_sample',
        os.path.join(_OUT_DIR.value, 'multi_mnist_sample.png'),
      )
    )
    if _PICKLE.value:
      x, y = stored.read_paddlerec_pickle(_PICKLE.value)
      print(
        plots.sample_grid(
          x,
          y,
          os.path.basename(_PICKLE.value),
          os.path.join(_OUT_DIR.value, 'paddlerec.png'),
        )
      )
  except sources.DataError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  cli.run(main)
