"""Orbax checkpoints of a run: the latest few for resuming, the best apart.

``workdir/checkpoints/<step>``: periodic saves, ``max_to_keep`` newest kept;
training resumes from the newest. ``workdir/best/<step>``: the one checkpoint
with the highest validation ``selection_score`` (the mean accuracy, or minus
the summed task losses; ``evaluate.Evaluator``), used for the final test.
Both use Orbax's ``CheckpointManager`` with ``ocp.args.StandardSave`` /
``StandardRestore`` into the structure the config defines. Before reading
arrays, a restore compares the checkpoint's tree metadata with that structure,
so a checkpoint of another config is refused with the names of the arrays
that differ (and Orbax starts no reads it would then abandon).

Multi-host, every process calls save and restore with the same state; it is
saved as arrays replicated over every process's devices (written once, by
process 0) and restored as host-local arrays again, so checkpoints move
freely between single- and multi-host runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging as py_logging
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Optional
import warnings

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

BEST_METRIC = 'selection_score'


class CheckpointError(Exception):
  """A checkpoint is missing or does not fit the model. Says what there is."""


class NoSpaceError(CheckpointError):
  """The workdir's file system is (nearly) full. The run stopped before a
  write it could not finish; every complete checkpoint is intact."""


# Room kept free beside the checkpoints: metrics, event files, the log.
SPACE_MARGIN = 4 << 20


class WorkdirLock:
  """An exclusive lock on a workdir, held while a training process runs.

  ``flock`` on ``workdir/.lock``: the kernel releases it when the process
  ends, however it ends, so a killed run never leaves a stale lock.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, '.lock')
    self._file = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      owner = self._file.read().strip() or 'unknown'
      self._file.close()
      raise CheckpointError(
        f'another training process (pid {owner}) is using workdir '
        f'{workdir}; wait for it to finish or give another --workdir.'
      ) from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()

  def release(self):
    if not self._file.closed:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()


