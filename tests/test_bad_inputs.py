"""Bad input through the real commands: one line, no traceback, nothing lost.

Each case runs train.py or eval.py in a subprocess against a workdir that
already holds a finished run, and checks: a non-zero exit, a last stderr
line that names the problem, no Python traceback, and every file of the
workdir byte-identical afterwards.
"""

import ast
import os
import re
import shutil
import subprocess
import sys

from conftest import write_idx
import jax
import numpy as np
import pytest

from dselect_jax import checkpointing
from dselect_jax import config_schema
from dselect_jax import datasets
from dselect_jax import evaluate
from dselect_jax import experts
from dselect_jax import factory
from dselect_jax import trainer
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = 'configs/multimnist_sample.py'


@pytest.fixture
def finished_run(tiny_run):
  """The session's finished tiny run (conftest.tiny_run): read only."""
  return tiny_run[0]


@pytest.fixture(scope='module')
def bad_data(tmp_path_factory):
  """Folders of MNIST-format files that are not the canonical ones (a few
  random digits, written here): one with the train images missing, one
  whole. The train images are the first file read, so each case fails on
  them."""
  root = tmp_path_factory.mktemp('bad_data')
  rng = np.random.default_rng(0)
  dirs = {}
  for case in ('missing_file', 'not_canonical'):
    dest = root / case / 'mnist'
    dest.mkdir(parents=True)
    for split, n in (('train', 60), ('t10k', 10)):
      write_idx(
        dest / f'{split}-images-idx3-ubyte.gz',
        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
      )
      write_idx(
        dest / f'{split}-labels-idx1-ubyte.gz',
        rng.integers(0, 10, n, dtype=np.uint8),
      )
    if case == 'missing_file':
      (dest / 'train-images-idx3-ubyte.gz').unlink()
    dirs[case] = str(root / case)
  dirs['no_such_dir'] = str(root / 'nowhere')
  return dirs


def _data(case):
  return [
    '--config.data.name=multi_mnist',
    f'--config.data.data_dir={{{case}}}',
    '--config.data.download=False',
  ]


