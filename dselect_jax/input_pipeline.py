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
  ``paretomtl``: Pareto MTL's data (Lin et al., NeurIPS 2019), which PaddleRec
    used: each of the two images shifted by 0..4 pixels per axis toward its
    corner from the centred position (top-left offsets 0..4, bottom-right
    4..8), partners of a different class when both come from one source. 120,000
    train (60k bases x 2) and 20,000 test; the validation split is carved from
    train by base image (stratified, ``paretomtl_validation`` bases x 2).

Data sets: ``multi_mnist`` (digit, digit), ``multi_fashion`` (article,
article), ``multi_fashion_mnist`` (digit top-left, article bottom-right);
``multi_mnist_sample``, a small ``comet`` MultiMNIST shipped in the package;
``paddlerec``, PaddleRec's own ``train.pickle``/``test.pickle``.

Everything is a deterministic function of (data set, recipe, seed, source
files): NumPy's PCG64 generator gives the same stream on every machine, so the
arrays are byte-identical everywhere. Built arrays are cached as ``.npz``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Optional

from absl import logging
import numpy as np

from dselect_jax import sources
from dselect_jax.sources import DataError

CANVAS = 36
DIGIT = 28
# Bump when a builder changes, so stale caches are rebuilt.
BUILD_VERSION = 1

DATASETS = {
    # name: (top-left source, bottom-right source)
    'multi_mnist': ('mnist', 'mnist'),
    'multi_fashion': ('fashion_mnist', 'fashion_mnist'),
    'multi_fashion_mnist': ('mnist', 'fashion_mnist'),
}
SPECIAL_DATASETS = ('multi_mnist_sample', 'paddlerec')
RECIPES = ('comet', 'paretomtl')
SAMPLE_FILE = os.path.join(os.path.dirname(__file__), 'data',
                           'multi_mnist_sample.npz')


PROVENANCE_KEYS = ('top_left_index', 'bottom_right_index', 'top_left_offset',
                   'bottom_right_offset')


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


# ---------------------------------------------------------------------------
# Building composites.
# ---------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, num_holdout: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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


def _partners(rng: np.random.Generator, base_labels: np.ndarray,
              partner_labels: np.ndarray, same_source: bool,
              different_class: bool, copies: int) -> np.ndarray:
  """For each of ``copies`` rounds, a partner index per base image.

  Returns ``(copies * N,)`` indices into the partner pool, round-major. When
  base and partner come from the same pool an image never pairs with itself;
  with ``different_class`` the partner's label differs from the base's.
  """
  n, pool = len(base_labels), len(partner_labels)
  out = []
  for _ in range(copies):
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
      out.append(order[r])
    elif same_source:
      out.append((np.arange(n) + rng.integers(1, pool, n)) % pool)
    else:
      out.append(rng.integers(0, pool, n))
  return np.concatenate(out)


def compose(top_left: np.ndarray, bottom_right: np.ndarray,
            offsets_tl: np.ndarray, offsets_br: np.ndarray) -> np.ndarray:
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
      canvas[rows, dy:dy + DIGIT, dx:dx + DIGIT] += images[rows]
  return np.minimum(canvas, 255).astype(np.uint8)


def _build_split(rng, tl_index, tl_images, tl_labels, br_index, br_images,
                 br_labels, recipe, same_source) -> Split:
  copies = 2
  partner = _partners(rng, tl_labels, br_labels, same_source,
                      different_class=(recipe == 'paretomtl' and same_source),
                      copies=copies)
  base = np.tile(np.arange(len(tl_images)), copies)
  n = len(base)
  if recipe == 'comet':
    offsets_tl = np.zeros((n, 2), np.int64)
    offsets_br = np.full((n, 2), CANVAS - DIGIT, np.int64)
  else:
    centre = (CANVAS - DIGIT) // 2
    offsets_tl = centre - rng.integers(0, centre + 1, (n, 2))
    offsets_br = centre + rng.integers(0, centre + 1, (n, 2))
  images = compose(tl_images[base], br_images[partner], offsets_tl,
                   offsets_br)
  labels = np.stack([tl_labels[base], br_labels[partner]], 1).astype(np.int32)
  provenance = {'top_left_index': tl_index[base],
                'bottom_right_index': br_index[partner],
                'top_left_offset': offsets_tl, 'bottom_right_offset': offsets_br}
  return Split(images, labels, provenance)