class Checkpoints:
  """The two checkpoint managers of a workdir."""

  def __init__(
    self,
    workdir: str,
    max_to_keep: int = 2,
    create: bool = True,
    state_bytes: int = 0,
  ):
    """``state_bytes``: the size of one train state; every write of the run
    first checks that two checkpoints of it (a new one is complete before
    the oldest is deleted, and the best may be saved at the same step) and
    ``SPACE_MARGIN`` still fit (:meth:`check_space`)."""
    self.workdir = os.path.abspath(workdir)
    self.reserve_bytes = 2 * state_bytes + SPACE_MARGIN
    _silence_abandoned_reads()  # Before any read: see there.
    # Orbax writes each checkpoint to a *.orbax-checkpoint-tmp folder and
    # renames it when complete; a training process (create=True) removes the
    # half-written folders a killed run left behind.
    # The handlers are registered up front so that the tree's metadata can
    # be read before anything was saved or restored in this process.
    # Multi-host, the processes meet at barriers named after the step: the
    # two managers, which may save the same step at once, name theirs apart.
    policies = ocp.checkpoint_managers
    _check_best_scores(os.path.join(self.workdir, 'best'))
    self._latest = ocp.CheckpointManager(
      os.path.join(self.workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(
        preservation_policy=policies.LatestN(max_to_keep),
        create=create,
        cleanup_tmp_directories=create,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix='latest'
        ),
      ),
      handler_registry=_registry(),
    )
    # best_fn beside BestN: best_step() ranks the saved steps with it. A
    # best checkpoint saved without the score (by an older version, under
    # another name) ranks below every scored one instead of failing.
    best_fn = lambda metrics: metrics.get(BEST_METRIC, -math.inf)  # noqa: E731
    self._best = ocp.CheckpointManager(
      os.path.join(self.workdir, 'best'),
      options=ocp.CheckpointManagerOptions(
        preservation_policy=policies.BestN(get_metric_fn=best_fn, n=1),
        best_fn=best_fn,
        best_mode='max',
        create=create,
        cleanup_tmp_directories=create,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix='best'
        ),
      ),
      handler_registry=_registry(),
    )

  def latest_step(self) -> Optional[int]:
    return self._latest.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._latest.all_steps())

  def best_step(self) -> Optional[int]:
    return self._best.best_step()

  def check_space(self, what: str):
    """Raises :class:`NoSpaceError` before writing ``what`` when the
    workdir's file system has less than ``reserve_bytes`` free."""
    free = shutil.disk_usage(self.workdir).free
    if jax.process_count() > 1:
      # One decision for all processes, which meet at the save's barriers:
      # process 0's reading, in MiB (float32 survives JAX's 32-bit default).
      free = 2**20 * float(
        multihost_utils.broadcast_one_to_all(np.float32(free / 2**20))
      )
    if free < self.reserve_bytes:
      raise NoSpaceError(
        self._no_space_message(
          what,
          f'{free / 2**20:.1f} MiB free, the run needs '
          f'{self.reserve_bytes / 2**20:.1f} MiB',
        )
      )

  def _no_space_message(self, what: str, detail: str) -> str:
    newest = self.latest_step()
    kept = (
      'no checkpoint was saved yet'
      if newest is None
      else f'the newest complete checkpoint is step {newest}'
    )
    return (
      f'no space left for {what} in {self.workdir} ({detail}); {kept}. '
      'Free some space and run the same command to resume.'
    )

  def save(self, step: int, state: Any):
    """Saves ``state`` as periodic checkpoint ``step`` and waits until it
    is complete on disk."""
    self._save(self._latest, 'checkpoints', step, state)

  def save_best(self, step: int, state: Any, metric: float):
    self._save(
      self._best, 'best', step, state, metrics={BEST_METRIC: float(metric)}
    )

  def _save(self, manager, folder, step, state, metrics=None):
    what = f'checkpoint step {step}' + (' (best)' if folder == 'best' else '')
    self.check_space(what)
    held = _HeldRecords()
    try:
      with held.holding():
        manager.save(
          step, args=ocp.args.StandardSave(_to_global(state)), metrics=metrics
        )
        manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not is_no_space(e):
        held.emit()
        raise
      # The disk filled up under the check (another process writing): drop
      # the half-written folder, keep every complete one.
      if jax.process_index() == 0:
        for name in os.listdir(os.path.join(self.workdir, folder)):
          if name.startswith(f'{step}.orbax-checkpoint-tmp'):
            shutil.rmtree(
              os.path.join(self.workdir, folder, name), ignore_errors=True
            )
      manager.reload()
      raise NoSpaceError(
        self._no_space_message(what, 'the file system is full')
      ) from None
    held.emit()

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """The periodic checkpoint at ``step`` (default: newest)."""
    return self._restore(
      self._latest,
      abstract_state,
      self.latest_step() if step is None else step,
      'periodic',
    )

  def restore_latest_good(self, abstract_state: Any) -> tuple[int, Any]:
    """The newest periodic checkpoint that restores, as ``(step, state)``.

    Newer ones that fail (a truncated or missing file) are moved to
    ``workdir/damaged/<step>`` with a warning naming them, once an older one
    has restored. When none restores, nothing is moved and the newest one's
    error is raised: that is a checkpoint that does not fit this config.
    A checkpoint whose arrays differ from this config's is not read at all.
    """
    steps = sorted(self._latest.all_steps(), reverse=True)
    failed = []
    for step in steps:
      try:
        state = self._restore(
          self._latest, abstract_state, step, 'periodic', strict=True
        )
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, e))
        continue
      for bad_step, error in failed:
        logging.warning(
          'periodic checkpoint %d in %s is damaged (%s); moved it to '
          'damaged/%d and resumed from step %d.',
          bad_step,
          self.workdir,
          restore_failure(error, 200),
          bad_step,
          step,
        )
        self._quarantine(bad_step)
      return step, state
    step, error = failed[0]
    if isinstance(error, CheckpointError):  # Another config's: says which.
      raise error
    raise CheckpointError(
      f'none of the periodic checkpoints {steps} in {self.workdir} can be '
      'restored into the model of this config (made with another config, '
      f'or all damaged); newest, step {step}: {restore_failure(error)}'
    )

  def _quarantine(self, step: int):
    self._move_aside(self._latest, 'checkpoints', step, 'damaged')

  def _move_aside(self, manager, folder: str, step: int, dest: str):
    """Moves ``folder/<step>`` to ``dest/<step>`` (kept, never deleted)."""
    if jax.process_index() == 0:
      target = os.path.join(self.workdir, dest, str(step))
      if os.path.exists(target):
        shutil.rmtree(target)  # An older copy of the same step, set aside.
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.workdir, folder, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moved {folder} {step} to {dest}')
    manager.reload()

  def set_aside_foreign_best(self, start_step: int, abstract_state: Any):
    """Keeps ``best/`` to this run: a best checkpoint from after
    ``start_step`` (of a run that went further and was then reset, or of
    another run in this workdir when this one starts from scratch), or of
    another config, is moved to ``workdir/previous_best/<step>`` with a
    warning, so the final test never evaluates another run's model."""
    for step in list(self._best.all_steps()):
      why = None
      if step > start_step:
        why = (
          f'it is from step {step}, after the step {start_step} this run '
          'starts from'
        )
      else:
        mismatch = _mismatch(self._best, step, abstract_state)
        if mismatch:
          why = f'it was made with another config ({mismatch})'
      if why:
        logging.warning(
          "best checkpoint %d in %s is not this run's: %s; "
          'moved it to previous_best/%d.',
          step,
          self.workdir,
          why,
          step,
        )
        self._move_aside(self._best, 'best', step, 'previous_best')

  def restore_best(self, abstract_state: Any) -> Any:
    return self._restore(self._best, abstract_state, self.best_step(), 'best')

  def _restore(self, manager, abstract_state, step, kind, strict=False):
    steps = list(manager.all_steps())
    if step is None and kind == 'best':
      periodic = self.all_steps()
      hint = (
        f'give --step=N for a periodic one (steps {periodic})'
        if periodic
        else 'train first'
      )
      raise CheckpointError(
        f'{self.workdir} holds no best checkpoint (none was saved: no '
        f'validation split, or the run stopped before its first '
        f'validation); {hint}.'
      )
    if step is None or step not in steps:
      raise CheckpointError(
        f'no {kind} checkpoint at step {step} in {self.workdir}; its {kind} '
        f'checkpoints are at steps {steps or "none"}.'
      )
    mismatch = _mismatch(manager, step, abstract_state)
    if mismatch:
      raise CheckpointError(
        f'{kind} checkpoint {step} in {self.workdir} cannot be restored into '
        f'the model of this config (made with another config): {mismatch}; '
        'train this config in another --workdir, or pass the config the '
        'checkpoint was made with.'
      )
    try:
      return _to_local(
        manager.restore(
          step, args=ocp.args.StandardRestore(_restore_target(abstract_state))
        )
      )
    except Exception as e:  # pylint: disable=broad-except
      if strict:
        raise
      raise CheckpointError(
        f'{kind} checkpoint {step} in {self.workdir} cannot be restored into '
        f'the model of this config (damaged, or made with another config): '
        f'{restore_failure(e)}'
      ) from None

  def wait(self):
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self):
    self._latest.close()
    self._best.close()