# (script, arguments, the text or texts the one-line error must contain).
# '{workdir}' is the finished run; '{<case>}' a bad data folder.
CASES = {
  'k zero': ('train', ['--config.model.gate.k=0'], 'model.gate.k=0'),
  'k above experts': (
    'train',
    ['--config.model.gate.k=9'],
    'model.gate.k=9: must satisfy 1 <= k',
  ),
  'gamma zero': (
    'train',
    ['--config.model.gate.gamma=0.0'],
    'model.gate.gamma=0.0: must be > 0',
  ),
  'gamma negative': (
    'train',
    ['--config.model.gate.gamma=-1.0'],
    'model.gate.gamma=-1.0',
  ),
  'learning rate zero': (
    'train',
    ['--config.optimizer.learning_rate=0.0'],
    'learning_rate=0.0: must be > 0',
  ),
  'learning rate negative': (
    'train',
    ['--config.optimizer.learning_rate=-0.1'],
    'learning_rate=-0.1',
  ),
  'batch not divisible': (
    'train',
    ['--config.batch_size=126'],
    'batch_size=126: must be a positive multiple of the 4 devices',
  ),
  'one expert': (
    'train',
    ['--config.model.num_experts=1'],
    'model.num_experts=1',
  ),
  'unknown gate': (
    'train',
    ['--config.model.gate.name=switch'],
    "model.gate.name='switch': choose one of",
  ),
  'unknown dataset': (
    'train',
    ['--config.data.name=cifar10'],
    "data.name='cifar10'",
  ),
  'unknown recipe': (
    'train',
    ['--config.data.recipe=sener'],
    "data.recipe='sener'",
  ),
  'unknown optimizer': (
    'train',
    ['--config.optimizer.name=lamb'],
    "optimizer.name='lamb'",
  ),
  'unknown schedule': (
    'train',
    ['--config.schedule.name=step'],
    "schedule.name='step'",
  ),
  'mistyped override': (
    'train',
    ['--config.optimizer.learning_rte=0.1'],
    "no such config field 'learning_rte'",
  ),
  'override of wrong type': (
    'train',
    ['--config.model.gate.k=two'],
    'invalid literal',
  ),
  'unknown norm': (
    'train',
    ['--config.model.norm=fast'],
    "model.norm='fast': choose one of",
  ),
  'kernel norm without a compiler': (
    'train',
    ['--config.model.norm=kernel'],
    "model.norm='kernel': the CPU kernels do not build here: no C++ compiler",
  ),
  'data dir missing': ('train', _data('no_such_dir'), 'missing; put the'),
  'data file missing': (
    'train',
    _data('missing_file'),
    'train-images-idx3-ubyte.gz: missing',
  ),
  # The published SHA-256 of MNIST's train images.
  'data file not the canonical one': (
    'train',
    _data('not_canonical'),
    (
      'train-images-idx3-ubyte.gz: SHA-256 is',
      'expected 440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609',
    ),
  ),
  'no config flag': ('train', None, '--config must have a value'),
  'cluster flags without multihost': (
    'train',
    ['--num_processes=2'],
    'are for --multihost; add it',
  ),
  'multihost without a cluster': (
    'train',
    ['--multihost'],
    'give --coordinator_address',
  ),
  'process id out of range': (
    'train',
    [
      '--multihost',
      '--num_processes=2',
      '--process_id=2',
      '--coordinator_address=localhost:1',
    ],
    'process_id < num_processes',
  ),
  'no workdir flag': ('train', ['--workdir='], 'workdir'),
  'eval missing workdir': (
    'eval',
    ['--workdir={workdir}/nothing'],
    'does not exist',
  ),
  'eval empty workdir': ('eval', ['--workdir={empty}'], 'holds no config.json'),
  'eval step that does not exist': (
    'eval',
    ['--workdir={workdir}', '--step=5'],
    'its periodic checkpoints are at steps [3, 6]',
  ),
  'eval step and best': (
    'eval',
    ['--workdir={workdir}', '--step=3', '--best'],
    'not both',
  ),
  'export onto a file': (
    'scripts/export_params',
    ['--workdir={workdir}', '--out={workdir}/config.json'],
    'config.json is a file; give a folder',
  ),
  'export under a file': (
    'scripts/export_params',
    ['--workdir={workdir}', '--out={workdir}/config.json/params'],
    'config.json is not a writable folder; give a path under one',
  ),
}

# Environment variables a case adds.
ENV = {'kernel norm without a compiler': {'CXX': 'no-such-compiler'}}


# Bad config values: checked in-process against config_schema.validate,
# which train.py calls before anything else ('k zero' also runs the real
# command, for the one-line exit).
_PARSE_ERRORS = ('mistyped override', 'override of wrong type')
CONFIG_CASES = {
  name: case
  for name, case in CASES.items()
  if case[0] == 'train'
  and case[1]
  and len(case[1]) == 1
  and case[1][0].startswith('--config.')
  and name not in _PARSE_ERRORS + ('kernel norm without a compiler',)
}
for _name in CONFIG_CASES:
  if _name != 'k zero':
    del CASES[_name]


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