def build(dataset: str, recipe: str = 'comet', seed: int = 0,
          data_dir: Optional[str] = None, download: bool = True,
          paretomtl_validation: int = 5000) -> dict[str, Split]:
  """Builds ``{'train', 'validation', 'test'}`` of a MultiMNIST-family set."""
  _check_name(dataset, recipe)
  tl_source, br_source = DATASETS[dataset]
  same_source = tl_source == br_source
  raw = {(s, split): sources.load_source(s, split, data_dir, download)
         for s in {tl_source, br_source} for split in ('train', 'test')}
  rng = np.random.default_rng([seed, RECIPES.index(recipe),
                               list(DATASETS).index(dataset)])
  holdout = 10000 if recipe == 'comet' else paretomtl_validation
  # The same base-image split of each source, drawn once per source.
  parts = {}
  for s in sorted({tl_source, br_source}):
    images, labels = raw[(s, 'train')]
    keep, held = stratified_split(labels, holdout, rng)
    test_images, test_labels = raw[(s, 'test')]
    parts[s] = {'train': (keep, images[keep], labels[keep]),
                'validation': (held, images[held], labels[held]),
                'test': (np.arange(len(test_labels)), test_images,
                         test_labels)}
  return {
      split: _build_split(rng, *parts[tl_source][split],
                          *parts[br_source][split], recipe, same_source)
      for split in ('train', 'validation', 'test')
  }


def _check_name(dataset: str, recipe: str):
  if dataset not in DATASETS:
    raise DataError(f'Unknown data set {dataset!r}; choose one of '
                    f'{sorted(DATASETS) + list(SPECIAL_DATASETS)}.')
  if recipe not in RECIPES:
    raise DataError(f'Unknown recipe {recipe!r}; choose one of '
                    f'{list(RECIPES)}.')


# ---------------------------------------------------------------------------
# Loading, with an on-disk cache of built arrays.
# ---------------------------------------------------------------------------


def _cache_key(dataset, recipe, seed, paretomtl_validation) -> str:
  srcs = sorted(set(DATASETS[dataset]))
  blob = json.dumps([BUILD_VERSION, dataset, recipe, seed,
                     paretomtl_validation,
                     [sources.CHECKSUMS[s] for s in srcs]], sort_keys=True)
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
    provenance = {k: arrays[f'{name}_{k}'] for k in PROVENANCE_KEYS
                  if f'{name}_{k}' in arrays}
    return Split(arrays[f'{name}_images'], arrays[f'{name}_labels'],
                 provenance or None)
  try:
    return {name: split(name) for name in ('train', 'validation', 'test')}
  except (KeyError, ValueError, OSError) as e:
    raise DataError(f'{path}: damaged or incomplete ({e}); delete it and '
                    'run again to rebuild.') from None


def load_npz_splits(path: str) -> dict[str, Split]:
  if not os.path.exists(path):
    raise DataError(f'{path}: missing; reinstall dselect_jax or rebuild it.')
  try:
    with np.load(path, allow_pickle=False) as f:
      return _arrays_to_splits({k: f[k] for k in f.files}, path)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f'{path}: damaged ({e}); delete it and run again to '
                    'rebuild.') from None


