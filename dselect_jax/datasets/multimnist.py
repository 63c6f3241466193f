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
    pixel against PaddleRec's sample, tests/test_datasets.py): the
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
article), ``multi_fashion_mnist`` (digit top-left, article bottom-right).
The stored MultiMNIST sets (the shipped sample, PaddleRec's pickles) are in
``stored``.

Everything is a deterministic function of (data set, recipe, seed, source
files): NumPy's PCG64 generator gives the same stream on every machine, so the
arrays are byte-identical everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import numpy as np

from dselect_jax.datasets import sources
from dselect_jax.datasets.sources import DataError
from dselect_jax.datasets.spec import DataSpec

CANVAS = 36
DIGIT = 28
# Bump when a builder changes, so stale caches are rebuilt.
BUILD_VERSION = 2

SOURCES = {
  # data set: (top-left source, bottom-right source)
  'multi_mnist': ('mnist', 'mnist'),
  'multi_fashion': ('fashion_mnist', 'fashion_mnist'),
  'multi_fashion_mnist': ('mnist', 'fashion_mnist'),
}
RECIPES = ('comet', 'paretomtl', 'paretomtl_axes')
# Seeds each recipe's generator; fixed, so adding a recipe changes no data.
_RECIPE_SEED = {'comet': 0, 'paretomtl_axes': 1, 'paretomtl': 2}
# Pareto MTL's placements: the top-left image at (a, a), the bottom-right one
# at (c, c).
PARETOMTL_TOP_LEFT = (1, 4)
PARETOMTL_BOTTOM_RIGHT = (5, 8)
PARETOMTL_VALIDATION = 20000


def spec(fresh_train: bool = True) -> DataSpec:
  """Every MultiMNIST set's spec: two 10-class classifications on a 36x36
  grey canvas. ``fresh_train``: built from the raw files, so its train
  composites can be re-drawn (False for the stored sets)."""
  return DataSpec(
    task_names=('top_left', 'bottom_right'),
    task_kinds=('classification', 'classification'),
    num_classes=10,
    image_shape=(CANVAS, CANVAS, 1),
    fresh_train=fresh_train,
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
    """The model's input and the tasks' targets of ``rows``: ``image``
    float32 (N, 36, 36, 1), ``target`` int32 (N, 2) (the digits) and
    ``weight`` float32 (N, 2) (all 1: every digit is known)."""
    labels = self.labels[rows]
    return {
      'image': to_model_input(self.images[rows]),
      'target': labels,
      'weight': np.ones(labels.shape, np.float32),
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


class Pool(NamedTuple):
  """Source images one corner of the composites draws from: ``index`` (N,)
  in their source's split, ``images`` uint8 (N, 28, 28), ``labels`` (N,)."""

  index: np.ndarray
  images: np.ndarray
  labels: np.ndarray


def _build_split(
  rng: np.random.Generator,
  top_left: Pool,
  bottom_right: Pool,
  recipe: str,
  same_source: bool,
  base: Optional[np.ndarray] = None,
) -> Split:
  """Composites of the top-left images at positions ``base`` (default: each
  one twice, in order) with random partners and the recipe's placements."""
  tl_index, tl_images, tl_labels = top_left
  br_index, br_images, br_labels = bottom_right
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
  tl_source, br_source = SOURCES[dataset]
  return {
    (s, split): sources.load_source(s, split, data_dir, download)
    for s in {tl_source, br_source}
    for split in ('train', 'test')
  }


def _generator(dataset, recipe, seed, *more) -> np.random.Generator:
  return np.random.default_rng(
    [seed, _RECIPE_SEED[recipe], list(SOURCES).index(dataset), *more]
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
  tl_source, br_source = SOURCES[dataset]
  same_source = tl_source == br_source
  raw = _raw(dataset, data_dir, download)
  rng = _generator(dataset, recipe, seed)
  if recipe == 'paretomtl':
    num_validation = (
      PARETOMTL_VALIDATION if num_validation is None else num_validation
    )
    full = {}
    for split in ('train', 'test'):
      tl, br = (
        Pool(np.arange(len(raw[(s, split)][1])), *raw[(s, split)])
        for s in (tl_source, br_source)
      )
      full[split] = _build_split(rng, tl, br, recipe, same_source)
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
      'train': Pool(keep, images[keep], labels[keep]),
      'validation': Pool(held, images[held], labels[held]),
      'test': Pool(np.arange(len(test_labels)), test_images, test_labels),
    }
  return {
    split: _build_split(
      rng,
      parts[tl_source][split],
      parts[br_source][split],
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
    tl_source, br_source = SOURCES[dataset]
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
        pool = pools['tl'].index  # One pool: "never itself" holds.
      pools[side] = Pool(pool, images[pool], labels[pool])
    self._pools = pools
    self._base = np.searchsorted(pools['tl'].index, index)
    self._cached = (None, None)

  def __call__(self, epoch: int) -> Split:
    if self._cached[0] != epoch:
      rng = _generator(self.dataset, self.recipe, self.seed, 1, epoch)
      split = _build_split(
        rng,
        self._pools['tl'],
        self._pools['br'],
        self.recipe,
        self._same_source,
        base=self._base,
      )
      self._cached = (epoch, split)
    return self._cached[1]


def _check_name(dataset: str, recipe: str):
  if dataset not in SOURCES:
    raise DataError(
      f'Unknown data set {dataset!r}; choose one of {list(SOURCES)}.'
    )
  if recipe not in RECIPES:
    raise DataError(
      f'Unknown recipe {recipe!r}; choose one of {list(RECIPES)}.'
    )


def to_model_input(images: np.ndarray) -> np.ndarray:
  """uint8 (..., 36, 36) -> float32 (..., 36, 36, 1) in [0, 1]."""
  return (images.astype(np.float32) * (1 / 255))[..., None]
