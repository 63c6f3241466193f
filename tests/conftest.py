"""Shared fixtures. Tests never touch the network.

The default tests make the data they need: ``synthetic_mnist`` writes
MNIST-format IDX files, the trainer's tests use the sample shipped in the
package, the MovieLens tests write MovieLens-format files. The tests of
facts about the real files (their canonical SHA-256s, PaddleRec's sample
reproduced pixel by pixel, the full builders) take ``data_dir``: the real
files from ``$DSELECT_DATA_DIR`` or the ``shared/data`` folder beside the
checkout, and are skipped, with the reason in pytest's summary, where
neither holds them.
"""

import atexit
import gzip
import hashlib
import os
import shutil
import struct
import sys
import tempfile

# Four fake CPU devices for every test, so the data-parallel paths run; set
# before JAX initializes its backend. Single-device runs use devices[:1].
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
)

# One XLA compilation cache for the whole session, shared with the train.py
# subprocesses some tests start (they inherit the environment): the many short
# runs of the same tiny config compile once instead of once each. Compiled
# programs are the same either way; the folder is removed at exit.
_CACHE = tempfile.mkdtemp(prefix='dselect_jax_xla_cache_')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# Likewise one folder for the CPU kernels (dselect_jax/cpu), built once per
# session: tests that point XDG_CACHE_HOME elsewhere (for the data caches)
# would otherwise rebuild them.
os.environ.setdefault(
  'DSELECT_JAX_KERNEL_CACHE', os.path.join(_CACHE, 'kernels')
)

import numpy as np  # noqa: E402
import pytest  # noqa: E402  (after XLA_FLAGS is set)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data')
# The configs/ folder is imported as a package, as train.py does.
sys.path.insert(0, REPO)


# What the real-data tests read, under the data folder.
REAL_DATA = ('mnist', 'fashion_mnist', 'paddlerec_sample')


@pytest.fixture(scope='session')
def data_dir():
  """The folder of the real raw files; the test is skipped without them."""
  path = os.environ.get('DSELECT_DATA_DIR') or SHARED_DATA
  missing = [d for d in REAL_DATA if not os.path.isdir(os.path.join(path, d))]
  if missing:
    pytest.skip(
      f'needs the real data files ({", ".join(d + "/" for d in missing)} not in '
      f'{path}); set '
      'DSELECT_DATA_DIR to a folder holding mnist/, fashion_mnist/ and '
      'paddlerec_sample/ to run it'
    )
  return path


@pytest.fixture(scope='session')
def cpu_kernels_built():
  """The hand-written CPU kernels, built; the test is skipped, with the
  compiler's complaint as the reason, where they do not build (no C++
  compiler: they are optional, and everything else runs on XLA's ops)."""
  from dselect_jax.cpu import kernels  # pylint: disable=g-import-not-at-top

  if not kernels.available():
    reason = (kernels.build_failure() or 'not the CPU backend').splitlines()[0]
    pytest.skip(f'needs the CPU kernels, which do not build here: {reason}')


def assert_png(path, width: int, height: int):
  """``path`` decodes as a ``width`` x ``height`` PNG with something drawn:
  over 2% of its pixels differ from the most common colour (the
  background), in at least 3 colours."""
  import matplotlib.image  # pylint: disable=g-import-not-at-top

  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n', path
  image = matplotlib.image.imread(path)  # (H, W, channels), floats in [0, 1]
  assert image.shape[:2] == (height, width), (path, image.shape)
  pixels = image.reshape(-1, image.shape[-1])
  colours, counts = np.unique(pixels, axis=0, return_counts=True)
  drawn = 1 - counts.max() / len(pixels)
  assert drawn > 0.02 and len(colours) >= 3, (path, drawn, len(colours))


def write_idx(path, array: np.ndarray):
  """Writes a uint8 array as a gzipped IDX file, as MNIST's are laid out:
  a big-endian header (magic 2051 for (N, 28, 28) images, 2049 for (N,)
  labels; then N, and rows and columns for images), then the bytes."""
  array = np.asarray(array, np.uint8)
  magic = 2051 if array.ndim == 3 else 2049
  header = struct.pack(f'>{1 + array.ndim}I', magic, *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


@pytest.fixture
def synthetic_mnist(tmp_path):
  """``tmp_path/mnist/`` with MNIST's four file names holding 300 train and
  100 test random digits; returns the folder, the arrays by split and each
  file's SHA-256 (computed here, with hashlib)."""
  rng = np.random.default_rng(0)
  folder = tmp_path / 'mnist'
  folder.mkdir()
  arrays, digests = {}, {}
  for split, n, images_file, labels_file in (
    ('train', 300, 'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    ('test', 100, 't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
  ):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    write_idx(folder / images_file, images)
    write_idx(folder / labels_file, labels)
    arrays[split] = (images, labels)
    for name in (images_file, labels_file):
      digests[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
  return {'dir': folder, 'arrays': arrays, 'sha256': digests}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Opening any URL but file:// fails as it would on a machine offline."""
  import urllib.error  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top

  real = urllib.request.urlopen

  def guarded(url, *args, **kwargs):
    target = url if isinstance(url, str) else url.full_url
    if not target.startswith('file:'):
      raise urllib.error.URLError(f'network disabled in tests: {target}')
    return real(url, *args, **kwargs)

  monkeypatch.setattr(urllib.request, 'urlopen', guarded)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """(workdir, test result) of a finished run of ``helpers.tiny_config()``,
  trained once for the whole session: the first pytest-xdist worker to get
  here trains it under a lock, the others wait and reuse it. Tests read it
  and must not change it (copy it first: the bad-input tests check that
  nothing in it changed)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  from dselect_jax import trainer  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # Shared by the workers.
  workdir = root / 'tiny_run'
  with open(root / 'tiny_run.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / 'test_metrics.json').exists():
      shutil.rmtree(workdir, ignore_errors=True)  # A half-made one.
      trainer.train_and_evaluate(helpers.tiny_config(), str(workdir))
  with open(workdir / 'test_metrics.json') as f:
    return str(workdir), json.load(f)