@pytest.mark.parametrize('name', sorted(CONFIG_CASES))
def test_bad_config_value(name):
  from configs import multimnist_sample  # pylint: disable=g-import-not-at-top

  _, [arg], expected = CONFIG_CASES[name]
  field, value = arg[len('--config.') :].split('=', 1)
  config = multimnist_sample.get_config()
  *path, last = field.split('.')
  section = config
  for key in path:
    section = section[key]
  with config.unlocked():
    section[last] = _literal(value)
  with pytest.raises(config_schema.ConfigError) as error:
    helpers.validate(config, jax.device_count())
  message = f'error: {error.value}'
  assert '\n' not in message and expected in message, message


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_input(name, finished_run, bad_data, tmp_path):
  script, args, expected = CASES[name]
  fields = dict(bad_data, workdir=finished_run, empty=str(tmp_path))
  if script == 'train':
    argv = [f'--config={SAMPLE}', f'--workdir={finished_run}']
    if args is None:  # No --config at all.
      argv = [f'--workdir={finished_run}']
    elif args == ['--workdir=']:
      argv = [f'--config={SAMPLE}']
      expected = '--workdir must have a value'
    else:
      argv += args
  else:
    argv = args
  argv = [a.format(**fields) for a in argv]
  before = helpers.tree_digest(finished_run)
  # A private cache: built data cached by other runs must not hide bad files.
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=4',
    XDG_CACHE_HOME=str(tmp_path / 'cache'),
    **ENV.get(name, {}),
  )
  out = subprocess.run(
    [sys.executable, f'{script}.py', *argv],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
    check=False,
  )
  assert out.returncode != 0
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), last
  for text in expected if isinstance(expected, tuple) else (expected,):
    assert text in last, last
  assert helpers.tree_digest(finished_run) == before


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'afile'
  path.write_text('keep me')
  out = subprocess.run(
    [sys.executable, 'train.py', f'--config={SAMPLE}', f'--workdir={path}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert (
    out.stderr.strip()
    .splitlines()[-1]
    .startswith(f'error: --workdir={path} is a file')
  )
  assert path.read_text() == 'keep me'


def test_eval_stops_at_once_when_it_cannot_save(finished_run):
  """A workdir eval.py cannot write (read-only, full): one line names the
  folder and the way out, before anything is evaluated."""
  out_dir = os.path.join(finished_run, 'eval')
  inject = (
    'import errno, os, runpy, sys\n'
    'real = os.makedirs\n'
    'def makedirs(path, *a, **k):\n'
    f'  if os.path.abspath(path) == {out_dir!r}:\n'
    '    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)\n'
    '  return real(path, *a, **k)\n'
    'os.makedirs = makedirs\n'
    f'sys.argv = ["eval.py", "--workdir={finished_run}"]\n'
    'runpy.run_path("eval.py", run_name="__main__")\n'
  )
  before = helpers.tree_digest(finished_run)
  out = subprocess.run(
    [sys.executable, '-c', inject],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert 'accuracy' not in out.stdout  # Stopped before evaluating.
  assert out.stderr.strip().splitlines()[-1] == (
    f'error: cannot write the output folder {out_dir}: Read-only file '
    'system; give --out_dir=DIR on a writable file system.'
  )
  assert helpers.tree_digest(finished_run) == before


# ---------------------------------------------------------------------------
# The Python API: values that would give NaN or fail deep inside Flax.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('gamma', [float('inf'), float('nan'), -1.0])
def test_gate_gamma_must_be_finite_and_positive(gamma):
  from dselect_jax import gates  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match=r'gamma must be a finite number > 0'):
    gates.DSelectKGate(num_experts=4, k=2, gamma=gamma)


@pytest.mark.parametrize(
  'shape,match',
  [
    ((2, 12, 12, 1), r'12x12 pixels do not fit.*at least 16'),
    ((2, 18, 36, 1), r'18x36 pixels do not fit.*multiples of 4'),
    (
      (2, 36, 36),
      r'shape \(B, H, W, C\); got shape \(2, 36, 36\) \(add the '
      r'channel axis',
    ),
    ((0, 36, 36, 1), r'the batch is empty'),
  ],
)
def test_model_input_is_checked(shape, match):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dselect_jax import models  # pylint: disable=g-import-not-at-top

  model = models.MultiTaskMoE(num_experts=2, gate='softmax')
  with pytest.raises(ValueError, match=match):
    model.init(jax.random.key(0), jnp.zeros(shape), train=False)


def test_the_smallest_images_the_expert_takes():
  """16x16 is the smallest canvas: 16 -> 12 -> 6 -> 2 -> 1 (by hand)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  variables = experts.MultiMNISTExpert().init(
    jax.random.key(0), jnp.zeros((2, 16, 16, 1)), train=False
  )
  assert variables['params']['Dense_0']['kernel'].shape == (1 * 1 * 20, 50)


@pytest.mark.parametrize(
  'weights,match',
  [
    (
      {'w_logits': [[0.0]]},
      r"no 'z_logits' in the TF weights \(keys: "
      r"\['w_logits'\]\)",
    ),
    (
      {
        'z_logits': {'kernel': [[0.0]]},
        'w_logits': {'kernel': [[0.0]], 'bias': [0.0]},
      },
      r"'z_logits' must hold a Dense layer's 'kernel' and 'bias', got "
      r"\['kernel'\]",
    ),
  ],
)
def test_params_from_tf_names_what_is_missing(weights, match):
  from dselect_jax import gates  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match=match):
    gates.params_from_tf(weights)


@pytest.mark.parametrize(
  'case,expected',
  [
    ('missing', 'cannot be loaded: no such file'),
    ('folder', 'cannot be loaded: a directory, not a config file'),
    ('syntax', 'cannot be loaded: a syntax error at line 2: '),
    ('raises', "cannot be loaded: RuntimeError: no 'data' section"),
  ],
)
def test_bad_config_file(case, expected, finished_run, tmp_path):
  path = tmp_path / 'config.py'
  if case == 'folder':
    path.mkdir()
  elif case == 'syntax':
    path.write_text('def get_config():\n  return {\n')
  elif case == 'raises':
    path.write_text(
      'def get_config():\n  raise RuntimeError("no \'data\' section")\n'
    )
  before = helpers.tree_digest(finished_run)
  out = subprocess.run(
    [
      sys.executable,
      'train.py',
      f'--config={path}',
      f'--workdir={finished_run}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: --config={path} ') and expected in last, last
  assert helpers.tree_digest(finished_run) == before


def test_batch_larger_than_the_training_set(tmp_path):

  config = helpers.tiny_config(batch_size=8000)
  with pytest.raises(
    config_schema.ConfigError,
    match=r'config.batch_size=8000: larger than the 4000 training examples '
    r"of 'multi_mnist_sample'; lower it",
  ):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'config.json')  # Nothing written.


def test_an_unwritable_workdir_stops_before_training(tmp_path, monkeypatch):
  """Root ignores permissions here, so the read-only file system is
  injected where the check writes."""
  import errno  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  def read_only(*args, **kwargs):
    del args, kwargs
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(tempfile, 'NamedTemporaryFile', read_only)
  loaded = []
  monkeypatch.setattr(
    datasets.Dataset, 'split', lambda self, name: loaded.append(name)
  )
  with pytest.raises(
    trainer.checkpointing.CheckpointError,
    match=rf'cannot write the workdir {tmp_path}/w: Read-only file system; '
    'give a --workdir on a writable',
  ):
    trainer.train_and_evaluate(helpers.tiny_config(), str(tmp_path / 'w'))
  assert not loaded  # Stopped before reading any data.


def _invalid_values(spec, default):
  """Values a field's spec must refuse."""
  if isinstance(spec, config_schema.OneOf):
    return ['bogus', 7]
  if isinstance(spec, config_schema.Number):
    bad = [float('nan'), 'two', True]
    if spec.low > float('-inf'):
      bad.append(spec.low - 1)
    if spec.high < float('inf'):
      bad.append(spec.high + 1)
    if spec.integer:
      bad.append(1.5)
    return bad
  return [3]  # Text fields take strings only.


@pytest.mark.slow  # For the 5-minute default run.
def test_fuzz_every_field():
  """Random combinations of valid and invalid values of every field: each
  config is refused with a one-line ConfigError that names a field it
  changed, or it builds a model whose train step traces (no arrays run)."""
  import copy  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  import random  # pylint: disable=g-import-not-at-top

  from dselect_jax import steps  # pylint: disable=g-import-not-at-top

  base = helpers.tiny_config()
  fields = config_schema.flat_fields(base)
  rng = random.Random(0)
  outcomes = {'refused': 0, 'traced': 0}
  for _ in range(40):
    config = copy.deepcopy(base)
    changed = {}
    for field in rng.sample(sorted(fields), 3):
      spec = config_schema.FIELDS[field]
      valid = list(spec.values(fields[field]))
      invalid = _invalid_values(spec, fields[field])
      changed[field] = rng.choice(invalid if rng.random() < 0.2 else valid)
    for field, value in changed.items():
      *path, last = field.split('.')
      section = config
      for key in path:
        section = section[key]
      with config.unlocked():
        # Bypass the ConfigDict's own type check: a config file can hold
        # any value, and config_schema.validate must catch it.
        section._fields[last] = value  # pylint: disable=protected-access
    try:
      helpers.validate(config, jax.device_count())
    except config_schema.ConfigError as e:
      message = str(e)
      assert '\n' not in message
      assert any(f'config.{f}' in message for f in changed), (changed, e)
      outcomes['refused'] += 1
      continue
    model = helpers.create_model(config, bn_axis_name=steps.AXIS)
    tx = factory.create_optimizer(config, 10)
    state = helpers.abstract_state(config, model, tx)
    spec = helpers.spec_of(config)
    batch = {
      'target': jax.ShapeDtypeStruct((1, 8, 2), 'float32'),
      'weight': jax.ShapeDtypeStruct((1, 8, 2), 'float32'),
    }
    if spec.is_image:
      batch['image'] = jax.ShapeDtypeStruct((1, 8, 36, 36, 1), 'float32')
    else:
      batch['categorical'] = {
        name: jax.ShapeDtypeStruct((1, 8), 'int32')
        for name, _ in spec.cardinalities
      }
      batch['dense'] = jax.ShapeDtypeStruct((1, 8, spec.num_dense), 'float32')
    step = steps.one_device(
      functools.partial(
        steps.train_step,
        loss_config=config.loss,
        task_kinds=spec.task_kinds,
      ),
      in_axes=(0, 0, None),
    )
    batched = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), state
    )
    jax.eval_shape(step, batched, batch, jax.random.key(0))
    outcomes['traced'] += 1
  assert outcomes['refused'] > 10 and outcomes['traced'] > 5, outcomes


