"""The MultiMNIST family, built from the raw files, and batching. NumPy only.

A composite is a 36x36 uint8 canvas holding two 28x28 source images, one
toward the top-left (task 1's label) and one toward the bottom-right (task 2's
label). Overlapping pixels are **added and clipped at 255**:
``canvas = min(top_left + bottom_right, 255)`` in integers. The model sees
``canvas / 255`` as float32 in [0, 1], shape (36, 36, 1).

Recipes:
  ``comet``: the construction the DSelect-k authors describe (COMET
    supplement): top-left image at rows/cols 0..27, bottom-right at 8..35;
    each base image paired with 2 random partners from the same split. MNIST
    train is split 50k/10k (stratified by label) into train/validation bases:
    100,000 train, 20,000 validation and 20,000 test composites.
  ``paretomtl``: Pareto MTL's MultiMNIST (Lin et al., NeurIPS 2019), the
    data of PaddleRec's DSelect-k result, as its files are (checked pixel by
    pixel against PaddleRec's sample, tests/test_input_pipeline.py): the
    top-left images in source order, each source image twice; the
    bottom-right partner a random image of the same source split, of
    another class when both come from one source; each image shifted by the
    same amount on both axes, the top-left one to (a, a) with a in 1..4 and
    the bottom-right one to (c, c) with c in 5..8 (16 placements). 120,000
    train composites from the train images, 20,000 test from the test
    images; the last ``num_validation`` train composites (20,000 by default,
    PaddleRec's 100k / 20k / 20k) are the validation split; with 0 there is
    none (120k / 20k).
  ``paretomtl_axes``: an older guess at Pareto MTL's data, kept for
    ablations: shifts of 0..4 pixels drawn per axis (625 placements), 5,000
    base images (x2) held out for validation (stratified).

Data sets: ``multi_mnist`` (digit, digit), ``multi_fashion`` (article,
article), ``multi_fashion_mnist`` (digit top-left, article bottom-right);
``multi_mnist_sample``, a small ``comet`` MultiMNIST shipped in the package;
``paddlerec``, PaddleRec's own ``train.pickle``/``test.pickle``.

Everything is a deterministic function of (data set, recipe, seed, source
files): NumPy's PCG64 generator gives the same stream on every machine, so the
arrays are byte-identical everywhere. Built arrays are cached as ``.npz``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Optional
import zipfile

from absl import logging
import numpy as np

from dselect_jax import movielens
from dselect_jax import sources
from dselect_jax.sources import DataError

CANVAS = 36
DIGIT = 28
# Bump when a builder changes, so stale caches are rebuilt.
BUILD_VERSION = 2

DATASETS = {
  # name: (top-left source, bottom-right source)
  'multi_mnist': ('mnist', 'mnist'),
  'multi_fashion': ('fashion_mnist', 'fashion_mnist'),
  'multi_fashion_mnist': ('mnist', 'fashion_mnist'),
}
SPECIAL_DATASETS = ('multi_mnist_sample', 'paddlerec')
# Not images: a recommender data set of its own module (movielens.py).
FEATURE_DATASETS = ('movielens',)
ALL_DATASETS = tuple(sorted(DATASETS)) + SPECIAL_DATASETS + FEATURE_DATASETS
RECIPES = ('comet', 'paretomtl', 'paretomtl_axes')
# Seeds each recipe's generator; fixed, so adding a recipe changes no data.
_RECIPE_SEED = {'comet': 0, 'paretomtl_axes': 1, 'paretomtl': 2}
# Pareto MTL's placements: the top-left image at (a, a), the bottom-right one
# at (c, c).
PARETOMTL_TOP_LEFT = (1, 4)
PARETOMTL_BOTTOM_RIGHT = (5, 8)
PARETOMTL_VALIDATION = 20000
SAMPLE_FILE = os.path.join(
  os.path.dirname(__file__), 'data', 'multi_mnist_sample.npz'
)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a model and its losses need to know of a data set.

  ``task_names`` and ``task_kinds`` (``tasks.KINDS``) name each task and
  decide its output, loss and metric. Image data sets give ``num_classes``
  per task and ``image_shape`` (H, W, channels); feature data sets give
  ``cardinalities`` ((name, number of ids) of each categorical feature) and
  ``num_dense`` (the dense features per example).
  """

  task_names: tuple[str, ...]
  task_kinds: tuple[str, ...]
  num_classes: int = 1
  image_shape: Optional[tuple[int, int, int]] = None
  cardinalities: tuple[tuple[str, int], ...] = ()
  num_dense: int = 0

  @property
  def num_tasks(self) -> int:
    return len(self.task_kinds)

  @property
  def is_image(self) -> bool:
    return self.image_shape is not None


