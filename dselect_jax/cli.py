"""What train.py and eval.py share: flag parsing with one-line errors, and a
quieter console."""

import logging as std_logging
import sys

from absl import flags
from absl import logging


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
    else:
      message = str(e)
    sys.exit(f'error: bad flag: {" ".join(message.split())} (see --helpfull)')


def quiet_orbax():
  """Keeps Orbax's per-save INFO lines off the console (warnings stay)."""

  def keep(record):
    return (
      record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname
    )

  logging.get_absl_handler().python_handler.addFilter(keep)