# ---------------------------------------------------------------------------
# A damaged workdir: resume and evaluation work or stop in one line.
# ---------------------------------------------------------------------------

# What a run may write when it resumes; everything else a user had stays.
_RUN_OUTPUTS = ('config.json', 'run_info.json', 'test_metrics.json')
_ONE_LINE_ERRORS = (
  config_schema.ConfigError,
  datasets.DataError,
  checkpointing.CheckpointError,
  trainer.TrainingError,
)
_DAMAGES = ('truncate', 'delete', 'folder', 'garbage', 'other_config')


def _fuzz_cases(count=30, seed=0, default=5):
  """(file pick, damage) of ``count`` seeded cases; the first ``default``
  run by default, the rest among the slow tests (about 2 s each here)."""
  rng = np.random.default_rng(seed)
  return [
    pytest.param(
      int(rng.integers(1 << 30)),
      _DAMAGES[i % len(_DAMAGES)],
      marks=() if i < default else pytest.mark.slow,
    )
    for i in range(count)
  ]


def _candidates(workdir):
  """The files to damage, the same in every copy of a run: each file with
  a fixed name, and of the files Orbax names by a digest, each folder's
  largest (the same array in every run of the config)."""
  found = []
  for d, _, names in os.walk(workdir):
    fixed = [n for n in names if not re.fullmatch('[0-9a-f]{32}', n)]
    found += [os.path.join(d, n) for n in fixed if n != '.lock']
    digests = sorted(set(names) - set(fixed))
    if digests:
      sizes = [os.path.getsize(os.path.join(d, n)) for n in digests]
      found.append(os.path.join(d, digests[int(np.argmax(sizes))]))
  return sorted(os.path.relpath(p, workdir) for p in found)