def load_paddlerec(paddlerec_dir: Optional[str], seed: int = 0,
                   num_validation: int = 10000) -> dict[str, Split]:
  """PaddleRec's ``train.pickle``/``test.pickle``, validation carved from
  train (stratified on the task-1 label)."""
  if not paddlerec_dir:
    raise DataError('data.name="paddlerec" needs data.paddlerec_dir, the '
                    'folder holding PaddleRec\'s train.pickle and '
                    'test.pickle.')
  train_x, train_y = sources.read_paddlerec_pickle(
      os.path.join(paddlerec_dir, 'train.pickle'))
  test_x, test_y = sources.read_paddlerec_pickle(
      os.path.join(paddlerec_dir, 'test.pickle'))
  num_validation = min(num_validation, len(train_x) // 5)
  keep, held = stratified_split(train_y[:, 0], num_validation,
                                np.random.default_rng(seed))
  return {'train': Split(train_x[keep], train_y[keep]),
          'validation': Split(train_x[held], train_y[held]),
          'test': Split(test_x, test_y)}


def load(dataset: str, recipe: str = 'comet', seed: int = 0,
         data_dir: Optional[str] = None, cache_dir: Optional[str] = None,
         download: bool = True, paretomtl_validation: int = 5000,
         paddlerec_dir: Optional[str] = None) -> dict[str, Split]:
  """The three splits of a data set, from the cache when it has them.

  Args:
    dataset: a key of DATASETS, 'multi_mnist_sample' or 'paddlerec'.
    recipe: 'comet' or 'paretomtl' (ignored by the two special data sets).
    seed: the pairing/offset seed.
    data_dir: where the raw files are (see ``sources``).
    cache_dir: where built arrays are cached; default
      ``~/.cache/dselect_jax/built``.
    download: fetch missing raw files from the public mirrors.
    paretomtl_validation: base images held out for validation (x2
      composites) by the paretomtl recipe.
    paddlerec_dir: for 'paddlerec', the folder of its pickles.
  """
  if dataset == 'multi_mnist_sample':
    return load_npz_splits(SAMPLE_FILE)
  if dataset == 'paddlerec':
    return load_paddlerec(paddlerec_dir, seed)
  _check_name(dataset, recipe)
  key = _cache_key(dataset, recipe, seed, paretomtl_validation)
  cache_dir = cache_dir or os.path.join(sources.default_cache_dir(), 'built')
  path = os.path.join(cache_dir, f'{dataset}-{recipe}-seed{seed}-{key}.npz')
  if os.path.exists(path):
    try:
      return load_npz_splits(path)
    except DataError as e:  # Rebuilt below, and written over.
      logging.warning('cached data set %s', str(e).replace(
          'delete it and run again to rebuild', 'rebuilding it'))
  splits = build(dataset, recipe, seed, data_dir, download,
                 paretomtl_validation)
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
        f'of {num_devices}.')
  return global_batch // num_devices


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffle order of one epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _local_rows(global_batch, num_devices, process_index, process_count):
  """(per_device, this process's slice of a global batch)."""
  per_device = check_batch_size(global_batch, num_devices * process_count)
  local = per_device * num_devices
  return per_device, slice(process_index * local, (process_index + 1) * local)


def train_batches(split: Split, global_batch: int, num_devices: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Endless shuffled batches, from global step ``start_step`` on.

  Step s reads batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``
  (a partial last batch is dropped), so a resumed run sees exactly the
  batches an uninterrupted one would have. With several processes, each
  yields its own slice of the same global batch for its local devices.

  Yields:
    ``{'image': float32 (devices, per_device, 36, 36, 1),
       'label': int32 (devices, per_device, 2)}``.
  """
  per_device, local = _local_rows(global_batch, num_devices, process_index,
                                  process_count)
  steps_per_epoch = len(split) // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size={global_batch} is larger than the '
                     f'{len(split)} training examples; lower it.')
  step = start_step
  while True:
    epoch, index = divmod(step, steps_per_epoch)
    order = epoch_permutation(len(split), seed, epoch)
    while index < steps_per_epoch:
      # Sorted before slicing: device d of the global batch reads the same
      # rows whatever the number of processes.
      rows = np.sort(order[index * global_batch:(index + 1) * global_batch])
      rows = rows[local]
      yield {
          'image': to_model_input(split.images[rows]).reshape(
              num_devices, per_device, CANVAS, CANVAS, 1),
          'label': split.labels[rows].reshape(num_devices, per_device, 2),
      }
      index += 1
      step += 1


def eval_batches(split: Split, global_batch: int, num_devices: int,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Every example exactly once, in order; the last batch padded.

  Yields the train batches' keys plus ``mask``: float32 (devices,
  per_device), 1 for real examples and 0 for padding.
  """
  per_device, local = _local_rows(global_batch, num_devices, process_index,
                                  process_count)
  for start in range(0, len(split), global_batch):
    images = split.images[start:start + global_batch]
    labels = split.labels[start:start + global_batch]
    mask = np.ones(global_batch, np.float32)
    pad = global_batch - len(images)
    if pad:
      mask[len(images):] = 0
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:],
                                                images.dtype)])
      labels = np.concatenate([labels, np.zeros((pad, 2), labels.dtype)])
    yield {
        'image': to_model_input(images[local]).reshape(
            num_devices, per_device, CANVAS, CANVAS, 1),
        'label': labels[local].reshape(num_devices, per_device, 2),
        'mask': mask[local].reshape(num_devices, per_device),
    }
