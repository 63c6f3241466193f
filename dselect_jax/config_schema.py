"""A config's fields: what each may hold, and the rules that tie them.

``FIELDS`` gives every config field its allowed values (``configs/default.py``
documents what each means); ``validate`` checks a whole config against them,
against the data set's spec and against the devices before any data are read
or any array is allocated, and names the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import ml_collections

from dselect_jax import blocks
from dselect_jax import datasets
from dselect_jax import experts
from dselect_jax.cpu import kernels as cpu_kernels
from dselect_jax.datasets import multimnist
from dselect_jax.datasets.spec import DataSpec

# The gate fields each gate takes (model.gate.<field>).
GATE_ARGS = {
  'dselect_k': ('k', 'gamma', 'per_example'),
  'softmax': ('per_example',),
  'top_k': ('k', 'per_example', 'noisy'),
}
OPTIMIZERS = ('adam', 'adamw', 'sgd')
# The experts' convolution and BatchNorm-ReLU-pool block: XLA's ops, or the
# CPU's (dselect_jax.cpu); 'auto' picks per backend (factory.conv_impl,
# factory.norm_impl). 'kernel' needs the CPU kernels built.
CONV_IMPLS = ('xla', 'toeplitz', 'kernel')
NORM_IMPLS = ('xla', 'kernel')
SCHEDULES = ('constant', 'warmup_cosine')


class ConfigError(ValueError):
  """A config value that cannot work. The message names the field and fix."""


# ---------------------------------------------------------------------------
# What each field may hold.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OneOf:
  """A field that takes one of ``choices`` (strings or booleans)."""

  choices: tuple[Any, ...]

  def problem(self, value) -> Optional[str]:
    if value not in self.choices or type(value) not in {  # 1 == True.
      type(c) for c in self.choices
    }:
      return f'choose one of {list(self.choices)}'
    return None

  def values(self, default) -> tuple[Any, ...]:
    del default
    return self.choices


BOOL = OneOf((False, True))


@dataclasses.dataclass(frozen=True)
class Number:
  """An int or float field in ``[low, high]`` (``low_open``: ``(low, high]``).

  ``special``: values outside the range that mean something (-1 for "once
  per epoch"); ``example``: another valid value than the defaults, for the
  tests that try every value of every field.
  """

  integer: bool
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  special: tuple[Any, ...] = ()
  example: Any = None

  def problem(self, value) -> Optional[str]:
    kind = 'an integer' if self.integer else 'a number'
    if isinstance(value, bool) or not isinstance(
      value, int if self.integer else (int, float)
    ):
      return f'must be {kind}'
    if value in self.special:
      return None
    above = value > self.low if self.low_open else value >= self.low
    if not (math.isfinite(value) and above and value <= self.high):
      if math.isfinite(self.high):
        lo = '(' if self.low_open else '['
        allowed = f'in {lo}{self.low:g}, {self.high:g}]'
      else:
        allowed = f'{">" if self.low_open else ">="} {self.low:g}'
      also = f' or one of {list(self.special)}' if self.special else ''
      return f'must be {allowed}{also} ({kind})'
    return None

  def values(self, default) -> tuple[Any, ...]:
    return tuple(v for v in (default, self.example) if v is not None)


@dataclasses.dataclass(frozen=True)
class Text:
  """A free string (a folder; checked where it is used)."""

  def problem(self, value) -> Optional[str]:
    return None if isinstance(value, str) else 'must be a string'

  def values(self, default) -> tuple[Any, ...]:
    return (default,)


def _int(low=-math.inf, **kwargs) -> Number:
  return Number(integer=True, low=low, **kwargs)


def _float(low=-math.inf, **kwargs) -> Number:
  return Number(integer=False, low=low, **kwargs)


FIELDS = {
  'data.name': OneOf(datasets.NAMES),
  'data.recipe': OneOf(multimnist.RECIPES),
  'data.seed': _int(0),
  'data.data_dir': Text(),
  'data.paddlerec_dir': Text(),
  'data.download': BOOL,
  'data.num_validation': _int(0, special=(-1,)),
  'data.shuffle': BOOL,
  'data.fresh_train': BOOL,
  'data.negatives': _int(0, example=2),
  'model.num_experts': _int(2, example=3),
  'model.shared_gate': BOOL,
  'model.conv': OneOf(('auto',) + CONV_IMPLS),
  'model.expert_bank': OneOf(tuple(experts.EXPERT_BANKS)),
  'model.norm': OneOf(('auto',) + NORM_IMPLS),
  'model.sparse_eval': BOOL,
  'model.sparse_train': BOOL,
  'model.sparse_dispatch': BOOL,
  'model.fused_eval': BOOL,
  'model.routing_input': OneOf(('input', 'experts')),
  'model.init_scheme': OneOf(blocks.INITS),
  'model.embed_dim': _int(1, example=4),
  'model.expert_hidden': _int(1, example=16),
  'model.expert_features': _int(1, example=8),
  'model.tower_hidden': _int(1, example=8),
  'model.gate.name': OneOf(tuple(GATE_ARGS)),
  'model.gate.k': _int(1, example=2),
  'model.gate.gamma': _float(0, low_open=True, example=0.5),
  'model.gate.per_example': BOOL,
  'model.gate.noisy': BOOL,
  'optimizer.name': OneOf(OPTIMIZERS),
  'optimizer.learning_rate': _float(0, low_open=True),
  'optimizer.weight_decay': _float(0, example=0.0),
  'optimizer.momentum': _float(0, high=1),
  'optimizer.grad_clip_norm': _float(0, example=1.0),
  'schedule.name': OneOf(SCHEDULES),
  'schedule.warmup_steps': _int(0, example=2),
  'loss.name': OneOf(('cross_entropy', 'double_softmax')),
  'loss.label_smoothing': _float(0, high=0.5),
  'loss.entropy_weight': _float(0, example=0.1),
  'loss.entropy_start_step': _int(0),
  'loss.entropy_ramp_steps': _int(0),
  'loss.reachability_weight': _float(0),
  'loss.importance_weight': _float(0),
  'loss.load_weight': _float(0),
  'batch_size': _int(1),
  'eval_batch_size': _int(1),
  'num_epochs': _int(1),
  'num_train_steps': _int(1, special=(-1,)),
  'log_every_steps': _int(1),
  'eval_every_steps': _int(1, special=(-1,)),
  'checkpoint_every_steps': _int(1, special=(-1,)),
  'max_to_keep': _int(1),
  'test_every_epoch': BOOL,
  'seed': _int(0),
}


# Fields of the image models, losses and data only, with the value a
# feature data set (movielens) needs them left at.
IMAGE_ONLY = {
  'data.fresh_train': False,
  'model.conv': 'auto',
  'model.norm': 'auto',
  'model.expert_bank': 'loop',
  'model.fused_eval': True,
  'model.routing_input': 'input',
  'model.init_scheme': 'flax',
  'loss.name': 'cross_entropy',
  'loss.label_smoothing': 0.0,
  'test_every_epoch': False,
}


# Fields added after the first runs, with the value that gives a config.json
# written before they existed its old behaviour; ``complete`` fills them in.
ADDED_LATER = {
  'data.num_validation': -1,
  'data.negatives': 1,
  'model.conv': 'auto',
  'model.norm': 'auto',
  'model.expert_bank': 'loop',
  'model.fused_eval': True,
  'model.sparse_eval': True,
  'model.sparse_train': False,
  'model.sparse_dispatch': False,
  'model.init_scheme': 'flax',
  'loss.name': 'cross_entropy',
  'loss.label_smoothing': 0.0,
}


def complete(config: ml_collections.ConfigDict, where: str):
  """A saved config (``where`` names its file) made whole: the fields of
  ``ADDED_LATER`` it lacks take their old values; any other missing field,
  or a field of the wrong type or range, is a ConfigError naming it."""
  fields = flat_fields(config)
  for field, value in ADDED_LATER.items():
    if field not in fields:
      section, name = field.rsplit('.', 1)
      with config.unlocked():
        config[section][name] = value
  missing = sorted(set(FIELDS) - set(flat_fields(config)))
  if missing:
    raise ConfigError(
      f'{where} lacks the fields {missing} (cut short or edited); restore '
      'it from a copy, or train again in a new workdir.'
    )
  try:
    check_fields(config)
  except ConfigError as e:
    raise ConfigError(f'{where}: {e}') from None
  return config


def flat_fields(
  config: ml_collections.ConfigDict, prefix: str = ''
) -> dict[str, Any]:
  """Every leaf field of ``config`` as ``{'model.gate.k': 2, ...}``."""
  out = {}
  for key, value in config.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat_fields(value, name + '.'))
    else:
      out[name] = value
  return out


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


def check_fields(config: ml_collections.ConfigDict):
  """Every field known and present, and each value one that field may
  hold."""
  fields = flat_fields(config)
  for field, value in fields.items():
    if field not in FIELDS:
      raise ConfigError(
        f'config.{field} is not a field of this version (known: the fields '
        'of configs/default.py); remove it from the config.'
      )
    why = FIELDS[field].problem(value)
    if why:
      _bad(field, value, why)
  missing = sorted(set(FIELDS) - set(fields))
  if missing:
    raise ConfigError(
      f'the config lacks the fields {missing}; build it on '
      'configs/default.py get_config(), which sets every field.'
    )


def _bad(field, value, why):
  raise ConfigError(f'config.{field}={value!r}: {why}.')


def validate(
  config: ml_collections.ConfigDict, num_devices: int, spec: DataSpec
):
  """Fails early, with the field and the fix, on values that cannot work:
  ``check_fields``, then the rules that tie fields together, to the data
  set's ``spec`` and to the ``num_devices`` devices."""
  check_fields(config)

  fields = flat_fields(config)
  model, gate = config.model, config.model.gate
  if not spec.is_image:
    for field, default in IMAGE_ONLY.items():
      if fields[field] != default:
        _bad(
          field,
          fields[field],
          f'applies to the image data sets only, and {config.data.name!r} '
          f'is a feature data set; leave it at {default!r}',
        )
  norm = model.norm
  if vmapped(config):
    for field in ('conv', 'norm'):
      if model[field] not in ('auto', 'xla'):
        _bad(
          f'model.{field}',
          model[field],
          "the CPU paths are not vmapped; with model.expert_bank='vmap' "
          f"set --config.model.{field}=auto (XLA's ops)",
        )
  for field, value in (('norm', norm), ('conv', model.conv)):
    if value != 'kernel':
      continue
    if jax.default_backend() != 'cpu':
      _bad(
        f'model.{field}',
        value,
        'the kernels are for the CPU, and JAX runs on '
        f'{jax.default_backend()}; set --config.model.{field}=auto',
      )
    try:
      cpu_kernels.load()
    except cpu_kernels.KernelBuildError as e:
      _bad(f'model.{field}', value, f'the CPU kernels do not build here: {e}')
  if model.sparse_dispatch and not (
    gate.per_example
    and gate.name in ('dselect_k', 'top_k')
    and model.routing_input == 'input'
  ):
    _bad(
      'model.sparse_dispatch',
      True,
      'dispatches each expert the examples a per-example gate routes to it: '
      'it needs per-example dselect_k (or top_k, in evaluation) gates '
      'routing on the input (model.gate.per_example=True, '
      'model.routing_input=input); set --config.model.sparse_dispatch=False',
    )
  if model.sparse_train and (
    gate.name != 'dselect_k'
    or gate.per_example
    or config.optimizer.name == 'adamw'
  ):
    _bad(
      'model.sparse_train',
      True,
      'needs static dselect_k gates (a top_k gate can bring a dropped '
      'expert back, a softmax gate drops none; per-example gates: '
      'model.sparse_dispatch) and an optimizer without '
      'weight decay (adam or sgd; weight decay can also bring one back); '
      'set --config.model.sparse_train=False',
    )
  if config.data.fresh_train and not spec.fresh_train:
    _bad(
      'data.fresh_train',
      True,
      f'needs a data set built from the raw files, and {config.data.name!r} '
      'is stored as it is; set --config.data.fresh_train=False',
    )
  if config.data.num_validation > 0 and config.data.recipe == 'comet':
    _bad(
      'data.num_validation',
      config.data.num_validation,
      'the comet recipe always holds out 10,000 base images (20,000 '
      'composites); leave it at -1',
    )
  if gate.name != 'softmax' and gate.k > model.num_experts:
    _bad(
      'model.gate.k',
      gate.k,
      f'must satisfy 1 <= k <= model.num_experts={model.num_experts}',
    )
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      _bad(
        name,
        config[name],
        f'must be a positive multiple of the {num_devices} devices',
      )
  if config.schedule.name == 'warmup_cosine' and (
    0 < config.num_train_steps <= config.schedule.warmup_steps
  ):
    _bad(
      'schedule.warmup_steps',
      config.schedule.warmup_steps,
      f'must be below num_train_steps={config.num_train_steps}',
    )


def validate_against_data(
  config, num_train_examples: int, num_test_examples: int
):
  """The checks that need the data's size (after it loaded)."""
  if config.batch_size > num_train_examples:
    raise ConfigError(
      f'config.batch_size={config.batch_size}: larger than the '
      f'{num_train_examples} training examples of {config.data.name!r}; '
      'lower it.'
    )
  if num_test_examples == 0:
    raise ConfigError(
      f'data set {config.data.name!r} has no test examples; choose another.'
    )


def vmapped(config) -> bool:
  """The experts as one nn.vmap, which only XLA's own ops support."""
  return config.model.expert_bank == 'vmap'