def _damage(workdir, pick, damage, other_config):
  files = _candidates(workdir)
  name = files[pick % len(files)]
  path = os.path.join(workdir, name)
  if damage == 'truncate':
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == 'delete':
    os.remove(path)
  elif damage == 'folder':
    os.remove(path)
    os.mkdir(path)
  elif damage == 'garbage':
    with open(path, 'wb') as f:
      f.write(np.random.default_rng(pick).bytes(64))
  else:  # Another config's config.json, whichever file was picked.
    name = 'config.json'
    with open(os.path.join(workdir, name), 'w') as f:
      f.write(other_config.to_json_best_effort(indent=2))
  return name


def _contents(workdir):
  return {
    os.path.relpath(os.path.join(d, n), workdir): (
      open(os.path.join(d, n), 'rb').read()
    )
    for d, _, names in os.walk(workdir)
    for n in names
    if n != '.lock'
  }


def _one_line_or_none(fn):
  try:
    fn()
  except _ONE_LINE_ERRORS as e:
    assert '\n' not in str(e) and str(e), repr(e)
    return str(e)
  return None


@pytest.mark.parametrize('pick,damage', _fuzz_cases())
def test_a_damaged_workdir_resumes_evaluates_or_stops_in_one_line(
  finished_run, tmp_path, pick, damage
):
  """One file of a finished workdir damaged (cut short, deleted, replaced by
  a folder or by garbage, or config.json swapped for another config's):
  the resume and the evaluation each work, falling back to an older good
  checkpoint where one exists, or stop with one line; no file is lost
  except that damaged checkpoints are moved aside."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished_run, workdir)
  damaged = _damage(
    workdir, pick, damage, helpers.tiny_config(**{'model.num_experts': 3})
  )
  before = _contents(workdir)
  # The evaluation first, on the workdir as the damage left it; then the
  # resume, which rewrites the run's own files.
  _one_line_or_none(lambda: evaluate.evaluate_workdir(workdir))
  _one_line_or_none(
    lambda: trainer.train_and_evaluate(helpers.tiny_config(), workdir)
  )
  after = _contents(workdir)
  for name, content in before.items():
    if name in _RUN_OUTPUTS:
      continue
    if name == 'metrics.jsonl':  # Appended to, never rewritten.
      assert after.get(name, b'').startswith(content), damaged
      continue
    top, *rest = name.split(os.sep)
    moved = {
      'checkpoints': 'damaged',
      'best': 'previous_best',
    }.get(top)
    kept = after.get(name) == content
    set_aside = moved and after.get(os.path.join(moved, *rest)) == content
    assert kept or set_aside or top == 'tensorboard', (damaged, name)


def test_a_config_without_a_field_names_it():
  config = helpers.tiny_config()
  with config.unlocked():
    del config.data['negatives']
  with pytest.raises(
    config_schema.ConfigError,
    match=r"lacks the fields \['data.negatives'\]; build it on configs/",
  ):
    config_schema.check_fields(config)


# ---------------------------------------------------------------------------
# A damaged checkpoint: one line, every time.
# ---------------------------------------------------------------------------

# train.py's flags for helpers.tiny_config().
_TINY_FLAGS = [
  f'--config={SAMPLE}',
  '--config.model.num_experts=2',
  '--config.model.gate.k=1',
  '--config.batch_size=32',
  '--config.eval_batch_size=200',
  '--config.num_train_steps=6',
  '--config.log_every_steps=3',
  '--config.eval_every_steps=3',
  '--config.checkpoint_every_steps=3',
]


def _cut_every_checkpoint(workdir):
  """Cuts each data file of every checkpoint (periodic and best) to half
  its size, as a crash or a full disk during a copy would."""
  for folder in ('checkpoints', 'best'):
    for d, _, names in os.walk(os.path.join(workdir, folder)):
      if os.path.basename(d) == 'd':  # OCDBT's data files.
        for name in names:
          path = os.path.join(d, name)
          with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)


def _messages(stderr: str) -> list[str]:
  """stderr without absl's informational and warning log lines."""
  return [
    line
    for line in stderr.splitlines()
    if line.strip() and not re.match(r'[IW]\d{4} ', line)
  ]


