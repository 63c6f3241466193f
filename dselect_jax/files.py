"""Writing a file so that a crash never leaves half of it."""

from __future__ import annotations

import os
import tempfile


def write_atomically(path: str, data: str | bytes):
  """Writes ``data`` to ``path`` through a temporary file in the same folder,
  flushed to disk, then renamed over ``path``: readers (and a crash) see the
  old file or the whole new one, and no temporary file is left behind."""
  fd, tmp = tempfile.mkstemp(
    dir=os.path.dirname(path) or '.', prefix=os.path.basename(path) + '.'
  )
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