PARAMS_DIR = 'params'


def save_params(workdir: str, step: int, state: Any):
  """A params-only copy of ``state`` (parameters and BatchNorm statistics,
  no optimizer state) in ``workdir/params/<step>``: what evaluation needs,
  small enough to ship with the results."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(
      os.path.join(os.path.abspath(workdir), PARAMS_DIR, str(step)),
      {'params': state.params, 'batch_stats': state.batch_stats},
    )


def params_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, PARAMS_DIR)
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def restore_params(workdir: str, step: int, abstract_state: Any) -> Any:
  """A state with the params and BatchNorm statistics of
  ``workdir/params/<step>``, for evaluation (its optimizer state is zeros)."""
  path = os.path.join(os.path.abspath(workdir), PARAMS_DIR, str(step))
  target = _restore_target(
    {'params': abstract_state.params, 'batch_stats': abstract_state.batch_stats}
  )
  _silence_abandoned_reads()
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, target)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
      f'params checkpoint {path} cannot be restored into the model of '
      f'this config (damaged, or made with another config): '
      f'{restore_failure(e)}'
    ) from None
  # Nothing to resume from: a zero optimizer state, for evaluation only.
  zeros = jax.tree.map(
    lambda x: np.zeros(x.shape, x.dtype), abstract_state.opt_state
  )
  return abstract_state.replace(
    step=np.array(step, np.int32),
    params=restored['params'],
    batch_stats=restored['batch_stats'],
    opt_state=zeros,
  )


# What a workdir holds: folders, and files.
LAYOUT_FOLDERS = ('checkpoints', 'best', PARAMS_DIR, 'tensorboard')
LAYOUT_FILES = (
  'config.json',
  'metrics.jsonl',
  'run_info.json',
  'test_metrics.json',
  '.lock',
)


def check_layout(workdir: str):
  """A CheckpointError, before any work, where something in ``workdir``
  has another kind than the run reads or writes there (a file where a
  folder belongs, or the other way round)."""
  for names, want, is_kind in (
    (LAYOUT_FOLDERS, 'a folder', os.path.isdir),
    (LAYOUT_FILES, 'a file', os.path.isfile),
  ):
    for name in names:
      path = os.path.join(workdir, name)
      if os.path.lexists(path) and not is_kind(path):
        raise CheckpointError(
          f'{path} is not {want}, which the run keeps there; move it out '
          'of the workdir, or give another --workdir.'
        )


def unwritable(folder: str, keep: bool = True) -> Optional[str]:
  """Why ``folder`` (created when missing) cannot be written, or None: a file
  is written and removed there, as a read-only or full file system or a
  missing permission would stop it. ``keep=False`` removes again the
  folders the check made, for a caller that writes only at its end."""
  made, parent = [], os.path.abspath(folder)
  while not os.path.exists(parent):
    made.append(parent)
    parent = os.path.dirname(parent)
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix='.write_check'):
      pass
  except OSError as e:
    return e.strerror or str(e)
  finally:
    if not keep:
      for path in made:  # Deepest first; each is empty.
        with contextlib.suppress(OSError):
          os.rmdir(path)
  return None


def is_no_space(error: BaseException) -> bool:
  """Whether ``error`` (or one it came from) is a full file system: an
  ``OSError`` ENOSPC, or TensorStore's RESOURCE_EXHAUSTED as Orbax raises it."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (
      errno.ENOSPC,
      errno.EDQUOT,
    ):
      return True
    text = str(error)
    if 'No space left' in text or 'RESOURCE_EXHAUSTED' in text:
      return True
    error = error.__cause__ or error.__context__
  return False


