"""MultiMNIST splits kept in files: the cache of built data sets, the
sample shipped in the package, and PaddleRec's pickles. NumPy only.

A built data set is cached as one ``.npz`` whose name carries a digest of
everything it is a function of (builder version, data set, recipe, seed,
validation size, source checksums), so a stale cache is never read. Each
split's arrays are read only when that split is asked for: evaluating a
checkpoint reads the test split alone, which is why it works once the raw
training files are gone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
from typing import Optional
import zipfile

from absl import logging
import numpy as np

from dselect_jax.datasets import multimnist
from dselect_jax.datasets import sources
from dselect_jax.datasets.multimnist import Split
from dselect_jax.datasets.sources import DataError

SPLITS = ('train', 'validation', 'test')
SAMPLE_FILE = os.path.join(
  os.path.dirname(__file__), 'data', 'multi_mnist_sample.npz'
)
# PaddleRec's validation split: train pickle examples held out (at most a
# fifth of them), stratified on the task-1 label.
PADDLEREC_VALIDATION = 10000


# ---------------------------------------------------------------------------
# .npz files of splits.
# ---------------------------------------------------------------------------


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


def load_npz_splits(path: str, names=SPLITS) -> dict[str, Split]:
  """The splits ``names`` of an ``.npz`` written by ``save_npz``; the other
  splits' arrays are not read."""
  if not os.path.exists(path):
    raise DataError(f'{path}: missing; reinstall dselect_jax or rebuild it.')
  try:
    with np.load(path, allow_pickle=False) as f:
      return {name: _split(f, name) for name in names}
  except KeyError as e:
    raise DataError(
      f'{path}: incomplete ({e}); delete it and run again to rebuild.'
    ) from None
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(
      f'{path}: damaged ({e}); delete it and run again to rebuild.'
    ) from None


def _split(npz, name: str) -> Split:
  provenance = {
    key: npz[f'{name}_{key}']
    for key in multimnist.PROVENANCE_KEYS
    if f'{name}_{key}' in npz.files
  }
  return Split(npz[f'{name}_images'], npz[f'{name}_labels'], provenance or None)


# ---------------------------------------------------------------------------
# Built data sets, through the cache.
# ---------------------------------------------------------------------------


def cache_path(
  cache_dir: Optional[str],
  dataset: str,
  recipe: str,
  seed: int,
  num_validation: Optional[int],
) -> str:
  """Where the built splits of these arguments are cached."""
  blob = json.dumps(
    [
      multimnist.BUILD_VERSION,
      dataset,
      recipe,
      seed,
      num_validation,
      [sources.CHECKSUMS[s] for s in sorted(set(multimnist.SOURCES[dataset]))],
    ],
    sort_keys=True,
  )
  key = hashlib.sha256(blob.encode()).hexdigest()[:16]
  cache_dir = cache_dir or os.path.join(sources.default_cache_dir(), 'built')
  return os.path.join(cache_dir, f'{dataset}-{recipe}-seed{seed}-{key}.npz')


def load_built(
  dataset: str,
  recipe: str = 'comet',
  seed: int = 0,
  data_dir: Optional[str] = None,
  cache_dir: Optional[str] = None,
  download: bool = True,
  num_validation: Optional[int] = None,
  names=SPLITS,
) -> dict[str, Split]:
  """Splits of a built MultiMNIST-family set (``multimnist.build``), from
  the cache when it has them (only ``names`` read), else built from the raw
  files (all three returned) and cached; a damaged cache is rebuilt."""
  path = cache_path(cache_dir, dataset, recipe, seed, num_validation)
  if os.path.exists(path):
    try:
      return load_npz_splits(path, names)
    except DataError as e:  # Rebuilt below, and written over.
      logging.warning(
        'cached data set %s',
        str(e).replace('delete it and run again to rebuild', 'rebuilding it'),
      )
  splits = multimnist.build(
    dataset, recipe, seed, data_dir, download, num_validation
  )
  try:
    save_npz(path, splits_to_arrays(splits))
  except OSError:
    pass  # A read-only cache only costs a rebuild next time.
  return splits


# ---------------------------------------------------------------------------
# PaddleRec's MultiMNIST pickles.
# ---------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Admits the three NumPy names a pickled ndarray needs, nothing else.

  A pickle can name any callable and have it called while loading; refusing
  every other global means a malicious file runs nothing.
  """

  _core = getattr(np, '_core', None) or np.core
  ALLOWED = {
    ('numpy.core.multiarray', '_reconstruct'): _core.multiarray._reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _core.multiarray._reconstruct,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
  }

  def find_class(self, module, name):
    try:
      return self.ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
        f'refusing to load {module}.{name}: only NumPy arrays are allowed'
      ) from None


def read_paddlerec_pickle(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads PaddleRec's ``(x uint8 (N, 36, 36), y int (N, 2))`` pickle safely."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(
      f'{path}: cannot read ({e.strerror}); give the path of '
      "PaddleRec's train.pickle/test.pickle."
    ) from None
  try:
    obj = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
  except pickle.UnpicklingError as e:
    raise DataError(
      f'{path}: not a PaddleRec data pickle ({e}); nothing in it was run.'
    ) from None
  except Exception as e:  # Truncated or garbled pickles raise many types.
    raise DataError(
      f'{path}: unreadable pickle ({type(e).__name__}: {e}); '
      'fetch the file again.'
    ) from None
  if (
    not isinstance(obj, tuple)
    or len(obj) != 2
    or not all(isinstance(a, np.ndarray) for a in obj)
  ):
    raise DataError(
      f'{path}: expected a pickled tuple (x, y) of arrays, got '
      f'{type(obj).__name__}.'
    )
  x, y = obj
  if x.ndim != 3 or x.shape[1:] != (36, 36) or y.shape != (len(x), 2):
    raise DataError(
      f'{path}: expected x (N, 36, 36) and y (N, 2), got '
      f'{x.shape} and {y.shape}.'
    )
  return x.astype(np.uint8), y.astype(np.int32)


def load_paddlerec(
  paddlerec_dir: Optional[str], seed: int = 0, names=SPLITS
) -> dict[str, Split]:
  """The splits ``names`` of PaddleRec's ``train.pickle``/``test.pickle``:
  validation carved from train (stratified on the task-1 label), test from
  ``test.pickle`` alone."""
  if not paddlerec_dir:
    raise DataError(
      'data.name="paddlerec" needs data.paddlerec_dir, the '
      "folder holding PaddleRec's train.pickle and "
      'test.pickle.'
    )
  splits = {}
  if {'train', 'validation'} & set(names):
    train_x, train_y = read_paddlerec_pickle(
      os.path.join(paddlerec_dir, 'train.pickle')
    )
    keep, held = multimnist.stratified_split(
      train_y[:, 0],
      min(PADDLEREC_VALIDATION, len(train_x) // 5),
      np.random.default_rng(seed),
    )
    splits['train'] = Split(train_x[keep], train_y[keep])
    splits['validation'] = Split(train_x[held], train_y[held])
  if 'test' in names:
    splits['test'] = Split(
      *read_paddlerec_pickle(os.path.join(paddlerec_dir, 'test.pickle'))
    )
  return splits
