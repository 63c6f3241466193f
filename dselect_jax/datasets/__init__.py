"""Data sets, each resolved once from a config's ``data`` fields.

``resolve(config.data)`` is the one place that turns a config into a data
set: a ``Dataset`` whose spec (tasks, inputs) is known at once and whose
splits are read on first use, so evaluating a checkpoint reads the test
split only. Everything else is handed the ``Dataset`` or its spec.

Modules, one job each:
  spec.py        ``DataSpec``: a data set's tasks and inputs.
  sources.py     raw MNIST and Fashion-MNIST IDX files: checksums, download.
  multimnist.py  MultiMNIST composites built from them: the recipes, fresh
                 train composites per epoch.
  stored.py      MultiMNIST sets kept in files: the cache of built sets, the
                 shipped sample, PaddleRec's pickles.
  movielens.py   MovieLens-100K: the watch and rating tasks.
  batching.py    batches of any split over the local devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from dselect_jax.datasets import movielens
from dselect_jax.datasets import multimnist
from dselect_jax.datasets import stored
from dselect_jax.datasets.sources import DataError
from dselect_jax.datasets.spec import DataSpec

SPLITS = stored.SPLITS
# Every data set a config may name: the MultiMNIST family built from the raw
# files, the stored MultiMNIST sets, and MovieLens.
STORED = ('multi_mnist_sample', 'paddlerec')
NAMES = tuple(sorted(multimnist.SOURCES)) + STORED + ('movielens',)

__all__ = ['DataError', 'DataSpec', 'Dataset', 'NAMES', 'SPLITS', 'resolve']


class Dataset:
  """A config's data set: ``name``, ``spec``, and the splits ``train``,
  ``validation`` and ``test``, each read when first asked for and kept.

  ``load(names)`` returns at least the splits ``names`` (it may return
  more, when reading one means reading them all); ``fresh(train)`` makes
  the per-epoch train splits of a built data set.
  """

  def __init__(
    self,
    name: str,
    spec: DataSpec,
    load: Callable[[tuple[str, ...]], dict[str, Any]],
    fresh: Optional[Callable[[Any], Callable[[int], Any]]] = None,
  ):
    self.name = name
    self.spec = spec
    self._load = load
    self._fresh = fresh
    self._splits = {}

  def split(self, name: str):
    if name not in SPLITS:
      raise ValueError(f'split {name!r}: choose one of {list(SPLITS)}.')
    if name not in self._splits:
      self._splits.update(self._load((name,)))
    return self._splits[name]

  @property
  def train(self):
    return self.split('train')

  @property
  def validation(self):
    return self.split('validation')

  @property
  def test(self):
    return self.split('test')

  def fresh_train(self) -> Callable[[int], Any]:
    """Epoch e's train split, re-drawn for every epoch
    (``multimnist.FreshTrainSplits``); built data sets only."""
    if self._fresh is None:
      raise DataError(
        f'fresh train composites need a data set built from the raw files; '
        f'{self.name!r} is stored as it is (set data.fresh_train=False).'
      )
    return self._fresh(self.train)


def resolve(data) -> Dataset:
  """The ``Dataset`` of a config's ``data`` fields (``configs/default.py``
  documents them). Reads nothing: splits are read on first use."""
  name = data.name
  data_dir = data.data_dir or None
  if name == 'movielens':
    negatives = data.negatives
    return Dataset(
      name,
      movielens.spec(),
      lambda names: movielens.load(
        data.seed, negatives, data_dir, data.download
      ),
    )
  if name == 'multi_mnist_sample':
    return Dataset(
      name,
      multimnist.spec(fresh_train=False),
      lambda names: stored.load_npz_splits(stored.SAMPLE_FILE, names),
    )
  if name == 'paddlerec':
    return Dataset(
      name,
      multimnist.spec(fresh_train=False),
      lambda names: stored.load_paddlerec(
        data.paddlerec_dir or None, data.seed, names
      ),
    )
  if name not in multimnist.SOURCES:
    raise DataError(f'config.data.name={name!r}: choose one of {list(NAMES)}.')
  num_validation = data.num_validation
  num_validation = None if num_validation < 0 else num_validation
  return Dataset(
    name,
    multimnist.spec(),
    lambda names: stored.load_built(
      name,
      data.recipe,
      data.seed,
      data_dir,
      download=data.download,
      num_validation=num_validation,
      names=names,
    ),
    lambda train: multimnist.FreshTrainSplits(
      name, data.recipe, data.seed, train, data_dir, data.download
    ),
  )
