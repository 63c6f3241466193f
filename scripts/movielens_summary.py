"""What dselect_jax.datasets.movielens reads: counts to check against the release's
README (100,000 ratings, 943 users with at least 20 each, 1,682 movies).

  python scripts/movielens_summary.py [--data_dir=DIR] [--negatives=1]
"""

from absl import flags
import numpy as np

from dselect_jax import cli
from dselect_jax.datasets import movielens

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'MovieLens folder.')
_NEGATIVES = flags.DEFINE_integer(
  'negatives', 1, 'Unwatched movies sampled per rating.', lower_bound=0
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sampling and split.')


def main(argv):
  del argv
  raw = movielens.load_raw(_DATA_DIR.value, download=True)
  per_user = np.bincount(raw.ratings[:, 0], minlength=movielens.NUM_USERS)
  print(
    f'{len(raw.ratings)} ratings by {np.count_nonzero(per_user)} users of '
    f'{len(np.unique(raw.ratings[:, 1]))} movies; ratings per user '
    f'{per_user.min()}-{per_user.max()}'
  )
  print(f'ratings 1..5: {np.bincount(raw.ratings[:, 2])[1:].tolist()}')
  print(
    f'age groups: {np.bincount(raw.user_age, minlength=7).tolist()}; '
    f'women: {int(raw.user_gender.sum())}; movies without a year: '
    f'{int((raw.movie_year == 0).sum())}'
  )
  splits = movielens.load(_SEED.value, _NEGATIVES.value, _DATA_DIR.value)
  for name, split in splits.items():
    watched = split.weights[:, 1] > 0
    print(
      f'{name}: {len(split)} examples, watched {watched.mean():.4f}, mean '
      f'rating of the watched {split.targets[watched, 1].mean():.4f}'
    )


if __name__ == '__main__':
  cli.run(main)
