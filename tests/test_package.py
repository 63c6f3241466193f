"""The built wheel holds every file the package needs.

A wheel is built from the checkout, installed into a fresh virtual
environment outside it, and the installed package trains a few steps of
the shipped sample with the CPU kernels built from its installed sources:
a file that setup.py's package_data leaves out (a header the kernels
include, the sample) fails here. Offline: the wheel is built without build
isolation, and the new environment borrows this one's dependencies through
a .pth file rather than downloading them.
"""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap

from conftest import REPO
import pytest


def _run(args, **kwargs):
  out = subprocess.run(
    args, capture_output=True, text=True, check=False, **kwargs
  )
  assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-3000:])
  return out


@pytest.mark.slow
def test_the_installed_wheel_builds_its_kernels_and_trains(
  tmp_path, cpu_kernels_built
):
  # From a copy of the source, so the build's folders stay out of the
  # checkout (and no stale build/ feeds the wheel).
  src = tmp_path / 'src'
  shutil.copytree(
    REPO,
    src,
    ignore=shutil.ignore_patterns(
      '.git', '.venv', 'build', 'dist', '*.egg-info', '__pycache__', 'results'
    ),
  )
  dist = tmp_path / 'dist'
  _run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '--no-deps',
      '--no-build-isolation',
      '--no-index',
      '-w',
      str(dist),
      str(src),
    ],
    cwd=tmp_path,
  )
  (wheel,) = dist.glob('dselect_jax-*.whl')

  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', str(venv)])
  python = str(venv / 'bin' / 'python')
  purelib = _run(
    [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))']
  ).stdout.strip()
  # This environment's packages (jax, flax, ...), after the new one's own.
  here = [sysconfig.get_path('purelib')] + site.getsitepackages()
  with open(os.path.join(purelib, 'borrowed.pth'), 'w') as f:
    f.write('\n'.join(dict.fromkeys(here)) + '\n')
  _run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', str(wheel)])

  script = textwrap.dedent(
    f"""
    import json, os
    import dselect_jax
    from dselect_jax.cpu import kernels
    assert dselect_jax.__file__.startswith({purelib!r}), dselect_jax.__file__
    assert kernels.available(), kernels.build_failure()
    assert kernels.load().startswith({str(tmp_path / 'kernels')!r})
    from configs import multimnist_sample
    from dselect_jax import factory, provenance, trainer
    config = multimnist_sample.get_config()
    config.num_train_steps = 2
    config.batch_size = 32
    config.model.num_experts = 2
    config.model.gate.k = 1
    config.model.conv = 'kernel'  # The direct kernels, whatever 'auto' says.
    assert factory.norm_impl(config) == 'kernel'
    result = trainer.train_and_evaluate(config, 'workdir')
    assert result['step'] == 2, result
    (start,) = provenance.read('workdir')
    print(json.dumps(start['git']))
    """
  )
  env = dict(
    os.environ,
    DSELECT_JAX_KERNEL_CACHE=str(tmp_path / 'kernels'),
    PYTHONPATH='',
  )
  out = _run([python, '-c', script], cwd=tmp_path, env=env)
  # Installed from a wheel: no checkout to name.
  assert out.stdout.strip().splitlines()[-1] == (
    '{"commit": "not a git checkout"}'
  )