def describe(dataset: str) -> DataSpec:
  """The spec of a data set: the MultiMNIST family (two 10-class tasks on a
  36x36 grey canvas) or MovieLens (``movielens``: watch and rating)."""
  if dataset == 'movielens':
    return DataSpec(
      task_names=tuple(name for name, _ in movielens.TASKS),
      task_kinds=tuple(kind for _, kind in movielens.TASKS),
      cardinalities=tuple(movielens.CATEGORICAL.items()),
      num_dense=movielens.NUM_DENSE,
    )
  if dataset not in DATASETS and dataset not in SPECIAL_DATASETS:
    raise DataError(
      f'Unknown data set {dataset!r}; choose one of {ALL_DATASETS}.'
    )
  return DataSpec(
    task_names=('top_left', 'bottom_right'),
    task_kinds=('classification', 'classification'),
    num_classes=10,
    image_shape=(CANVAS, CANVAS, 1),
  )


PROVENANCE_KEYS = (
  'top_left_index',
  'bottom_right_index',
  'top_left_offset',
  'bottom_right_offset',
)


@dataclasses.dataclass(frozen=True)
class Split:
  """A split: ``images`` uint8 (N, 36, 36), ``labels`` int32 (N, 2).

  ``provenance`` (built sets only) says where each composite comes from:
  ``top_left_index`` / ``bottom_right_index`` int (N,), the images' indices in
  their source's split (MNIST train for train and validation, MNIST test for
  test), and ``top_left_offset`` / ``bottom_right_offset`` int (N, 2), the
  (row, col) of each image's corner on the canvas.
  """

  images: np.ndarray
  labels: np.ndarray
  provenance: Optional[dict[str, np.ndarray]] = None

  def __len__(self):
    return len(self.images)

  def batch(self, rows) -> dict[str, np.ndarray]:
    """The model's input and the labels of ``rows``: ``image`` float32
    (N, 36, 36, 1), ``label`` int32 (N, 2)."""
    return {
      'image': to_model_input(self.images[rows]),
      'label': self.labels[rows],
    }


# ---------------------------------------------------------------------------
# Building composites.
# ---------------------------------------------------------------------------


