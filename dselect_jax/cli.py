"""What the command-line tools share: flag parsing with one-line errors,
``run`` (absl's app.run whose bad input ends in one line), flag checks, the
host allocator's setting, and a quieter console."""

from collections.abc import Callable, Sequence
import logging as std_logging
import os
import sys

from absl import app
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


def input_errors() -> tuple[type[BaseException], ...]:
  """The errors that mean bad input, whose message names the problem and
  the fix: a bad config value, missing or damaged data, a damaged workdir
  or checkpoint, a stopped run."""
  # pylint: disable=g-import-not-at-top
  from dselect_jax import checkpointing
  from dselect_jax import config_schema
  from dselect_jax import trainer
  from dselect_jax.datasets import sources

  return (
    config_schema.ConfigError,
    sources.DataError,
    checkpointing.CheckpointError,
    trainer.TrainingError,
    UsageError,
  )


class UsageError(Exception):
  """A tool's own check of its flags or paths failed; the message says how
  to call it instead."""


def run(main: Callable[[list[str]], object]):
  """absl's ``app.run(main)`` for a tool: flag errors as one line and exit
  status 1 (``parse_flags``), bad input (``input_errors``) as one line and
  exit status 1, Ctrl-C as one line and exit status 130."""

  def guarded(argv):
    try:
      return main(argv)
    except input_errors() as e:
      sys.exit(f'error: {" ".join(str(e).split())}')
    except KeyboardInterrupt:
      print('interrupted (Ctrl-C).', file=sys.stderr)
      sys.exit(130)

  app.run(guarded, flags_parser=parse_flags)


def positive_ints(name: str, values: Sequence[str], minimum: int = 1):
  """A list flag's values as integers >= ``minimum``, or a UsageError
  naming the flag."""
  try:
    numbers = [int(v) for v in values]
  except ValueError:
    numbers = None
  if not values or numbers is None or min(numbers) < minimum:
    raise UsageError(
      f'--{name}={",".join(values)}: give integers >= {minimum}, separated '
      'by commas.'
    )
  return numbers


def output_file(name: str, path: str | None) -> str | None:
  """Checks before any work that ``path`` (a file flag's value) can be
  written: its folder exists or can be made, and it is not a folder."""
  if path is None:
    return None
  if os.path.isdir(path):
    raise UsageError(f'--{name}={path} is a folder; give a file path.')
  _check_writable_below(name, path, os.path.dirname(os.path.abspath(path)))
  return path


def output_folder(name: str, path: str) -> str:
  """Checks before any work that ``path`` (a folder flag's value) is a
  folder or can be made one."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f'--{name}={path} is a file; give a folder.')
  _check_writable_below(name, path, os.path.abspath(path))
  return path


def _check_writable_below(name: str, path: str, folder: str):
  """The nearest existing folder at or above ``folder`` is writable."""
  parent = folder
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise UsageError(
      f'--{name}={path}: {parent} is not a writable folder; give a path '
      'under one.'
    )


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with any error, a mistyped config override
  included, as one line on stderr and exit status 1 instead of a traceback."""
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
