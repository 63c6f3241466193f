"""What a run ran on: the code's commit, the packages, the machine.

``train.py`` appends one record to ``WORKDIR/run_info.json`` each time it
starts in a workdir (a fresh run, then every resume), so a result that was
trained over several sessions names every commit that trained it:

  {"starts": [{"start_time": ..., "start_step": 0,
               "git": {"commit": <40 hex digits>, "dirty": false},
               "versions": {"python": ..., "jax": ..., "jaxlib": ...,
                            "flax": ..., "optax": ...,
                            "orbax-checkpoint": ..., "numpy": ...},
               "backend": "cpu", "device_kind": ..., "device_count": ...,
               "local_device_count": ..., "process_count": ...,
               "host_cpu_count": ..., "platform": ...},
              ...]}

The commit is that of the checkout the ``dselect_jax`` package was imported
from; an installed package (a wheel, a copy) is ``"not a git checkout"``.
``dirty`` is true when tracked files differ from that commit (untracked
files are not counted: results folders and scratch files would always be).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from typing import Any, Optional

import jax

from dselect_jax import files

FILENAME = 'run_info.json'
NOT_A_CHECKOUT = 'not a git checkout'
# The distributions whose versions decide what a run computes.
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy')


def git_state(package_dir: Optional[str] = None) -> dict[str, Any]:
  """``{'commit': sha, 'dirty': bool}`` of the checkout holding the package,
  or ``{'commit': 'not a git checkout'}`` when it is not in one (an
  installed wheel, a copy, git missing)."""
  package_dir = os.path.realpath(
    package_dir or os.path.dirname(os.path.abspath(__file__))
  )
  repo = os.path.dirname(package_dir)

  def git(*args):
    return subprocess.run(
      ['git', '-C', repo, *args],
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    ).stdout.strip()

  try:
    top = git('rev-parse', '--show-toplevel')
    # A wheel installed into a virtual environment that lives inside some
    # checkout is not that checkout's code.
    if os.path.realpath(top) != repo:
      return {'commit': NOT_A_CHECKOUT}
    commit = git('rev-parse', 'HEAD')
    changed = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return {'commit': NOT_A_CHECKOUT}
  return {'commit': commit, 'dirty': bool(changed)}


def _version(name: str) -> Optional[str]:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def collect(start_step: int = 0) -> dict[str, Any]:
  """This process's record: code, package versions, devices, time."""
  versions = {'python': platform.python_version()}
  versions.update({name: _version(name) for name in PACKAGES})
  return {
    'start_time': datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'
    ),
    'start_step': start_step,
    'git': git_state(),
    'versions': versions,
    'backend': jax.default_backend(),
    'device_kind': jax.devices()[0].device_kind,
    'device_count': jax.device_count(),
    'local_device_count': jax.local_device_count(),
    'process_count': jax.process_count(),
    'host_cpu_count': os.cpu_count(),
    'platform': platform.platform(),
  }


def read(path: str) -> list[dict[str, Any]]:
  """The records of a ``run_info.json`` (file or the folder holding it);
  ``[]`` when there is none. Raises ``ValueError`` naming the file when it
  is damaged."""
  if os.path.isdir(path):
    path = os.path.join(path, FILENAME)
  if not os.path.exists(path):
    return []
  try:
    with open(path, encoding='utf-8') as f:
      starts = json.load(f)['starts']
    if not isinstance(starts, list):
      raise TypeError('starts is not a list')
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f'{path} is damaged ({type(e).__name__}: {e}); delete it or restore '
      'it from a copy.'
    ) from None
  return starts


def record(workdir: str, start_step: int) -> dict[str, Any]:
  """Appends this process's record to ``workdir/run_info.json``, written to
  a temporary file and renamed, so a crash leaves the old file or the new
  one. A damaged file is replaced, keeping it as ``run_info.json.damaged``.
  Returns the record."""
  path = os.path.join(workdir, FILENAME)
  try:
    starts = read(path)
  except ValueError:
    os.replace(path, path + '.damaged')
    starts = []
  entry = collect(start_step)
  files.write_atomically(
    path, json.dumps({'starts': starts + [entry]}, indent=2) + '\n'
  )
  return entry


def commits(starts: list[dict[str, Any]]) -> list[str]:
  """The distinct commits of a run's records, in order, each short
  (12 hex digits) with ``+dirty`` when the tree had changes."""
  out = []
  for start in starts:
    git = start.get('git', {})
    commit = git.get('commit', NOT_A_CHECKOUT)
    if commit != NOT_A_CHECKOUT:
      commit = commit[:12] + ('+dirty' if git.get('dirty') else '')
    if commit not in out:
      out.append(commit)
  return out