def stratified_split(
  labels: np.ndarray, num_holdout: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices so the holdout has ``num_holdout`` items, classes in
  proportion (largest remainders), each part sorted."""
  classes, counts = np.unique(labels, return_counts=True)
  share = counts * num_holdout / len(labels)
  take = np.floor(share).astype(int)
  extra = num_holdout - take.sum()
  take[np.argsort(-(share - take), kind='stable')[:extra]] += 1
  holdout = []
  for c, n in zip(classes, take):
    members = np.flatnonzero(labels == c)
    holdout.append(rng.permutation(members)[:n])
  holdout = np.sort(np.concatenate(holdout))
  keep = np.setdiff1d(np.arange(len(labels)), holdout)
  return keep, holdout


def _partners(
  rng: np.random.Generator,
  base: np.ndarray,
  base_labels: np.ndarray,
  partner_labels: np.ndarray,
  same_source: bool,
  different_class: bool,
) -> np.ndarray:
  """A partner index into the partner pool for each base image.

  ``base``: the base images' positions in their pool, ``base_labels`` their
  labels. When base and partner come from the same pool an image never
  pairs with itself; with ``different_class`` the partner's label differs
  from the base's.
  """
  n, pool = len(base), len(partner_labels)
  if different_class:
    # Draw within the other classes: rank r among the pool's images whose
    # label is not the base's.
    order = np.argsort(partner_labels, kind='stable')
    counts = np.bincount(partner_labels, minlength=10)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    base_count = counts[base_labels]
    r = (rng.random(n) * (pool - base_count)).astype(np.int64)
    # Skip the block of the base's own class in the label-sorted order.
    r = np.where(r >= starts[base_labels], r + base_count, r)
    return order[r]
  if same_source:
    return (base + rng.integers(1, pool, n)) % pool
  return rng.integers(0, pool, n)


def compose(
  top_left: np.ndarray,
  bottom_right: np.ndarray,
  offsets_tl: np.ndarray,
  offsets_br: np.ndarray,
) -> np.ndarray:
  """Overlays image pairs on 36x36 canvases: sum, clipped at 255.

  Args:
    top_left, bottom_right: uint8 (N, 28, 28).
    offsets_tl, offsets_br: int (N, 2), the (row, col) of each image's
      top-left pixel on the canvas, in 0..8.

  Returns:
    uint8 (N, 36, 36).
  """
  canvas = np.zeros((len(top_left), CANVAS, CANVAS), np.uint16)
  for images, offsets in ((top_left, offsets_tl), (bottom_right, offsets_br)):
    # One vectorized slice assignment per distinct offset (at most 81).
    keys = offsets[:, 0] * 16 + offsets[:, 1]
    for key in np.unique(keys):
      rows = np.flatnonzero(keys == key)
      dy, dx = divmod(int(key), 16)
      canvas[rows, dy : dy + DIGIT, dx : dx + DIGIT] += images[rows]
  return np.minimum(canvas, 255).astype(np.uint8)


def paretomtl_offsets(
  rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray]:
  """Pareto MTL's placements of n pairs: ((a, a), (c, c)) per row, int (n, 2)
  each, a uniform in 1..4 and c in 5..8."""
  a = rng.integers(PARETOMTL_TOP_LEFT[0], PARETOMTL_TOP_LEFT[1] + 1, n)
  c = rng.integers(PARETOMTL_BOTTOM_RIGHT[0], PARETOMTL_BOTTOM_RIGHT[1] + 1, n)
  return np.stack([a, a], 1), np.stack([c, c], 1)


def _offsets(rng, recipe: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  if recipe == 'comet':
    return (
      np.zeros((n, 2), np.int64),
      np.full((n, 2), CANVAS - DIGIT, np.int64),
    )
  if recipe == 'paretomtl':
    return paretomtl_offsets(rng, n)
  centre = (CANVAS - DIGIT) // 2
  return (
    centre - rng.integers(0, centre + 1, (n, 2)),
    centre + rng.integers(0, centre + 1, (n, 2)),
  )


def _build_split(
  rng,
  tl_index,
  tl_images,
  tl_labels,
  br_index,
  br_images,
  br_labels,
  recipe,
  same_source,
  base=None,
) -> Split:
  """Composites of the top-left images at positions ``base`` (default: each
  one twice, in order) with random partners and the recipe's placements."""
  different_class = recipe != 'comet' and same_source
  if base is None:
    rounds = [np.arange(len(tl_images))] * 2
  else:
    rounds = [base]
  partner = np.concatenate(
    [
      _partners(
        rng,
        positions,
        tl_labels[positions],
        br_labels,
        same_source,
        different_class,
      )
      for positions in rounds
    ]
  )
  base = np.concatenate(rounds)
  offsets_tl, offsets_br = _offsets(rng, recipe, len(base))
  images = compose(tl_images[base], br_images[partner], offsets_tl, offsets_br)
  labels = np.stack([tl_labels[base], br_labels[partner]], 1).astype(np.int32)
  provenance = {
    'top_left_index': tl_index[base],
    'bottom_right_index': br_index[partner],
    'top_left_offset': offsets_tl,
    'bottom_right_offset': offsets_br,
  }
  return Split(images, labels, provenance)


def _take(split: Split, rows) -> Split:
  return Split(
    split.images[rows],
    split.labels[rows],
    {k: v[rows] for k, v in split.provenance.items()},
  )


def _raw(dataset, data_dir, download):
  tl_source, br_source = DATASETS[dataset]
  return {
    (s, split): sources.load_source(s, split, data_dir, download)
    for s in {tl_source, br_source}
    for split in ('train', 'test')
  }


def _generator(dataset, recipe, seed, *more) -> np.random.Generator:
  return np.random.default_rng(
    [seed, _RECIPE_SEED[recipe], list(DATASETS).index(dataset), *more]
  )


def build(
  dataset: str,
  recipe: str = 'comet',
  seed: int = 0,
  data_dir: Optional[str] = None,
  download: bool = True,
  num_validation: Optional[int] = None,
) -> dict[str, Split]:
  """Builds ``{'train', 'validation', 'test'}`` of a MultiMNIST-family set.

  ``num_validation``: for ``paretomtl``, the train composites held out at
  the end (default 20,000; 0: an empty validation split); for
  ``paretomtl_axes``, base images held out (default 5,000, x2 composites);
  ``comet`` always holds out 10,000 bases.
  """
  _check_name(dataset, recipe)
  tl_source, br_source = DATASETS[dataset]
  same_source = tl_source == br_source
  raw = _raw(dataset, data_dir, download)
  rng = _generator(dataset, recipe, seed)
  if recipe == 'paretomtl':
    num_validation = (
      PARETOMTL_VALIDATION if num_validation is None else num_validation
    )
    full = {}
    for split in ('train', 'test'):
      (tl_images, tl_labels), (br_images, br_labels) = (
        raw[(tl_source, split)],
        raw[(br_source, split)],
      )
      full[split] = _build_split(
        rng,
        np.arange(len(tl_labels)),
        tl_images,
        tl_labels,
        np.arange(len(br_labels)),
        br_images,
        br_labels,
        recipe,
        same_source,
      )
    n = len(full['train'].labels)
    if not 0 <= num_validation < n:
      raise DataError(
        f'num_validation={num_validation}: must be in 0..{n - 1} '
        f'(the {n} train composites).'
      )
    return {
      'train': _take(full['train'], slice(0, n - num_validation)),
      'validation': _take(full['train'], slice(n - num_validation, n)),
      'test': full['test'],
    }
  holdout = (
    10000
    if recipe == 'comet'
    else (5000 if num_validation is None else num_validation)
  )
  # The same base-image split of each source, drawn once per source.
  parts = {}
  for s in sorted({tl_source, br_source}):
    images, labels = raw[(s, 'train')]
    keep, held = stratified_split(labels, holdout, rng)
    test_images, test_labels = raw[(s, 'test')]
    parts[s] = {
      'train': (keep, images[keep], labels[keep]),
      'validation': (held, images[held], labels[held]),
      'test': (np.arange(len(test_labels)), test_images, test_labels),
    }
  return {
    split: _build_split(
      rng,
      *parts[tl_source][split],
      *parts[br_source][split],
      recipe,
      same_source,
    )
    for split in ('train', 'validation', 'test')
  }


class FreshTrainSplits:
  """A new train split for every epoch: the same top-left images as the
  built train split, re-paired with new partners and new placements (the
  validation and test splits stay fixed). Epoch e's split is a function of
  (data set, recipe, seed, e) only, so a resumed run sees the same data.

  Partners come from the pool the builder drew them from: all source train
  images for ``paretomtl``, the train bases for the other recipes.
  """

  def __init__(
    self,
    dataset: str,
    recipe: str,
    seed: int,
    train: Split,
    data_dir: Optional[str] = None,
    download: bool = True,
  ):
    _check_name(dataset, recipe)
    if train.provenance is None:
      raise DataError(
        'fresh train composites need a data set built from '
        'the raw files; the stored ones (multi_mnist_sample, '
        'paddlerec) have no source images to re-pair.'
      )
    self.dataset, self.recipe, self.seed = dataset, recipe, seed
    tl_source, br_source = DATASETS[dataset]
    self._same_source = tl_source == br_source
    raw = _raw(dataset, data_dir, download)
    index = train.provenance['top_left_index']
    pools = {}
    for side, source, used in (
      ('tl', tl_source, index),
      ('br', br_source, train.provenance['bottom_right_index']),
    ):
      images, labels = raw[(source, 'train')]
      pool = (
        np.arange(len(labels)) if recipe == 'paretomtl' else np.unique(used)
      )
      if self._same_source and side == 'br':
        pool = pools['tl'][0]  # One pool: "never itself" holds.
      pools[side] = (pool, images[pool], labels[pool])
    self._pools = pools
    self._base = np.searchsorted(pools['tl'][0], index)
    self._cached = (None, None)

  def __call__(self, epoch: int) -> Split:
    if self._cached[0] != epoch:
      rng = _generator(self.dataset, self.recipe, self.seed, 1, epoch)
      split = _build_split(
        rng,
        *self._pools['tl'],
        *self._pools['br'],
        self.recipe,
        self._same_source,
        base=self._base,
      )
      self._cached = (epoch, split)
    return self._cached[1]


def _check_name(dataset: str, recipe: str):
  if dataset not in DATASETS:
    raise DataError(
      f'Unknown data set {dataset!r}; choose one of {ALL_DATASETS}.'
    )
  if recipe not in RECIPES:
    raise DataError(
      f'Unknown recipe {recipe!r}; choose one of {list(RECIPES)}.'
    )


# ---------------------------------------------------------------------------
# Loading, with an on-disk cache of built arrays.
# ---------------------------------------------------------------------------


def _cache_key(dataset, recipe, seed, num_validation) -> str:
  srcs = sorted(set(DATASETS[dataset]))
  blob = json.dumps(
    [
      BUILD_VERSION,
      dataset,
      recipe,
      seed,
      num_validation,
      [sources.CHECKSUMS[s] for s in srcs],
    ],
    sort_keys=True,
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_npz(path: str, arrays: dict[str, np.ndarray], compress=False):
  """Writes arrays to ``path`` atomically (a reader never sees half a file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.npz.part')
  try:
    with os.fdopen(fd, 'wb') as f:
      (np.savez_compressed if compress else np.savez)(f, **arrays)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def splits_to_arrays(splits: dict[str, Split]) -> dict[str, np.ndarray]:
  """Flat ``{split}_images`` / ``{split}_labels`` / ``{split}_{provenance}``."""
  arrays = {}
  for name, split in splits.items():
    arrays[f'{name}_images'] = split.images
    arrays[f'{name}_labels'] = split.labels
    for key, value in (split.provenance or {}).items():
      arrays[f'{name}_{key}'] = value
  return arrays


def _arrays_to_splits(arrays, path) -> dict[str, Split]:
  def split(name):
    provenance = {
      k: arrays[f'{name}_{k}']
      for k in PROVENANCE_KEYS
      if f'{name}_{k}' in arrays
    }
    return Split(
      arrays[f'{name}_images'], arrays[f'{name}_labels'], provenance or None
    )

  try:
    return {name: split(name) for name in ('train', 'validation', 'test')}
  except (KeyError, ValueError, OSError) as e:
    raise DataError(
      f'{path}: damaged or incomplete ({e}); delete it and '
      'run again to rebuild.'
    ) from None


def load_npz_splits(path: str) -> dict[str, Split]:
  if not os.path.exists(path):
    raise DataError(f'{path}: missing; reinstall dselect_jax or rebuild it.')
  try:
    with np.load(path, allow_pickle=False) as f:
      return _arrays_to_splits({k: f[k] for k in f.files}, path)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(
      f'{path}: damaged ({e}); delete it and run again to rebuild.'
    ) from None


def load_paddlerec(
  paddlerec_dir: Optional[str], seed: int = 0, num_validation: int = 10000
) -> dict[str, Split]:
  """PaddleRec's ``train.pickle``/``test.pickle``, validation carved from
  train (stratified on the task-1 label)."""
  if not paddlerec_dir:
    raise DataError(
      'data.name="paddlerec" needs data.paddlerec_dir, the '
      "folder holding PaddleRec's train.pickle and "
      'test.pickle.'
    )
  train_x, train_y = sources.read_paddlerec_pickle(
    os.path.join(paddlerec_dir, 'train.pickle')
  )
  test_x, test_y = sources.read_paddlerec_pickle(
    os.path.join(paddlerec_dir, 'test.pickle')
  )
  num_validation = min(num_validation, len(train_x) // 5)
  keep, held = stratified_split(
    train_y[:, 0], num_validation, np.random.default_rng(seed)
  )
  return {
    'train': Split(train_x[keep], train_y[keep]),
    'validation': Split(train_x[held], train_y[held]),
    'test': Split(test_x, test_y),
  }


def load(
  dataset: str,
  recipe: str = 'comet',
  seed: int = 0,
  data_dir: Optional[str] = None,
  cache_dir: Optional[str] = None,
  download: bool = True,
  num_validation: Optional[int] = None,
  paddlerec_dir: Optional[str] = None,
  negatives: int = 1,
) -> dict[str, Split | movielens.Split]:
  """The three splits of a data set, from the cache when it has them.

  Args:
    dataset: one of ALL_DATASETS.
    recipe: 'comet' or 'paretomtl' (ignored by the special data sets and
      movielens).
    seed: the pairing/offset seed.
    data_dir: where the raw files are (see ``sources``).
    cache_dir: where built arrays are cached; default
      ``~/.cache/dselect_jax/built``.
    download: fetch missing raw files from the public mirrors.
    num_validation: see ``build`` (None: the recipe's default).
    paddlerec_dir: for 'paddlerec', the folder of its pickles.
    negatives: for 'movielens', unrated movies drawn per rating.
  """
  if dataset == 'movielens':
    return movielens.load(seed, negatives, data_dir, download)
  if dataset == 'multi_mnist_sample':
    return load_npz_splits(SAMPLE_FILE)
  if dataset == 'paddlerec':
    return load_paddlerec(paddlerec_dir, seed)
  _check_name(dataset, recipe)
  key = _cache_key(dataset, recipe, seed, num_validation)
  cache_dir = cache_dir or os.path.join(sources.default_cache_dir(), 'built')
  path = os.path.join(cache_dir, f'{dataset}-{recipe}-seed{seed}-{key}.npz')
  if os.path.exists(path):
    try:
      return load_npz_splits(path)
    except DataError as e:  # Rebuilt below, and written over.
      logging.warning(
        'cached data set %s',
        str(e).replace('delete it and run again to rebuild', 'rebuilding it'),
      )
  splits = build(dataset, recipe, seed, data_dir, download, num_validation)
  try:
    save_npz(path, splits_to_arrays(splits))
  except OSError:
    pass  # A read-only cache only costs a rebuild next time.
  return splits


# ---------------------------------------------------------------------------
# Batching.
# ---------------------------------------------------------------------------


def to_model_input(images: np.ndarray) -> np.ndarray:
  """uint8 (..., 36, 36) -> float32 (..., 36, 36, 1) in [0, 1]."""
  return (images.astype(np.float32) * (1 / 255))[..., None]


def check_batch_size(global_batch: int, num_devices: int) -> int:
  """The per-device batch; a clear error when the division is not exact."""
  if global_batch < 1 or global_batch % num_devices:
    raise ValueError(
      f'batch_size={global_batch} must be a positive multiple of the '
      f'{num_devices} devices; set --config.batch_size to a multiple '
      f'of {num_devices}.'
    )
  return global_batch // num_devices


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffle order of one epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _local_rows(global_batch, num_devices, process_index, process_count):
  """(per_device, this process's slice of a global batch)."""
  per_device = check_batch_size(global_batch, num_devices * process_count)
  local = per_device * num_devices
  return per_device, slice(process_index * local, (process_index + 1) * local)


def _map(fn, tree):
  """``fn`` on every array of a batch (a dict, nested for categorical
  features)."""
  if isinstance(tree, dict):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(tree)


def _per_device(batch, num_devices: int, per_device: int):
  """(N, ...) leaves -> (devices, per_device, ...)."""
  return _map(lambda x: x.reshape(num_devices, per_device, *x.shape[1:]), batch)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  """Zero rows appended to reach ``size``."""
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def train_batches(
  split,
  global_batch: int,
  num_devices: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  shuffle: bool = True,
  epoch_split: Optional[Callable[[int], Split]] = None,
) -> Iterator[dict]:
  """Endless shuffled batches, from global step ``start_step`` on.

  ``split``: any split with ``len`` and ``batch(rows)`` (a ``Split``, a
  ``movielens.Split``). Step s reads batch ``s % steps_per_epoch`` of epoch
  ``s // steps_per_epoch`` (a partial last batch is dropped), so a resumed
  run sees exactly the batches an uninterrupted one would have. With
  several processes, each yields its own slice of the same global batch for
  its local devices. ``shuffle=False`` reads the split in stored order
  every epoch (as PaddleRec does); ``epoch_split(e)``, when given, is epoch
  e's split (of ``len(split)`` examples; ``FreshTrainSplits``).

  Yields:
    ``split.batch(rows)`` with every array shaped (devices, per_device,
    ...); for images ``{'image': float32 (devices, per_device, 36, 36, 1),
    'label': int32 (devices, per_device, 2)}``.
  """
  per_device, local = _local_rows(
    global_batch, num_devices, process_index, process_count
  )
  steps_per_epoch = len(split) // global_batch
  if steps_per_epoch == 0:
    raise ValueError(
      f'batch_size={global_batch} is larger than the '
      f'{len(split)} training examples; lower it.'
    )
  step = start_step
  while True:
    epoch, index = divmod(step, steps_per_epoch)
    if epoch_split is not None:
      split = epoch_split(epoch)
    order = (
      epoch_permutation(len(split), seed, epoch)
      if shuffle
      else np.arange(len(split))
    )
    while index < steps_per_epoch:
      # Sorted before slicing: device d of the global batch reads the same
      # rows whatever the number of processes.
      rows = np.sort(order[index * global_batch : (index + 1) * global_batch])
      yield _per_device(split.batch(rows[local]), num_devices, per_device)
      index += 1
      step += 1


def eval_batches(
  split,
  global_batch: int,
  num_devices: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict]:
  """Every example exactly once, in order; the last batch padded with zeros.

  Yields the train batches' keys plus ``mask``: float32 (devices,
  per_device), 1 for real examples and 0 for padding.
  """
  per_device, local = _local_rows(
    global_batch, num_devices, process_index, process_count
  )
  for start in range(0, len(split), global_batch):
    batch = split.batch(np.arange(start, min(start + global_batch, len(split))))
    mask = np.zeros(global_batch, np.float32)
    mask[: len(split) - start] = 1
    if len(split) - start < global_batch:
      batch = _map(lambda x: _pad(x, global_batch), batch)
    batch = _map(lambda x: x[local], batch)
    batch['mask'] = mask[local]
    yield _per_device(batch, num_devices, per_device)
