"""run_info.json: the commit, the packages and the machine of each start."""

import json
import os
import subprocess

import jax
import pytest

from dselect_jax import provenance


def _git(repo, *args):
  return subprocess.run(
    ['git', '-C', str(repo), *args],
    check=True,
    capture_output=True,
    text=True,
    env=dict(
      os.environ,
      GIT_AUTHOR_NAME='t',
      GIT_AUTHOR_EMAIL='t@t',
      GIT_COMMITTER_NAME='t',
      GIT_COMMITTER_EMAIL='t@t',
    ),
  ).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
  """A git repository holding a package folder, one commit."""
  repo = tmp_path / 'repo'
  (repo / 'pkg').mkdir(parents=True)
  (repo / 'pkg' / '__init__.py').write_text('x = 1\n')
  _git(repo, 'init', '-q')
  _git(repo, 'add', '.')
  _git(repo, 'commit', '-q', '-m', 'one')
  return repo


def test_git_state_names_the_commit_and_whether_tracked_files_changed(
  checkout,
):
  head = _git(checkout, 'rev-parse', 'HEAD')
  assert len(head) == 40
  package = str(checkout / 'pkg')
  assert provenance.git_state(package) == {'commit': head, 'dirty': False}
  (checkout / 'scratch.txt').write_text('untracked\n')  # Not counted.
  assert provenance.git_state(package) == {'commit': head, 'dirty': False}
  (checkout / 'pkg' / '__init__.py').write_text('x = 2\n')
  assert provenance.git_state(package) == {'commit': head, 'dirty': True}


def test_a_package_outside_a_checkout_says_so(tmp_path, checkout):
  (tmp_path / 'plain' / 'pkg').mkdir(parents=True)
  assert provenance.git_state(str(tmp_path / 'plain' / 'pkg')) == {
    'commit': 'not a git checkout'
  }
  # Installed into a virtual environment that lives inside a checkout: the
  # checkout is not the package's source.
  site = checkout / '.venv' / 'lib' / 'site-packages' / 'pkg'
  site.mkdir(parents=True)
  assert provenance.git_state(str(site)) == {'commit': 'not a git checkout'}


def test_this_package_records_its_own_checkout():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(provenance.__file__)))
  state = provenance.git_state()
  if not os.path.isdir(os.path.join(repo, '.git')):
    assert state == {'commit': 'not a git checkout'}
  else:
    assert state['commit'] == _git(repo, 'rev-parse', 'HEAD')


def test_record_appends_one_start_each_time(tmp_path):
  first = provenance.record(str(tmp_path), 0)
  provenance.record(str(tmp_path), 120)
  starts = provenance.read(str(tmp_path))
  assert [s['start_step'] for s in starts] == [0, 120]
  assert starts[0] == json.loads(json.dumps(first))
  for key in ('start_time', 'git', 'backend', 'device_kind'):
    assert key in first
  assert first['device_count'] == jax.device_count() == 4  # conftest's.
  assert first['process_count'] == 1
  assert first['host_cpu_count'] == os.cpu_count()
  assert first['versions']['jax'] == jax.__version__
  assert set(first['versions']) == {
    'python',
    'jax',
    'jaxlib',
    'flax',
    'optax',
    'orbax-checkpoint',
    'numpy',
  }
  assert os.listdir(tmp_path) == ['run_info.json']  # No temporary left.


def test_a_damaged_run_info_is_kept_aside_and_replaced(tmp_path):
  path = tmp_path / 'run_info.json'
  path.write_text('{"starts": [{"start_st')  # Cut short.
  with pytest.raises(ValueError, match=r'run_info.json is damaged'):
    provenance.read(str(tmp_path))
  provenance.record(str(tmp_path), 7)
  assert (tmp_path / 'run_info.json.damaged').read_text() == (
    '{"starts": [{"start_st'
  )
  assert [s['start_step'] for s in provenance.read(str(tmp_path))] == [7]


def test_commits_lists_each_commit_once_in_order():
  starts = [
    {'git': {'commit': 'a' * 40, 'dirty': False}},
    {'git': {'commit': 'a' * 40, 'dirty': False}},
    {'git': {'commit': 'b' * 40, 'dirty': True}},
    {'git': {'commit': 'not a git checkout'}},
  ]
  assert provenance.commits(starts) == [
    'a' * 12,
    'b' * 12 + '+dirty',
    'not a git checkout',
  ]
  assert provenance.commits([]) == []
