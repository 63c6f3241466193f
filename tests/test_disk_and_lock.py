"""A full disk and a second process: the run stops in one line, keeps every
complete checkpoint, and resumes once the cause is gone."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dselect_jax import checkpointing
from dselect_jax import trainer
from dselect_jax.datasets import batching
from tests import helpers


class _SmallDisk:
  """A 64 MiB file system: a tmpfs where this machine lets tests mount one
  (root with CAP_SYS_ADMIN), else a folder whose free space, as the run sees
  it through ``shutil.disk_usage``, is what ``fill`` leaves."""

  SIZE = 64 << 20

  def __init__(self, root, monkeypatch):
    self.path = str(root / 'disk')
    os.makedirs(self.path)
    self.tmpfs = (
      subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', f'size={self.SIZE}', 'tmpfs', self.path],
        capture_output=True,
        check=False,
      ).returncode
      == 0
    )
    self._taken = 0
    if not self.tmpfs:
      real = shutil.disk_usage

      def disk_usage(path):
        usage = real(path)
        if os.path.abspath(path).startswith(self.path):
          free = max(0, self.SIZE - _size(self.path) - self._taken)
          return usage._replace(total=self.SIZE, free=free)
        return usage

      monkeypatch.setattr(checkpointing.shutil, 'disk_usage', disk_usage)

  def fill(self, leave):
    """Takes all but ``leave`` bytes of the free space."""
    take = shutil.disk_usage(self.path).free - leave
    if self.tmpfs:
      with open(os.path.join(self.path, 'filler'), 'wb') as f:
        f.write(b'\0' * take)
    else:
      self._taken += take

  def free(self):
    if self.tmpfs:
      os.remove(os.path.join(self.path, 'filler'))
    self._taken = 0

  def close(self):
    if self.tmpfs:
      subprocess.run(['umount', '-l', self.path], check=False)


def _size(folder):
  return sum(
    os.path.getsize(os.path.join(d, f))
    for d, _, files in os.walk(folder)
    for f in files
  )


@contextlib.contextmanager
def _small_disk(tmp_path, monkeypatch):
  disk = _SmallDisk(tmp_path, monkeypatch)
  try:
    yield disk
  finally:
    disk.close()


def _fill_before_step(monkeypatch, disk, step, leave):
  """Fills ``disk`` up to ``leave`` free bytes while step ``step`` runs."""
  real = batching.train_batches

  def batches(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == step - 1:
        disk.fill(leave)
      yield batch

  monkeypatch.setattr(batching, 'train_batches', batches)


@pytest.mark.slow  # For the 5-minute default run.
def test_a_disk_that_fills_up_stops_the_run_and_loses_nothing(
  tmp_path, monkeypatch
):
  with _small_disk(tmp_path, monkeypatch) as disk:
    workdir = os.path.join(disk.path, 'w')
    with monkeypatch.context() as m:
      # Checkpoints at steps 3 and 6; 1 MiB is left while step 5 runs:
      # less than two checkpoints and the margin need.
      _fill_before_step(m, disk, 5, leave=1 << 20)
      with pytest.raises(checkpointing.NoSpaceError) as e:
        trainer.train_and_evaluate(helpers.tiny_config(), workdir)
    message = str(e.value)
    assert message.startswith(
      f'no space left for the train metrics of step 6 in {workdir} (1.0 MiB '
      'free, the run needs '
    )
    assert message.endswith(
      'the newest complete checkpoint is step 3. Free some space and run '
      'the same command to resume.'
    )
    assert '\n' not in message
    ckpts = checkpointing.Checkpoints(workdir, create=False)
    assert ckpts.all_steps() == [3] and ckpts.best_step() == 3
    kept = helpers.tree_digest(os.path.join(workdir, 'checkpoints', '3'))

    disk.free()
    metrics = trainer.train_and_evaluate(helpers.tiny_config(), workdir)
    ckpts = checkpointing.Checkpoints(workdir, create=False)
    assert ckpts.all_steps() == [3, 6]
    assert (
      helpers.tree_digest(os.path.join(workdir, 'checkpoints', '3')) == kept
    )
  # The resumed run ends where one that never stopped ends.
  whole = trainer.train_and_evaluate(
    helpers.tiny_config(), str(tmp_path / 'whole')
  )
  for key in ('step', 'accuracy_1', 'accuracy_2', 'loss_1', 'loss_2'):
    assert metrics[key] == whole[key], key


def test_a_disk_too_full_to_start_says_so_before_training(
  tmp_path, monkeypatch
):
  with _small_disk(tmp_path, monkeypatch) as disk:
    workdir = os.path.join(disk.path, 'w')
    disk.fill(leave=2 << 20)
    with pytest.raises(
      checkpointing.NoSpaceError,
      match=r'no space left for checkpoints in .*\(2\.0 MiB free, the run '
      r'needs .*\); no checkpoint was saved yet\.',
    ):
      trainer.train_and_evaluate(helpers.tiny_config(), workdir)
    assert not os.path.exists(os.path.join(workdir, 'checkpoints', '0'))


@pytest.mark.slow  # For the 5-minute default run.
def test_a_write_that_fails_for_lack_of_space_keeps_the_complete_ones(
  tmp_path, monkeypatch
):
  # The disk fills between the check and the write (another process): Orbax
  # fails inside its save, half-way through the step's folder.
  workdir = str(tmp_path / 'w')
  real = checkpointing.Checkpoints._save

  def save(self, manager, folder, step, state, metrics=None):
    if step < 6:
      return real(self, manager, folder, step, state, metrics)

    def failing_save(step, args, metrics=None):
      del args, metrics
      os.makedirs(
        os.path.join(self.workdir, folder, f'{step}.orbax-checkpoint-tmp')
      )
      raise ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file ".../_sharding": '
        'Failed to write 32311 bytes to file 8: No space left on device'
      )

    with monkeypatch.context() as m:
      m.setattr(manager, 'save', failing_save)
      return real(self, manager, folder, step, state, metrics)

  with monkeypatch.context() as m:
    m.setattr(checkpointing.Checkpoints, '_save', save)
    with pytest.raises(
      checkpointing.NoSpaceError,
      match=r'^no space left for checkpoint step 6 \(best\) in .* \(the file '
      r'system is full\); the newest complete checkpoint is step 3\.',
    ):
      trainer.train_and_evaluate(helpers.tiny_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'best'))) == ['3']
  trainer.train_and_evaluate(helpers.tiny_config(), workdir)
  assert checkpointing.Checkpoints(workdir, create=False).latest_step() == 6


def test_is_no_space_reads_the_cause_chain():
  try:
    try:
      raise OSError(28, 'No space left on device')
    except OSError as inner:
      raise RuntimeError('commit failed') from inner
  except RuntimeError as e:
    assert checkpointing.is_no_space(e)
  assert not checkpointing.is_no_space(ValueError('shape mismatch'))
  assert not checkpointing.is_no_space(OSError(13, 'Permission denied'))


_HOLD = textwrap.dedent(
  """
  import sys, time
  from dselect_jax import checkpointing
  lock = checkpointing.WorkdirLock(sys.argv[1])
  print('locked', flush=True)
  time.sleep(600)
  """
)


def test_the_lock_holds_across_processes_and_dies_with_its_owner(tmp_path):
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  owner = subprocess.Popen(
    [sys.executable, '-c', _HOLD, workdir],
    stdout=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  try:
    assert owner.stdout.readline().strip() == 'locked'
    with pytest.raises(
      checkpointing.CheckpointError,
      match=f'another training process \\(pid {owner.pid}\\) is using '
      f'workdir {workdir}; wait for it to finish or give another --workdir',
    ):
      checkpointing.WorkdirLock(workdir)
    # Killed without a chance to clean up: the lock file stays, with the
    # dead owner's pid in it, but the kernel has released the lock.
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=30)
  finally:
    if owner.poll() is None:
      owner.kill()
  with open(os.path.join(workdir, '.lock')) as f:
    assert f.read().strip() == str(owner.pid)
  start = time.monotonic()
  lock = checkpointing.WorkdirLock(workdir)
  assert time.monotonic() - start < 1
  lock.release()