class _HeldRecords(py_logging.Filter):
  """Holds back Orbax's error records while a save runs: on a full disk its
  background threads log every failed write with a traceback."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record):
    if record.levelno >= py_logging.ERROR and 'orbax' in record.pathname:
      self.records.append(record)
      return False
    return True

  @contextlib.contextmanager
  def holding(self):
    logger = py_logging.getLogger('absl')
    logger.addFilter(self)
    try:
      yield
    finally:
      logger.removeFilter(self)

  def emit(self):
    """Logs the held records after all: unless the disk was full (which the
    run's own error then says in one line), they may tell something."""
    logger = py_logging.getLogger('absl')
    for record in self.records:
      logger.handle(record)
    self.records = []


def reason(error: BaseException, limit: int = 300) -> str:
  """An exception as one line that is never empty (an AssertionError from
  deep inside a library has no message: its type and place then)."""
  text = ' '.join(str(error).split())
  if not text:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    where = (
      f' in {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}'
      if tb is not None
      else ''
    )
    text = f'{type(error).__name__}{where}'
  return text[:limit]


# TensorStore's read errors: which array's chunk, in which file, and why.
_READ_ERROR = re.compile(
  r'([A-Z_]+): (?:Error opening "[^"]+" driver: )*Error reading "([^"]+)" '
  r'in OCDBT database at local file "([^"]+)": (.*)'
)


def restore_failure(error: BaseException, limit: int = 300) -> str:
  """Why a checkpoint did not restore, in words: the array whose data
  could not be read and what was wrong with its file, found in the chain of
  causes (Orbax's own message holds a TensorStore object's repr instead)."""
  chain, seen = [], error
  while seen is not None and len(chain) < 10:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for e in chain:
    found = _READ_ERROR.search(' '.join(str(e).split()))
    if found:
      code, key, folder, why = found.groups()
      array, _, chunk = key.rpartition('/')
      part = 'metadata' if chunk.startswith('.z') else 'data'
      why = why.rstrip('.')
      why = why if len(why) <= 160 else why[:157] + '...'
      return (
        f'the {part} of array {array or key} cannot be read: a file of the '
        f'checkpoint in {folder} is cut short or damaged ({code}: {why})'
      )
  text = reason(error, 10 * limit)
  return text.split(' See full TensorStore details')[0][:limit]


def _silence_abandoned_reads():
  """Drops the late callbacks of reads that a failed restore abandoned.

  When one array of a checkpoint fails to read, Orbax's restore returns
  while TensorStore still completes the other reads; their callbacks reach
  an event loop that Orbax has closed, and each prints a RuntimeError
  ('Event loop is closed') through ``sys.unraisablehook``, a few or
  thousands, at any time up to exit, starting before the error reaches the
  caller; the read coroutines of other arrays of the same damaged file
  report their own errors when they are dropped. Their results are not
  wanted, so once checkpoints are opened the hook drops exactly those: the
  closed loop's error raised with no object, and errors of Orbax's
  coroutines; asyncio's log of futures whose read error nobody retrieved
  is filtered too, and the warning that Orbax's array-metadata read
  (``Store._get_array_metadatas``) was never awaited, which interpreter
  shutdown sometimes prints. Anything else still goes where it went.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_abandoned_reads', False):
    return

  def hook(unraisable):
    closed_loop = (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == 'Event loop is closed'
      and unraisable.object is None
    )
    code = getattr(unraisable.object, 'cr_code', None)  # A coroutine's.
    orbax_read = code is not None and (
      os.sep + 'orbax' + os.sep in code.co_filename
    )
    if not (closed_loop or orbax_read):
      previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook
  warnings.filterwarnings(
    'ignore',
    message=r"coroutine 'Store\._get_array_metadatas' was never awaited",
    category=RuntimeWarning,
  )
  py_logging.getLogger('asyncio').addFilter(_abandoned_read_logs)


def _abandoned_read_logs(record: py_logging.LogRecord) -> bool:
  """False for asyncio's reports of a failed read's future that nobody
  awaited (the other arrays of a damaged checkpoint; see
  ``_silence_abandoned_reads``)."""
  text = record.getMessage()
  return not (
    text.split('\n', 1)[0].endswith('exception was never retrieved')
    and ('in OCDBT database' in text or 'while reading array' in text)
  )


def _replicated() -> jax.sharding.NamedSharding:
  """Replicated over every device of every process."""
  return jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(jax.devices()), ('all',)),
    jax.sharding.PartitionSpec(),
  )


def _to_global(state: Any) -> Any:
  """Multi-host, ``state`` (the same host-local arrays on every process) as
  global arrays replicated over all devices: Orbax refuses host-local arrays
  there, as it cannot tell which process should write them."""
  if jax.process_count() == 1:
    return state
  return multihost_utils.host_local_array_to_global_array(
    state, _replicated().mesh, jax.sharding.PartitionSpec()
  )


def _restore_target(abstract_state: Any) -> Any:
  """``abstract_state`` with the placement to restore to: this process's
  first device single-host, replicated over all devices multi-host. Named
  explicitly, so that a checkpoint saved on another number of processes
  restores (Orbax would otherwise place it as it was saved)."""
  sharding = (
    _replicated()
    if jax.process_count() > 1
    else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  )
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
    abstract_state,
  )


def _check_best_scores(folder: str):
  """A CheckpointError naming the file where a best checkpoint's saved score
  (``<step>/metrics/metrics``, which Orbax reads when it opens the folder)
  is not the JSON it wrote."""
  if not os.path.isdir(folder):
    return
  for step in sorted(os.listdir(folder)):
    path = os.path.join(folder, step, 'metrics', 'metrics')
    if not step.isdigit() or not os.path.lexists(path):
      continue
    try:
      with open(path, encoding='utf-8') as f:
        ok = isinstance(json.load(f), dict)
      why = None if ok else 'not a JSON object'
    except (OSError, ValueError) as e:
      why = getattr(e, 'strerror', None) or str(e).splitlines()[0]
    if why:
      raise CheckpointError(
        f'{path}: the score of best checkpoint {step} cannot be read '
        f'({why}); move {os.path.join(folder, step)} out of the workdir '
        '(training resumes from the periodic checkpoints, and eval.py '
        '--step=N evaluates one of them).'
      )


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """The state as one item, saved and restored by Orbax's standard handler
  (the layout Orbax calls its default item)."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add('default', args, ocp.StandardCheckpointHandler)
  return registry


def _to_local(state: Any) -> Any:
  """Multi-host, this process's copy of each replicated array (numpy)."""
  if jax.process_count() == 1:
    return state
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)


