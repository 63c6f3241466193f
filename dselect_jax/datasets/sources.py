"""Raw data files: MNIST and Fashion-MNIST IDX files.

NumPy and the standard library only. Every file is checked against its
published SHA-256 before use; every problem is a :class:`DataError` whose
one-line message names the file, what is wrong and how to fix it.

Where the IDX files come from, first match wins:
  1. a directory passed in (the config's ``data.data_dir``);
  2. the environment variable ``DSELECT_DATA_DIR``;
  3. ``~/.cache/dselect_jax`` (or ``$XDG_CACHE_HOME/dselect_jax``).
Each holds ``mnist/`` and ``fashion_mnist/`` with the canonical file names
(``train-images-idx3-ubyte.gz``...). Files missing from a writable directory
are downloaded from the public mirrors, checked, and moved into place
atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tempfile
from typing import Optional
import urllib.error
import urllib.request
import zlib

import numpy as np

ENV_DATA_DIR = 'DSELECT_DATA_DIR'


class DataError(Exception):
  """A missing, damaged or unreadable data file. The message says the fix."""


# Published SHA-256 of the canonical .gz files (the same files whose md5s
# torchvision and the data sets' own pages publish).
CHECKSUMS = {
  'mnist': {
    'train-images-idx3-ubyte.gz': '440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609',
    'train-labels-idx1-ubyte.gz': '3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c',
    't10k-images-idx3-ubyte.gz': '8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6',
    't10k-labels-idx1-ubyte.gz': 'f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6',
  },
  'fashion_mnist': {
    'train-images-idx3-ubyte.gz': '3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84',
    'train-labels-idx1-ubyte.gz': 'a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845',
    't10k-images-idx3-ubyte.gz': '346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073',
    't10k-labels-idx1-ubyte.gz': '67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5',
  },
}

MIRRORS = {
  'mnist': [
    'https://ossci-datasets.s3.amazonaws.com/mnist/',
    'https://storage.googleapis.com/cvdf-datasets/mnist/',
  ],
  'fashion_mnist': [
    'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
  ],
}

SPLIT_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
SPLIT_SIZES = {'train': 60000, 'test': 10000}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def default_cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
    os.path.expanduser('~'), '.cache'
  )
  return os.path.join(base, 'dselect_jax')


def resolve_data_dir(data_dir: Optional[str] = None) -> str:
  """The folder holding ``mnist/`` and ``fashion_mnist/`` (see module doc)."""
  return os.path.abspath(
    os.path.expanduser(
      data_dir or os.environ.get(ENV_DATA_DIR) or default_cache_dir()
    )
  )


_DIGEST_NAMES = {'sha256': 'SHA-256', 'md5': 'MD5'}


def file_digest(path: str, algorithm: str = 'sha256') -> str:
  """The hex digest of a file, by ``hashlib`` algorithm name."""
  digest = hashlib.new(algorithm)
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def sha256(path: str) -> str:
  return file_digest(path, 'sha256')


def _where_to_put(source: str, folder: str) -> str:
  return (
    f'put the four canonical {source} .gz files in {folder} (or set '
    f'{ENV_DATA_DIR} / data.data_dir to a folder holding {source}/)'
  )


def download(
  url: str, dest: str, expected_digest: str, algorithm: str = 'sha256'
) -> None:
  """Downloads ``url`` to ``dest`` atomically, checking its SHA-256 (or the
  digest of ``algorithm``, for sources that publish another)."""
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix='.part')
  try:
    digest = hashlib.new(algorithm)
    with (
      os.fdopen(fd, 'wb') as out,
      urllib.request.urlopen(url, timeout=60) as r,
    ):
      total = int(r.headers.get('Content-Length') or 0)
      done = 0
      while block := r.read(1 << 16):
        out.write(block)
        digest.update(block)
        done += len(block)
        if total:
          print(
            f'\rdownloading {os.path.basename(dest)}: '
            f'{100 * done // total:3d}% of {total / 1e6:.1f} MB',
            end='',
            file=sys.stderr,
            flush=True,
          )
    print(file=sys.stderr)
    if digest.hexdigest() != expected_digest:
      raise DataError(
        f'{url}: downloaded file has {_DIGEST_NAMES.get(algorithm, algorithm)} '
        f'{digest.hexdigest()}, expected {expected_digest}; '
        'the mirror served something else, try again later.'
      )
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def fetch(
  source: str,
  filename: str,
  data_dir: Optional[str] = None,
  download_missing: bool = True,
) -> str:
  """Path of one checked canonical file, downloading it if it is missing."""
  if source not in CHECKSUMS:
    raise DataError(
      f'Unknown source {source!r}; choose one of {sorted(CHECKSUMS)}.'
    )
  folder = os.path.join(resolve_data_dir(data_dir), source)
  return fetch_checked(
    os.path.join(folder, filename),
    [mirror + filename for mirror in MIRRORS[source]],
    CHECKSUMS[source][filename],
    _where_to_put(source, folder),
    download_missing,
  )


def fetch_checked(
  path: str,
  urls: list[str],
  expected: str,
  where_to_put: str,
  download_missing: bool = True,
  algorithm: str = 'sha256',
) -> str:
  """``path`` once its digest is ``expected``; when it is missing, downloaded
  from the first of ``urls`` that serves it. Every failure is a DataError
  ending in ``where_to_put`` (how to supply the file by hand)."""
  if not os.path.exists(path):
    if not download_missing:
      raise DataError(f'{path}: missing; {where_to_put}.')
    errors = []
    for url in urls:
      try:
        download(url, path, expected, algorithm)
        break
      except (OSError, urllib.error.URLError, DataError) as e:
        errors.append(f'{url}: {e}')
    else:
      raise DataError(
        f'{path}: missing and could not be downloaded '
        f'({"; ".join(errors)}); {where_to_put}.'
      )
  if not os.path.isfile(path):
    raise DataError(
      f'{path}: a folder or other non-file is where this file belongs; '
      f'move it away, then {where_to_put}.'
    )
  try:
    actual = file_digest(path, algorithm)
  except OSError as e:
    raise DataError(
      f'{path}: cannot be read ({e.strerror or e}); {where_to_put}.'
    ) from None
  if actual != expected:
    raise DataError(
      f'{path}: {_DIGEST_NAMES.get(algorithm, algorithm)} is {actual}, '
      f'expected {expected} (truncated or not the canonical file); delete '
      f'it to download it again, or {where_to_put}.'
    )
  return path


def read_idx(path: str, magic: int, count: int) -> np.ndarray:
  """Reads a gzipped IDX file, checking its magic number and count."""
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(
      f'{path}: not a readable gzip file ({e}); delete it and '
      'fetch the canonical file again.'
    ) from None
  header_len = 16 if magic == IMAGE_MAGIC else 8
  header = np.frombuffer(data[:header_len], '>u4')
  if len(header) < header_len // 4 or header[0] != magic:
    found = header[0] if len(header) else 'nothing'
    raise DataError(
      f'{path}: IDX magic number is {found}, expected {magic} '
      f'({"images" if magic == IMAGE_MAGIC else "labels"}); '
      'the file is not what its name says.'
    )
  if header[1] != count:
    raise DataError(
      f'{path}: holds {header[1]} items, expected {count}; '
      'use the canonical file.'
    )
  shape = (count, 28, 28) if magic == IMAGE_MAGIC else (count,)
  if magic == IMAGE_MAGIC and tuple(header[2:]) != (28, 28):
    raise DataError(
      f'{path}: images are {tuple(header[2:])}, expected '
      '(28, 28); use the canonical file.'
    )
  body = np.frombuffer(data, np.uint8, offset=header_len)
  if body.size != np.prod(shape):
    raise DataError(
      f'{path}: {body.size} data bytes, expected '
      f'{np.prod(shape)} (truncated); use the canonical file.'
    )
  return body.reshape(shape)


def load_source(
  source: str,
  split: str,
  data_dir: Optional[str] = None,
  download_missing: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 (N, 28, 28), labels uint8 (N,))`` of MNIST or
  Fashion-MNIST's ``'train'`` or ``'test'`` split, checked."""
  images_file, labels_file = SPLIT_FILES[split]
  count = SPLIT_SIZES[split]
  images = read_idx(
    fetch(source, images_file, data_dir, download_missing), IMAGE_MAGIC, count
  )
  labels = read_idx(
    fetch(source, labels_file, data_dir, download_missing), LABEL_MAGIC, count
  )
  if labels.max() > 9:
    raise DataError(
      f'{source}/{labels_file}: label {labels.max()} outside '
      '0..9; use the canonical file.'
    )
  return images, labels
