"""What train.py and eval.py share: flag parsing with one-line errors, the
host allocator's setting, and a quieter console."""

import logging as std_logging
import os
import sys

from absl import flags
from absl import logging

from dselect_jax.cpu import memory

_KEEP_FREED_MEMORY = flags.DEFINE_bool(
  'keep_freed_memory',
  True,
  "Keep freed host memory in the process for reuse (glibc's malloc: one "
  'arena, no per-block mappings, no trimming), so that each jitted step '
  'reuses the pages of the last instead of faulting in new ones '
  '(docs/performance.md says what it buys); the process keeps its peak '
  'memory until it exits. No effect without glibc.',
)


def setup_host_memory():
  """Applies --keep_freed_memory; call it before JAX computes anything (the
  allocator's arenas are fixed for threads that already allocated)."""
  if not _KEEP_FREED_MEMORY.value:
    return
  if memory.keep_freed_memory():
    logging.info('--keep_freed_memory: freed host memory stays for reuse.')
  else:
    logging.info('--keep_freed_memory: not glibc; the allocator is unchanged.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with any error, a mistyped config override
  included, as one line on stderr and exit status 2 instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # A mistyped override is an AttributeError wrapping a KeyError whose
    # str() is a repr; its first argument is the readable text.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    if isinstance(e, KeyError) and e.args:
      message = f'no such config field {e.args[0]}'
    elif _config_arg(argv) and not isinstance(e, flags.Error):
      sys.exit(config_load_error(_config_arg(argv), e))
    else:
      message = str(e)
    sys.exit(f'error: bad flag: {" ".join(message.split())} (see --helpfull)')
  except Exception as e:  # pylint: disable=broad-except
    # The config file itself: missing, a folder, a syntax error, or its
    # get_config() raised.
    sys.exit(config_load_error(_config_arg(argv) or '?', e))


def _config_arg(argv: list[str]) -> str | None:
  for arg in argv[1:]:
    if arg.startswith('--config='):
      return arg[len('--config=') :]
  return None


def config_load_error(path: str, error: BaseException) -> str:
  """One line for a config file that cannot be loaded, and why."""
  while isinstance(error, OSError) and not isinstance(
    error, (FileNotFoundError, IsADirectoryError)
  ):
    inner = error.__cause__ or error.__context__
    if inner is None:
      break
    error = inner
  text = ' '.join(str(error).split())
  if not os.path.exists(path):
    text = 'no such file'
  elif isinstance(error, SyntaxError):
    text = f'a syntax error at line {error.lineno}: {error.msg}'
  elif isinstance(error, FileNotFoundError):
    text = 'no such file'
  elif isinstance(error, IsADirectoryError):
    text = 'a directory, not a config file'
  else:
    text = f'{type(error).__name__}: {text}'
  return (
    f'error: --config={path} cannot be loaded: {text}; give a config file '
    'such as configs/multimnist.py.'
  )


def quiet_orbax():
  """Keeps Orbax's per-save INFO lines off the console (warnings stay)."""

  def keep(record):
    return (
      record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname
    )

  logging.get_absl_handler().python_handler.addFilter(keep)
