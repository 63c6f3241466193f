"""Shared fixtures. Tests never touch the network: the raw files come from the
shared data folder beside the checkout (or $DSELECT_DATA_DIR)."""

import atexit
import os
import shutil
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

import pytest  # noqa: E402  (after XLA_FLAGS is set)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data')
# The configs/ folder is imported as a package, as train.py does.
sys.path.insert(0, REPO)


@pytest.fixture(scope='session')
def data_dir():
  path = os.environ.get('DSELECT_DATA_DIR') or SHARED_DATA
  if not os.path.isdir(os.path.join(path, 'mnist')):
    raise RuntimeError(
      f'The tests read the canonical MNIST files from {path}/mnist; set '
      'DSELECT_DATA_DIR to a folder holding mnist/ and fashion_mnist/.'
    )
  return path


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
