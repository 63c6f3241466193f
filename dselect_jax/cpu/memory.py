"""Keeping freed host memory in the process, for XLA:CPU's per-step buffers.

Each step of a jitted computation on XLA:CPU allocates its intermediate
buffers (hundreds of MB for the MultiMNIST experts' training step at batch
256) and frees them at the end. With glibc's defaults, blocks that large are
mapped fresh from the kernel and handed back when freed, or trimmed off the
heap, so the next step touches new pages again: 84,000 page faults per step.
``keep_freed_memory`` tells glibc's malloc to serve every block from one
heap and never hand freed memory back, so the step reuses the same pages
and faults in none (docs/performance.md says what it buys). The cost is
that the process keeps its peak memory until it exits.

It changes the allocator of the whole process, so the library never calls it
on import: ``train.py``, ``eval.py`` and ``experiments/grid.py`` call it
(``cli.setup_host_memory``) under their ``--keep_freed_memory`` flag (on by
default) before JAX starts its threads: threads that already allocated keep
their own arenas, which the setting no longer reaches. The same as
starting Python with ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=<large>``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = 2**31 - 1  # The largest trim threshold mallopt takes (an int).

_applied = False


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse; True if it did.

  One arena for all threads (M_ARENA_MAX 1), no block mapped on its own
  (M_MMAP_MAX 0), no trimming of the heap's top (M_TRIM_THRESHOLD at its
  largest). False where the C library is not glibc
  (macOS, musl), or if glibc refuses a setting (those before it stay).
  Calling it again does nothing more.
  """
  global _applied
  if _applied:
    return True
  if platform.system() != 'Linux':
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  settings = (
    (_M_ARENA_MAX, 1),
    (_M_MMAP_MAX, 0),
    (_M_TRIM_THRESHOLD, _NEVER),
  )
  _applied = all(mallopt(param, value) == 1 for param, value in settings)
  return _applied
