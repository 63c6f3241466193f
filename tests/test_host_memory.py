"""cpu.memory.keep_freed_memory: freed memory is reused, not faulted in anew.

Checked in fresh processes (it changes the allocator of the whole process):
a 64 MiB block is malloc'ed, filled and freed, then malloc'ed and filled
again. glibc maps a block that large on its own and unmaps it when freed, so
each fill faults its 16,384 pages of 4 KiB in again; with freed memory kept,
the second block is the first one's memory and faults (almost) none.
"""

import platform
import subprocess
import sys

SCRIPT = """
import ctypes, resource, sys
from dselect_jax.cpu import memory
if sys.argv[1] == 'keep':
  assert memory.keep_freed_memory() and memory.keep_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
def fill_and_free(size=1 << 26):  # 64 MiB
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
fill_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (1 << 26) // 4096


def faults(mode: str) -> int:
  out = subprocess.run(
    [sys.executable, '-c', SCRIPT, mode],
    capture_output=True,
    text=True,
    check=True,
  )
  return int(out.stdout.split()[-1])


def test_kept_memory_is_reused_without_page_faults():
  if platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc':
    assert faults('default') > PAGES // 2
    assert faults('keep') < PAGES // 50
  else:  # Not glibc's malloc: nothing to set, and it says so.
    from dselect_jax.cpu import memory  # pylint: disable=g-import-not-at-top

    assert not memory.keep_freed_memory()