@pytest.mark.parametrize(
  'script,runs',
  [('eval.py', 2), pytest.param('eval.py', 10, marks=pytest.mark.slow)]
  + [pytest.param('train.py', 4, marks=pytest.mark.slow)],
)
def test_a_damaged_checkpoint_is_one_line_every_time(
  finished_run, tmp_path, script, runs
):
  """Orbax's abandoned reads print 'Event loop is closed' tracebacks and
  unretrieved futures' errors at random times up to exit, from none to
  thousands of lines: the error must be the only output on every run, and
  name the array it could not read in words."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished_run, workdir)
  _cut_every_checkpoint(workdir)
  flags = _TINY_FLAGS if script == 'train.py' else ['--step=6']
  for _ in range(runs):
    out = subprocess.run(
      [sys.executable, script, f'--workdir={workdir}', *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    messages = _messages(out.stderr)
    assert len(messages) == 1, '\n'.join(messages)[-3000:]
    (line,) = messages
    assert re.match(r'error: .* can(not)? be restored', line), line
    assert re.search(r'the (meta)?data of array \S+ cannot be read: ', line), (
      line
    )
    assert 'cut short or damaged' in line and 'TensorStore' not in line, line
  # Nothing was moved aside when no checkpoint restores.
  assert not os.path.exists(os.path.join(workdir, 'damaged'))


def test_the_abandoned_reads_of_a_failed_restore_are_silenced(
  monkeypatch, caplog
):
  """Deterministically, what the test above can only sample: the errors
  that Orbax's abandoned reads raise are dropped, any other unraisable
  error or asyncio log still reaches its previous destination."""
  import logging  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  reached = []
  monkeypatch.setattr(sys, 'unraisablehook', reached.append)
  asyncio_logger = logging.getLogger('asyncio')
  monkeypatch.setattr(asyncio_logger, 'filters', [])
  checkpointing._silence_abandoned_reads()  # pylint: disable=protected-access
  checkpointing._silence_abandoned_reads()  # Once only.

  async def orbax_read():
    pass

  coroutine = orbax_read()
  coroutine.close()
  orbax_code = orbax_read.__code__.replace(
    co_filename=os.path.join(os.sep, 'site-packages', 'orbax', 'x.py')
  )

  def unraisable(error, obj):
    return types.SimpleNamespace(
      exc_type=type(error),
      exc_value=error,
      exc_traceback=None,
      err_msg=None,
      object=obj,
    )

  dropped = [
    unraisable(RuntimeError('Event loop is closed'), None),
    unraisable(
      ValueError('read failed'), types.SimpleNamespace(cr_code=orbax_code)
    ),
  ]
  kept = [
    unraisable(RuntimeError('Event loop is closed'), object()),
    unraisable(RuntimeError('something else'), None),
    unraisable(ValueError('read failed'), coroutine),  # Not Orbax's.
  ]
  for u in dropped + kept:
    sys.unraisablehook(u)
  assert reached == kept
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    asyncio_logger.error(
      'Future exception was never retrieved\nfuture: <Future finished '
      'exception=ValueError(\'OUT_OF_RANGE: Error reading "a/0" in OCDBT '
      'database at local file "/w/": cut\')>'
    )
    asyncio_logger.error(
      '_GatheringFuture exception was never retrieved\nfuture: ... '
      'Encountered error while reading array index: ...'
    )
    asyncio_logger.error('Task exception was never retrieved\nother error')
  assert [r.getMessage() for r in caplog.records] == [
    'Task exception was never retrieved\nother error'
  ]


# ---------------------------------------------------------------------------
# Every command-line tool: bad values and paths in one line.
# ---------------------------------------------------------------------------

# (tool, arguments, what the line must say); the first of each folder runs
# by default, the rest among the slow tests (a few seconds each: a process
# that imports JAX).
_TOOL_CASES = [
  (
    'scripts/export_params.py',
    ['--workdir={tmp}/none', '--out={tmp}/p'],
    'does not exist',
  ),
  ('experiments/grid.py', ['--out={file}'], '--out={file} is a file'),
  (
    'benchmarks/train_speed.py',
    ['--batches=8,x'],
    '--batches=8,x: give integers',
  ),
  ('scripts/make_sample_data.py', ['--data_dir={tmp}/none'], 'missing'),
  ('scripts/movielens_summary.py', ['--negatives=-1'], 'flag --negatives=-1'),
  ('scripts/per_class.py', ['{tmp}', '--batch_size=0'], '--batch_size=0'),
  ('scripts/show_data.py', ['--out_dir={file}'], 'is a file; give a folder'),
  ('experiments/grid.py', ['--out={tmp}/g', '--shard=2/2'], '--shard=2/2'),
  ('experiments/grid.py', ['--out={tmp}/g', '--seeds=a'], '--seeds=a'),
  (
    'experiments/paddle_reference.py',
    ['--out={file}/x'],
    'not a writable folder',
  ),
  ('benchmarks/bn_relu_pool.py', ['--batches=0'], '--batches=0'),
  ('benchmarks/build_data.py', ['--data_dir={tmp}/none'], 'missing'),
  ('benchmarks/data_parallel.py', ['--conv=nope'], 'flag --conv=nope'),
  ('benchmarks/eval_formulations.py', ['--batch=0'], 'flag --batch=0'),
  ('benchmarks/expert_formulations.py', ['--experts=1'], 'flag --experts=1'),
  ('benchmarks/sparse_eval.py', ['--k=0'], 'flag --k=0'),
  ('benchmarks/train_speed.py', ['--out={file}/t.md'], 'not a writable folder'),
  ('benchmarks/xla_cpu_flags.py', ['--repeats=0'], 'flag --repeats=0'),
]


@pytest.mark.parametrize(
  'tool,args,expected',
  [
    pytest.param(*case, marks=() if i < 3 else pytest.mark.slow)
    for i, case in enumerate(_TOOL_CASES)
  ],
  ids=[f'{t} {" ".join(a)}' for t, a, _ in _TOOL_CASES],
)
def test_every_tool_ends_bad_input_in_one_line(tmp_path, tool, args, expected):
  file = tmp_path / 'a_file'
  file.write_text('x')
  fill = {'tmp': tmp_path, 'file': file}
  out = subprocess.run(
    [sys.executable, tool, *(a.format(**fill) for a in args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=dict(os.environ, DSELECT_DATA_DIR=str(tmp_path / 'none')),
  )
  assert out.returncode == 1, out.stderr[-3000:]
  messages = _messages(out.stderr)
  assert len(messages) == 1, '\n'.join(messages)[-3000:]
  assert messages[0].startswith('error: '), messages[0]
  assert expected.format(**fill) in messages[0], messages[0]
  # Nothing written (a data folder made for a download may stay, empty).
  written = [f for _, _, names in os.walk(tmp_path) for f in names]
  assert written == ['a_file'], written