def _mismatch(manager, step: int, abstract_state: Any) -> Optional[str]:
  """How the arrays saved at ``step`` differ from ``abstract_state`` (names,
  shapes, dtypes), or None when they match or the metadata cannot be read
  (a damaged checkpoint: the restore itself then says what is wrong)."""
  try:
    stored = manager.metadata(step).item_metadata.tree
  except Exception:  # pylint: disable=broad-except
    return None
  have = ocp.tree.to_flat_dict(stored, sep='/')
  # Flattened directly: serialize_tree fails on optimizer states with empty
  # nodes (optax's EmptyState, as adamw and clipping chains hold).
  want = ocp.tree.to_flat_dict(abstract_state, sep='/')

  def order(names):  # Parameters first: they name the modules that differ.
    return sorted(names, key=lambda n: (not n.startswith('params/'), n))

  problems = []
  for what, names in (
    ('this config has', order(want.keys() - have.keys())),
    ('only the checkpoint has', order(have.keys() - want.keys())),
  ):
    if names:
      shown = ', '.join(repr(n) for n in names[:3])
      more = f' and {len(names) - 3} more' if len(names) > 3 else ''
      problems.append(f'{what} {shown}{more}')
  for name in order(want.keys() & have.keys()):
    w, h = want[name], have[name]
    h_dtype = str(getattr(h, 'dtype', '') or '')
    h_shape = list(getattr(h, 'shape', ()))
    if h_shape != list(w.shape) or (h_dtype and h_dtype != str(w.dtype)):
      problems.append(
        f'{name!r} is {h_dtype}{h_shape} in the checkpoint, '
        f'{w.dtype}{list(w.shape)} here'
      )
      break
  return '; '.join(problems) or None
