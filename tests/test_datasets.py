"""Raw files, the MultiMNIST builders, PaddleRec pickles and batching."""

import gzip
import hashlib
import os
import pickle
import shutil

import numpy as np
import pytest

from dselect_jax import datasets
from dselect_jax.datasets import batching
from dselect_jax.datasets import multimnist
from dselect_jax.datasets import sources
from dselect_jax.datasets import stored
from dselect_jax.datasets.sources import DataError

# From the data folder's README (published with the files).
MNIST_TRAIN_COUNTS = [
  5923,
  6742,
  5958,
  6131,
  5842,
  5421,
  5918,
  6265,
  5851,
  5949,
]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope='module')
def mnist(data_dir):
  return {
    split: sources.load_source('mnist', split, data_dir, False)
    for split in ('train', 'test')
  }


@pytest.fixture(scope='module')
def fashion(data_dir):
  return {
    split: sources.load_source('fashion_mnist', split, data_dir, False)
    for split in ('train', 'test')
  }


@pytest.fixture(scope='module')
def comet(data_dir):
  return multimnist.build('multi_mnist', 'comet', 0, data_dir, download=False)


# ----------------------------------------------------------------------------
# Raw files.
# ----------------------------------------------------------------------------


def test_mnist_files(mnist):
  images, labels = mnist['train']
  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (60000,) and labels.dtype == np.uint8
  assert list(np.bincount(labels)) == MNIST_TRAIN_COUNTS
  assert list(np.bincount(mnist['test'][1])) == MNIST_TEST_COUNTS
  assert list(labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  assert list(mnist['test'][1][:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  assert images.min() == 0 and images.max() == 255


def test_fashion_files(fashion):
  images, labels = fashion['train']
  assert images.shape == (60000, 28, 28)
  assert list(np.bincount(labels)) == [6000] * 10
  assert list(np.bincount(fashion['test'][1])) == [1000] * 10
  assert list(labels[:10]) == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_reader_returns_what_was_written(synthetic_mnist):
  folder = synthetic_mnist['dir']
  images, labels = synthetic_mnist['arrays']['train']
  got = sources.read_idx(
    str(folder / 'train-images-idx3-ubyte.gz'), sources.IMAGE_MAGIC, 300
  )
  assert got.shape == (300, 28, 28) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, images)
  np.testing.assert_array_equal(
    sources.read_idx(
      str(folder / 'train-labels-idx1-ubyte.gz'), sources.LABEL_MAGIC, 300
    ),
    labels,
  )


def test_reader_refuses_a_wrong_header(synthetic_mnist):
  folder = synthetic_mnist['dir']
  labels = str(folder / 't10k-labels-idx1-ubyte.gz')
  images = str(folder / 't10k-images-idx3-ubyte.gz')
  with pytest.raises(DataError, match='magic number is 2049, expected 2051'):
    sources.read_idx(labels, sources.IMAGE_MAGIC, 100)
  with pytest.raises(DataError, match='holds 100 items, expected 10000'):
    sources.read_idx(images, sources.IMAGE_MAGIC, 10000)
  # A header that promises more bytes than follow: truncated.
  with gzip.open(images, 'rb') as f:
    data = f.read()
  with gzip.open(images, 'wb') as f:
    f.write(data[: 16 + 50 * 784])
  with pytest.raises(DataError, match='39200 data bytes, expected 78400'):
    sources.read_idx(images, sources.IMAGE_MAGIC, 100)


@pytest.fixture
def synthetic_sources(synthetic_mnist, monkeypatch):
  """``sources`` taking the synthetic files as MNIST: their digests and
  sizes in place of the canonical ones."""
  monkeypatch.setitem(sources.CHECKSUMS, 'mnist', synthetic_mnist['sha256'])
  monkeypatch.setattr(sources, 'SPLIT_SIZES', {'train': 300, 'test': 100})
  return synthetic_mnist


def test_load_source_checks_and_reads(synthetic_sources):
  data_dir = str(synthetic_sources['dir'].parent)
  for split in ('train', 'test'):
    images, labels = sources.load_source('mnist', split, data_dir, False)
    np.testing.assert_array_equal(images, synthetic_sources['arrays'][split][0])
    np.testing.assert_array_equal(labels, synthetic_sources['arrays'][split][1])


def test_truncated_file_is_a_clear_error(synthetic_sources):
  path = synthetic_sources['dir'] / 't10k-labels-idx1-ubyte.gz'
  path.write_bytes(path.read_bytes()[:50])
  with pytest.raises(DataError) as e:
    sources.load_source(
      'mnist', 'test', str(synthetic_sources['dir'].parent), False
    )
  message = str(e.value)
  assert str(path) in message and 'SHA-256' in message
  assert 'delete it' in message and '\n' not in message


def test_altered_file_is_a_clear_error(synthetic_sources):
  path = synthetic_sources['dir'] / 'train-labels-idx1-ubyte.gz'
  data = bytearray(path.read_bytes())
  data[-20] ^= 0xFF
  path.write_bytes(bytes(data))
  expected = synthetic_sources['sha256']['train-labels-idx1-ubyte.gz']
  actual = hashlib.sha256(bytes(data)).hexdigest()
  with pytest.raises(DataError, match=f'is {actual}, expected {expected}'):
    sources.load_source(
      'mnist', 'train', str(synthetic_sources['dir'].parent), False
    )


def test_canonical_digests_refuse_other_files(synthetic_mnist):
  # The published digests (not the synthetic ones): any other file is
  # refused, the train images first (read first).
  with pytest.raises(
    DataError,
    match='train-images-idx3-ubyte.gz: SHA-256 is .*, expected '
    '440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609',
  ):
    sources.load_source('mnist', 'train', str(synthetic_mnist['dir'].parent))


def test_missing_file_says_where_to_put_it(tmp_path):
  with pytest.raises(DataError) as e:
    sources.load_source('fashion_mnist', 'test', str(tmp_path), False)
  assert 'missing' in str(e.value)
  assert str(tmp_path / 'fashion_mnist') in str(e.value)
  assert 'DSELECT_DATA_DIR' in str(e.value)


def test_missing_file_without_network_fails_clearly(tmp_path, monkeypatch):
  # The autouse no_network fixture makes every mirror fail, as offline.
  with pytest.raises(DataError, match='could not be downloaded.*put the four'):
    sources.fetch('mnist', 't10k-labels-idx1-ubyte.gz', str(tmp_path))
  assert not (tmp_path / 'mnist' / 't10k-labels-idx1-ubyte.gz').exists()


def test_download_checks_and_writes_atomically(synthetic_mnist, tmp_path):
  src = str(synthetic_mnist['dir'] / 't10k-labels-idx1-ubyte.gz')
  good = synthetic_mnist['sha256']['t10k-labels-idx1-ubyte.gz']
  dest = tmp_path / 'out' / 'labels.gz'
  with pytest.raises(DataError, match='downloaded file has SHA-256'):
    sources.download('file://' + src, str(dest), '0' * 64)
  assert not dest.exists() and os.listdir(tmp_path / 'out') == []
  sources.download('file://' + src, str(dest), good)
  assert hashlib.sha256(dest.read_bytes()).hexdigest() == good


def test_missing_files_are_downloaded_from_the_first_mirror_that_serves(
  synthetic_sources, tmp_path, monkeypatch
):
  # Mirrors as file:// folders: the first lacks the files, the second has
  # them; the data folder starts empty.
  mirror = 'file://' + str(synthetic_sources['dir']) + '/'
  monkeypatch.setitem(
    sources.MIRRORS, 'mnist', ['file://' + str(tmp_path / 'none') + '/', mirror]
  )
  data_dir = tmp_path / 'fresh'
  images, labels = sources.load_source('mnist', 'test', str(data_dir), True)
  np.testing.assert_array_equal(labels, synthetic_sources['arrays']['test'][1])
  assert sorted(os.listdir(data_dir / 'mnist')) == [
    't10k-images-idx3-ubyte.gz',
    't10k-labels-idx1-ubyte.gz',
  ]


def test_resolve_data_dir_order(tmp_path, monkeypatch):
  monkeypatch.setenv('DSELECT_DATA_DIR', str(tmp_path / 'env'))
  assert sources.resolve_data_dir(str(tmp_path / 'cfg')) == str(
    tmp_path / 'cfg'
  )
  assert sources.resolve_data_dir(None) == str(tmp_path / 'env')
  monkeypatch.delenv('DSELECT_DATA_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  assert sources.resolve_data_dir(None) == str(
    tmp_path / 'cache' / 'dselect_jax'
  )


def _write_idx(path, magic, count, body, dims=()):
  header = np.array([magic, count, *dims], '>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + body)


@pytest.mark.parametrize(
  'magic,count,body_len,match',
  [
    (2049, 5, 5, 'magic number is 2049, expected 2051'),
    (2051, 4, 5 * 784, 'holds 4 items, expected 5'),
    (2051, 5, 4 * 784, 'truncated'),
  ],
)
def test_idx_header_checks(tmp_path, magic, count, body_len, match):
  path = str(tmp_path / 'x.gz')
  _write_idx(path, magic, count, bytes(body_len), (28, 28))
  with pytest.raises(DataError, match=match):
    sources.read_idx(path, sources.IMAGE_MAGIC, 5)


def test_idx_not_gzip(tmp_path):
  path = tmp_path / 'x.gz'
  path.write_bytes(b'not gzip at all')
  with pytest.raises(DataError, match='not a readable gzip file'):
    sources.read_idx(str(path), sources.LABEL_MAGIC, 5)


# ----------------------------------------------------------------------------
# Composites.
# ----------------------------------------------------------------------------


def _recompose(tl_image, br_image, tl_offset, br_offset):
  """The documented combination, one image at a time with plain ints."""
  canvas = np.zeros((36, 36), int)
  (r1, c1), (r2, c2) = tl_offset, br_offset
  canvas[r1 : r1 + 28, c1 : c1 + 28] += tl_image
  canvas[r2 : r2 + 28, c2 : c2 + 28] += br_image
  return np.minimum(canvas, 255)


def _check_composites(split, tl_source, br_source, rng, n=300):
  prov = split.provenance
  for i in rng.choice(len(split), n, replace=False):
    tl_i, br_i = prov['top_left_index'][i], prov['bottom_right_index'][i]
    want = _recompose(
      tl_source[0][tl_i],
      br_source[0][br_i],
      prov['top_left_offset'][i],
      prov['bottom_right_offset'][i],
    )
    np.testing.assert_array_equal(split.images[i], want)
    assert tuple(split.labels[i]) == (tl_source[1][tl_i], br_source[1][br_i])


def test_comet_multi_mnist(comet, mnist):
  sizes = {name: len(s) for name, s in comet.items()}
  assert sizes == {'train': 100000, 'validation': 20000, 'test': 20000}
  rng = np.random.default_rng(0)
  for name, split in comet.items():
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert split.images.shape[1:] == (36, 36) and split.labels.shape[1] == 2
    # Fixed positions: rows/cols 0..27 and 8..35.
    assert np.all(split.provenance['top_left_offset'] == 0)
    assert np.all(split.provenance['bottom_right_offset'] == 8)
    assert np.all(
      split.provenance['top_left_index']
      != split.provenance['bottom_right_index']
    )
    source = mnist['test' if name == 'test' else 'train']
    _check_composites(split, source, source, rng)
  # Each base image appears exactly twice, partners drawn from its own split.
  train_bases = np.unique(comet['train'].provenance['top_left_index'])
  valid_bases = np.unique(comet['validation'].provenance['top_left_index'])
  assert len(train_bases) == 50000 and len(valid_bases) == 10000
  assert not set(train_bases) & set(valid_bases)
  assert set(comet['train'].provenance['bottom_right_index']) <= set(
    train_bases
  )
  assert np.all(
    np.bincount(comet['train'].provenance['top_left_index'], minlength=60000)[
      train_bases
    ]
    == 2
  )
  # Stratified: each digit holds 1/6 of its MNIST train images out (+-1).
  held = np.bincount(mnist['train'][1][valid_bases], minlength=10)
  assert np.all(np.abs(held - np.array(MNIST_TRAIN_COUNTS) / 6) <= 1)


def test_paretomtl_axes_multi_mnist(data_dir, mnist):
  """The older guess at Pareto MTL's data, kept for ablations."""
  splits = multimnist.build(
    'multi_mnist', 'paretomtl_axes', 0, data_dir, download=False
  )
  assert {k: len(v) for k, v in splits.items()} == {
    'train': 110000,
    'validation': 10000,
    'test': 20000,
  }
  rng = np.random.default_rng(1)
  for name, split in splits.items():
    tl, br = (
      split.provenance['top_left_offset'],
      split.provenance['bottom_right_offset'],
    )
    # Shifted 0..4 pixels toward each corner from the centred offset 4.
    assert tl.min() == 0 and tl.max() == 4 and br.min() == 4 and br.max() == 8
    assert np.any(tl[:, 0] != tl[:, 1])  # Axes drawn apart.
    assert np.all(split.labels[:, 0] != split.labels[:, 1])
    source = mnist['test' if name == 'test' else 'train']
    _check_composites(split, source, source, rng, n=200)


# PaddleRec's 32-row sample (shared/data/paddlerec_sample), matched pixel by
# pixel against MNIST train once, offline: row i's top-left digit is MNIST
# train image i at (a, a); its bottom-right digit is MNIST train image
# PARTNER[i] at (c, c).
SAMPLE_PARTNER = [
  30337,
  4570,
  30521,
  24048,
  19526,
  1057,
  45034,
  25043,
  37681,
  40235,
  12637,
  58336,
  35753,
  52239,
  50779,
  6245,
  14057,
  31860,
  38645,
  30415,
  59531,
  11232,
  48366,
  30795,
  7903,
  54724,
  2638,
  12143,
  34493,
  35712,
  17686,
  13604,
]
SAMPLE_A = [
  3,
  2,
  4,
  2,
  4,
  2,
  3,
  4,
  4,
  2,
  3,
  1,
  1,
  4,
  2,
  1,
  4,
  2,
  4,
  2,
  2,
  3,
  3,
  1,
  2,
  3,
  1,
  1,
  4,
  1,
  1,
  4,
]
SAMPLE_C = [
  7,
  5,
  7,
  8,
  8,
  7,
  6,
  5,
  7,
  7,
  6,
  5,
  5,
  5,
  5,
  6,
  7,
  6,
  6,
  7,
  7,
  6,
  7,
  6,
  5,
  7,
  8,
  7,
  5,
  6,
  8,
  7,
]


def test_paretomtl_compose_reproduces_paddlerecs_sample(data_dir, mnist):
  x, y = stored.read_paddlerec_pickle(
    os.path.join(data_dir, 'paddlerec_sample', 'sample_data.pickle')
  )
  images, labels = mnist['train']
  n = len(x)
  assert n == len(SAMPLE_PARTNER) == 32
  a, c = np.array(SAMPLE_A), np.array(SAMPLE_C)
  # The recipe's placements: diagonal, a in 1..4, c in 5..8.
  assert set(a) <= {1, 2, 3, 4} and set(c) <= {5, 6, 7, 8}
  partner = np.array(SAMPLE_PARTNER)
  ours = multimnist.compose(
    images[:n], images[partner], np.stack([a, a], 1), np.stack([c, c], 1)
  ).astype(int)
  # Equal up to the files' float-to-uint8 truncation: a pixel is at most 1
  # below ours, never above.
  diff = ours - x.astype(int)
  assert diff.min() == 0 and diff.max() == 1
  assert np.mean(diff) < 0.01
  # Labels: top-left digit i in order, a partner of another class.
  np.testing.assert_array_equal(y[:, 0], labels[:n])
  np.testing.assert_array_equal(y[:, 1], labels[partner])
  assert np.all(y[:, 0] != y[:, 1])
  # Not a match by accident: one pixel off on one axis is far off.
  shifted = multimnist.compose(
    images[:n],
    images[partner],
    np.stack([a, a], 1),
    np.stack([c, c + 1 - 2 * (c == 8)], 1),
  ).astype(int)
  assert np.all(np.abs(shifted - x).reshape(n, -1).max(1) > 100)


def test_paretomtl_multi_mnist(data_dir, mnist):
  splits = multimnist.build(
    'multi_mnist', 'paretomtl', 0, data_dir, download=False
  )
  assert {k: len(v) for k, v in splits.items()} == {
    'train': 100000,
    'validation': 20000,
    'test': 20000,
  }
  prov = {k: v.provenance for k, v in splits.items()}
  # Top-left digits in source order, each twice: the 120,000 train
  # composites are MNIST train 0..59999 twice, the last 20,000 validation.
  np.testing.assert_array_equal(
    prov['train']['top_left_index'],
    np.concatenate([np.arange(60000), np.arange(40000)]),
  )
  np.testing.assert_array_equal(
    prov['validation']['top_left_index'], np.arange(40000, 60000)
  )
  np.testing.assert_array_equal(
    prov['test']['top_left_index'], np.tile(np.arange(10000), 2)
  )
  rng = np.random.default_rng(1)
  for name, split in splits.items():
    tl, br = prov[name]['top_left_offset'], prov[name]['bottom_right_offset']
    assert np.all(tl[:, 0] == tl[:, 1]) and np.all(br[:, 0] == br[:, 1])
    placements = set(zip(tl[:, 0].tolist(), br[:, 0].tolist()))
    assert placements == {(p, q) for p in range(1, 5) for q in range(5, 9)}
    assert np.all(split.labels[:, 0] != split.labels[:, 1])
    source = mnist['test' if name == 'test' else 'train']
    _check_composites(split, source, source, rng, n=200)
  # Partners from the whole source split, not only the train part.
  assert prov['train']['bottom_right_index'].max() >= 59000
  whole = multimnist.build(
    'multi_mnist', 'paretomtl', 0, data_dir, download=False, num_validation=0
  )
  assert {k: len(v) for k, v in whole.items()} == {
    'train': 120000,
    'validation': 0,
    'test': 20000,
  }
  np.testing.assert_array_equal(
    whole['train'].images[:100000], splits['train'].images
  )


@pytest.mark.slow  # Builds full-size sets from the real files.
def test_fresh_train_splits_repair_the_same_top_left_digits(data_dir, mnist):
  splits = multimnist.build(
    'multi_mnist', 'paretomtl', 0, data_dir, download=False
  )
  fresh = multimnist.FreshTrainSplits(
    'multi_mnist', 'paretomtl', 0, splits['train'], data_dir, download=False
  )
  e0, e1 = fresh(0), fresh(1)
  again = multimnist.FreshTrainSplits(
    'multi_mnist', 'paretomtl', 0, splits['train'], data_dir, download=False
  )(1)
  np.testing.assert_array_equal(e1.images, again.images)  # (seed, epoch).
  for epoch in (e0, e1):
    assert len(epoch) == len(splits['train'])
    np.testing.assert_array_equal(
      epoch.provenance['top_left_index'],
      splits['train'].provenance['top_left_index'],
    )
    assert np.all(epoch.labels[:, 0] != epoch.labels[:, 1])
    _check_composites(
      epoch, mnist['train'], mnist['train'], np.random.default_rng(4), n=100
    )
  # New partners and placements each epoch.
  for a, b in ((e0, e1), (e0, splits['train'])):
    assert (
      np.mean(
        a.provenance['bottom_right_index'] != b.provenance['bottom_right_index']
      )
      > 0.99
    )
  # comet: partners from the train bases only, never the base itself.
  comet = multimnist.build('multi_mnist', 'comet', 0, data_dir, download=False)
  epoch = multimnist.FreshTrainSplits(
    'multi_mnist', 'comet', 0, comet['train'], data_dir, download=False
  )(3)
  bases = set(comet['train'].provenance['top_left_index'].tolist())
  assert set(epoch.provenance['bottom_right_index'].tolist()) <= bases
  assert np.all(
    epoch.provenance['bottom_right_index'] != epoch.provenance['top_left_index']
  )
  assert np.all(epoch.provenance['top_left_offset'] == 0)


def test_multi_fashion_mnist(data_dir, mnist, fashion):
  splits = multimnist.build(
    'multi_fashion_mnist', 'comet', 3, data_dir, download=False
  )
  _check_composites(
    splits['test'], mnist['test'], fashion['test'], np.random.default_rng(2)
  )
  _check_composites(
    splits['train'], mnist['train'], fashion['train'], np.random.default_rng(3)
  )


def test_same_seed_same_bytes_other_seed_other_data(comet, data_dir):
  again = multimnist.build('multi_mnist', 'comet', 0, data_dir, download=False)
  other = multimnist.build('multi_mnist', 'comet', 1, data_dir, download=False)
  for name in comet:
    assert comet[name].images.tobytes() == again[name].images.tobytes()
    np.testing.assert_array_equal(comet[name].labels, again[name].labels)
    assert not np.array_equal(comet[name].images, other[name].images)


def test_cache_loads_instead_of_rebuilding(data_dir, tmp_path, monkeypatch):
  first = stored.load_built(
    'multi_fashion', 'comet', 0, data_dir, str(tmp_path), download=False
  )
  assert len(list(tmp_path.glob('multi_fashion-comet-seed0-*.npz'))) == 1

  def no_build(*args, **kwargs):
    raise AssertionError('rebuilt although cached')

  monkeypatch.setattr(multimnist, 'build', no_build)
  second = stored.load_built(
    'multi_fashion', 'comet', 0, data_dir, str(tmp_path), download=False
  )
  for name in first:
    np.testing.assert_array_equal(first[name].images, second[name].images)
    np.testing.assert_array_equal(
      first[name].provenance['top_left_index'],
      second[name].provenance['top_left_index'],
    )


def test_shipped_sample_is_a_subset_of_the_full_set(comet):
  sample = stored.load_npz_splits(stored.SAMPLE_FILE)
  assert {k: len(v) for k, v in sample.items()} == {
    'train': 4000,
    'validation': 1000,
    'test': 1000,
  }
  for name, split in sample.items():
    np.testing.assert_array_equal(
      split.images, comet[name].images[: len(split)]
    )
    np.testing.assert_array_equal(
      split.labels, comet[name].labels[: len(split)]
    )


@pytest.mark.parametrize(
  'dataset,recipe,match',
  [
    ('multi_digits', 'comet', "Unknown data set 'multi_digits'"),
    ('multi_mnist', 'sener', "Unknown recipe 'sener'"),
  ],
)
def test_unknown_names(dataset, recipe, match):
  with pytest.raises(DataError, match=match):
    multimnist.build(dataset, recipe)


def test_stratified_split_by_hand():
  labels = np.array([0] * 6 + [1] * 3 + [2] * 3)
  keep, held = multimnist.stratified_split(labels, 4, np.random.default_rng(0))
  # Shares 2, 1, 1: exact, no remainders.
  assert list(np.bincount(labels[held], minlength=3)) == [2, 1, 1]
  assert sorted(np.concatenate([keep, held])) == list(range(12))


# ----------------------------------------------------------------------------
# PaddleRec pickles.
# ----------------------------------------------------------------------------


def test_paddlerec_sample_pickle(data_dir):
  path = os.path.join(data_dir, 'paddlerec_sample', 'sample_data.pickle')
  x, y = stored.read_paddlerec_pickle(path)
  assert x.shape == (32, 36, 36) and x.dtype == np.uint8
  assert y.shape == (32, 2) and y.dtype == np.int32
  # Independent check: the file's published checksum, then the stock
  # (unrestricted) unpickler, which is safe on this one known file.
  with open(path, 'rb') as f:
    blob = f.read()
  assert hashlib.sha256(blob).hexdigest() == (
    '8a7841101409bb7eb50c81813201c5d8af2f415f471b27b1772cf242b83d5d4e'
  )
  want_x, want_y = pickle.loads(blob)
  np.testing.assert_array_equal(x, want_x)
  np.testing.assert_array_equal(y, want_y)


class _Evil:
  """Unpickling this would create a file, via the builtin open()."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, 'w'))


def test_malicious_pickle_runs_nothing(tmp_path):
  marker = tmp_path / 'pwned'
  evil = tmp_path / 'train.pickle'
  evil.write_bytes(pickle.dumps((_Evil(str(marker)), np.zeros((1, 2)))))
  # The payload works with the stock unpickler (proof it is live)...
  pickle.loads(evil.read_bytes())
  assert marker.exists()
  marker.unlink()
  # ...and ours refuses it without running it.
  with pytest.raises(DataError, match=r'refusing to load (io|builtins)\.open'):
    stored.read_paddlerec_pickle(str(evil))
  assert not marker.exists()


def test_paddlerec_dataset_carves_validation(tmp_path, data_dir):
  src = os.path.join(data_dir, 'paddlerec_sample', 'sample_data.pickle')
  shutil.copy(src, tmp_path / 'train.pickle')
  shutil.copy(src, tmp_path / 'test.pickle')
  splits = stored.load_paddlerec(str(tmp_path))
  assert {k: len(v) for k, v in splits.items()} == {
    'train': 26,
    'validation': 6,
    'test': 32,
  }
  with pytest.raises(DataError, match='paddlerec_dir'):
    stored.load_paddlerec(None)


# ----------------------------------------------------------------------------
# Resolving a config's data set: its spec at once, each split when asked.
# ----------------------------------------------------------------------------


def _data_fields(**fields):
  from configs import default  # pylint: disable=g-import-not-at-top

  data = default.get_config().data
  for key, value in fields.items():
    data[key] = value
  return data


def _write_pickles(folder, sizes):
  rng = np.random.default_rng(0)
  folder.mkdir()
  arrays = {}
  for name, n in sizes.items():
    x = rng.integers(0, 256, (n, 36, 36), dtype=np.uint8)
    y = rng.integers(0, 10, (n, 2))
    (folder / f'{name}.pickle').write_bytes(pickle.dumps((x, y)))
    arrays[name] = (x, y)
  return arrays


def test_resolve_reads_nothing_and_each_split_on_first_use(tmp_path):
  folder = tmp_path / 'paddlerec'
  dataset = datasets.resolve(
    _data_fields(name='paddlerec', paddlerec_dir=str(folder))
  )
  # The folder does not exist yet: resolving read nothing.
  assert dataset.spec.task_kinds == ('classification', 'classification')
  assert dataset.spec.is_image and not dataset.spec.fresh_train
  arrays = _write_pickles(folder, {'test': 50})
  # The test split alone, from test.pickle alone.
  np.testing.assert_array_equal(dataset.test.images, arrays['test'][0])
  with pytest.raises(DataError, match=r'train\.pickle: cannot read'):
    dataset.split('train')
  with pytest.raises(DataError, match='stored as it is'):
    dataset.fresh_train()
  # Read once: the split is kept even when its file is gone.
  os.remove(folder / 'test.pickle')
  assert len(dataset.test) == 50


def test_a_cached_set_reads_only_the_asked_split(tmp_path, monkeypatch):
  """The cache holds the test arrays only: asking for the test split reads
  them; asking for train finds the cache incomplete and rebuilds from the
  raw files, which are missing here, and says so."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.setenv(sources.ENV_DATA_DIR, str(tmp_path / 'raw'))
  fields = _data_fields(name='multi_mnist', download=False)
  path = stored.cache_path(None, 'multi_mnist', 'comet', 0, None)
  test = stored.load_npz_splits(stored.SAMPLE_FILE, ('test',))
  stored.save_npz(path, stored.splits_to_arrays(test))
  dataset = datasets.resolve(fields)
  np.testing.assert_array_equal(dataset.test.images, test['test'].images)
  with pytest.raises(DataError, match='train-images-idx3-ubyte.gz'):
    datasets.resolve(fields).split('train')


def test_an_unknown_data_set_names_the_field():
  with pytest.raises(
    DataError, match=r"config.data.name='cifar10': choose one of \["
  ):
    datasets.resolve(_data_fields(name='cifar10'))


# ----------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------


def _toy_split(n):
  images = (np.arange(n)[:, None, None] * np.ones((1, 36, 36))).astype(np.uint8)
  labels = np.stack([np.arange(n), np.arange(n)], 1).astype(np.int32)
  return multimnist.Split(images, labels)


def _ids(batch):
  return batch['target'][..., 0].ravel().tolist()


def test_train_batches_shapes_and_epochs():
  split = _toy_split(50)
  it = batching.train_batches(split, 12, 4, seed=7)
  batch = next(it)
  assert batch['image'].shape == (4, 3, 36, 36, 1)
  assert batch['image'].dtype == np.float32 and batch['target'].shape == (
    4,
    3,
    2,
  )
  # Every digit is a known target: weight 1.
  np.testing.assert_array_equal(batch['weight'], np.ones((4, 3, 2)))
  # Pixels are the id / 255.
  np.testing.assert_allclose(
    batch['image'][..., 0, 0, 0], batch['target'][..., 0] / 255, rtol=1e-6
  )
  epoch0 = _ids(batch) + sum((_ids(next(it)) for _ in range(3)), [])
  # 4 batches of 12 per epoch (2 of 50 dropped), no example twice.
  assert len(set(epoch0)) == 48
  epoch1 = sum((_ids(next(it)) for _ in range(4)), [])
  assert len(set(epoch1)) == 48 and epoch1 != epoch0


def test_shuffle_depends_on_seed_and_epoch_only():
  np.testing.assert_array_equal(
    batching.epoch_permutation(100, 3, 5), batching.epoch_permutation(100, 3, 5)
  )
  assert not np.array_equal(
    batching.epoch_permutation(100, 3, 5), batching.epoch_permutation(100, 3, 6)
  )
  assert not np.array_equal(
    batching.epoch_permutation(100, 3, 5), batching.epoch_permutation(100, 4, 5)
  )


@pytest.mark.parametrize('start', [0, 1, 4, 7, 9])
def test_resume_at_any_step_sees_the_same_batches(start):
  split = _toy_split(50)
  full = batching.train_batches(split, 12, 2, seed=1)
  reference = [_ids(next(full)) for _ in range(12)]
  resumed = batching.train_batches(split, 12, 2, seed=1, start_step=start)
  assert [_ids(next(resumed)) for _ in range(12 - start)] == reference[start:]


def test_eval_batches_pad_and_mask_each_example_once():
  split = _toy_split(23)
  batches = list(batching.eval_batches(split, 8, 2))
  assert len(batches) == 3
  seen = []
  for b in batches:
    assert b['mask'].shape == (2, 4)
    seen += [i for i, m in zip(_ids(b), b['mask'].ravel()) if m]
  assert seen == list(range(23))
  assert batches[-1]['mask'].sum() == 7


def test_processes_split_each_global_batch():
  split = _toy_split(50)
  # 3 processes of 2 devices: device d reads the rows it would read as
  # device d of one process with all 6.
  whole = batching.train_batches(split, 12, 6, seed=4)
  parts = [
    batching.train_batches(
      split, 12, 2, seed=4, process_index=p, process_count=3
    )
    for p in range(3)
  ]
  for _ in range(6):
    want = next(whole)['target'][..., 0].tolist()  # (devices, per_device)
    got = sum((next(part)['target'][..., 0].tolist() for part in parts), [])
    assert got == want
  evals = [list(batching.eval_batches(split, 12, 2, p, 3)) for p in range(3)]
  seen = [
    i
    for batches in evals
    for b in batches
    for i, m in zip(_ids(b), b['mask'].ravel())
    if m
  ]
  assert sorted(seen) == list(range(50))


def test_batch_not_divisible_by_devices():
  with pytest.raises(ValueError, match='multiple of the 3 devices'):
    next(batching.train_batches(_toy_split(50), 10, 3, seed=0))
  with pytest.raises(ValueError, match='larger than the 50'):
    next(batching.train_batches(_toy_split(50), 64, 1, seed=0))


def test_a_damaged_cache_file_is_reported_and_rebuilt(
  data_dir, tmp_path, monkeypatch
):
  cache = str(tmp_path / 'cache')
  built = stored.load_built(
    'multi_mnist', 'comet', data_dir=data_dir, cache_dir=cache, download=False
  )
  [name] = os.listdir(cache)
  path = os.path.join(cache, name)
  with open(path, 'rb') as f:
    whole = f.read()
  with open(path, 'wb') as f:
    f.write(whole[: len(whole) // 3])
  warnings = []
  monkeypatch.setattr(
    stored.logging, 'warning', lambda msg, *args: warnings.append(msg % args)
  )
  again = stored.load_built(
    'multi_mnist', 'comet', data_dir=data_dir, cache_dir=cache, download=False
  )
  assert len(warnings) == 1 and path in warnings[0]
  assert 'rebuilding' in warnings[0]
  np.testing.assert_array_equal(again['test'].images, built['test'].images)
  # Written over with the rebuilt arrays.
  np.testing.assert_array_equal(
    stored.load_npz_splits(path)['test'].images, built['test'].images
  )


@pytest.mark.slow  # Builds full-size sets from the real files.
def test_show_data_dumps_the_first_train_composites(data_dir, mnist, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'first.npz'
  env = dict(
    os.environ, DSELECT_DATA_DIR=data_dir, XDG_CACHE_HOME=str(tmp_path)
  )
  subprocess.run(
    [sys.executable, 'scripts/show_data.py', f'--npz={out}', '--num=40'],
    cwd=repo,
    env=env,
    check=True,
    capture_output=True,
    timeout=300,
  )
  with np.load(out) as f:
    images, labels = f['images'], f['labels']
  assert images.shape == (40, 36, 36) and images.dtype == np.uint8
  assert labels.shape == (40, 2)
  # Stored order: the top-left digits are MNIST train 0..39.
  np.testing.assert_array_equal(labels[:, 0], mnist['train'][1][:40])
  train = multimnist.build(
    'multi_mnist', 'paretomtl', 0, data_dir, download=False
  )['train']
  np.testing.assert_array_equal(images, train.images[:40])
