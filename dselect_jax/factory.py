"""Config -> model, optimizer and train state: the one place that reads a
config's model and optimizer fields, validates them and picks implementations.

``FIELDS`` gives every config field its allowed values; ``validate_config``
checks a whole config against it (and the few rules that tie fields
together) before any data are read or any array is allocated, and names the
field, the value and the fix. ``create_model``, ``create_optimizer`` and
``initial_state`` build what the trainer, the evaluator and the checkpoints
share, so a restore always sees the structure training saved.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

from absl import logging
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dselect_jax import cpu
from dselect_jax import gates
from dselect_jax import input_pipeline
from dselect_jax import models
from dselect_jax.cpu import calibrate
from dselect_jax.cpu import kernels as cpu_kernels

GATE_ARGS = {
  'dselect_k': ('k', 'gamma', 'per_example'),
  'softmax': ('per_example',),
  'top_k': ('k', 'per_example', 'noisy'),
}
OPTIMIZERS = ('adam', 'adamw', 'sgd')
# The experts' convolution and BatchNorm-ReLU-pool block: XLA's ops, or the
# CPU's (dselect_jax.cpu); 'auto' picks per backend (conv_impl, norm_impl).
CONV_IMPLS = ('xla', 'toeplitz', 'toeplitz_kernel', 'kernel')
NORM_IMPLS = ('xla', 'kernel')
_CONV_MODULES = {
  'xla': None,
  'toeplitz': cpu.ToeplitzConv,
  'toeplitz_kernel': functools.partial(cpu.ToeplitzConv, rows='kernel'),
  'kernel': cpu.DirectConv,
}
_KERNEL_CONVS = ('toeplitz_kernel', 'kernel')  # Those that need the kernels.
_NORM_MODULES = {'xla': None, 'kernel': cpu.BatchNormReLUPool}
SCHEDULES = ('constant', 'warmup_cosine')
# Aux terms with a loss weight; other aux entries are diagnostics.
AUX_WEIGHTS = {
  'entropy': 'entropy_weight',
  'reachability': 'reachability_weight',
  'importance': 'importance_weight',
  'load': 'load_weight',
}


class ConfigError(ValueError):
  """A config value that cannot work. The message names the field and fix."""


class TrainState(train_state.TrainState):
  """Params, BatchNorm statistics and optimizer state, with the step."""

  batch_stats: Any = None


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
  'data.name': OneOf(input_pipeline.ALL_DATASETS),
  'data.recipe': OneOf(input_pipeline.RECIPES),
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
  'model.expert_bank': OneOf(tuple(models.EXPERT_BANKS)),
  'model.norm': OneOf(('auto',) + NORM_IMPLS),
  'model.sparse_eval': BOOL,
  'model.sparse_train': BOOL,
  'model.fused_eval': BOOL,
  'model.routing_input': OneOf(('input', 'experts')),
  'model.init_scheme': OneOf(models.INITS),
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


def validate_config(config: ml_collections.ConfigDict, num_devices: int):
  """Fails early, with the field and the fix, on values that cannot work."""

  def bad(field, value, why):
    raise ConfigError(f'config.{field}={value!r}: {why}.')

  fields = flat_fields(config)
  for field, value in fields.items():
    if field not in FIELDS:
      raise ConfigError(
        f'config.{field} is not a field of this version (known: the fields '
        'of configs/default.py); remove it from the config.'
      )
    why = FIELDS[field].problem(value)
    if why:
      bad(field, value, why)

  model, gate = config.model, config.model.gate
  if not input_pipeline.describe(config.data.name).is_image:
    for field, default in IMAGE_ONLY.items():
      if fields[field] != default:
        bad(
          field,
          fields[field],
          f'applies to the image data sets only, and {config.data.name!r} '
          f'is a feature data set; leave it at {default!r}',
        )
  norm = model.norm
  if _vmapped(config):
    for field in ('conv', 'norm'):
      if model[field] not in ('auto', 'xla'):
        bad(
          f'model.{field}',
          model[field],
          "the CPU paths are not vmapped; with model.expert_bank='vmap' "
          f"set --config.model.{field}=auto (XLA's ops)",
        )
  for field, value in (('norm', norm), ('conv', model.conv)):
    if value not in ('kernel', 'toeplitz_kernel'):
      continue
    if jax.default_backend() != 'cpu':
      bad(
        f'model.{field}',
        value,
        'the kernels are for the CPU, and JAX runs on '
        f'{jax.default_backend()}; set --config.model.{field}=auto',
      )
    try:
      cpu_kernels.load()
    except cpu_kernels.KernelBuildError as e:
      bad(f'model.{field}', value, f'the CPU kernels do not build here: {e}')
  if model.sparse_train and (
    gate.name != 'dselect_k'
    or gate.per_example
    or config.optimizer.name == 'adamw'
  ):
    bad(
      'model.sparse_train',
      True,
      'needs static dselect_k gates (a top_k gate can bring a dropped '
      'expert back, a softmax gate drops none) and an optimizer without '
      'weight decay (adam or sgd; weight decay can also bring one back); '
      'set --config.model.sparse_train=False',
    )
  if config.data.fresh_train and config.data.name in (
    input_pipeline.SPECIAL_DATASETS
  ):
    bad(
      'data.fresh_train',
      True,
      f'needs a data set built from the raw files, and {config.data.name!r} '
      'is stored as it is; set --config.data.fresh_train=False',
    )
  if config.data.num_validation > 0 and config.data.recipe == 'comet':
    bad(
      'data.num_validation',
      config.data.num_validation,
      'the comet recipe always holds out 10,000 base images (20,000 '
      'composites); leave it at -1',
    )
  if gate.name != 'softmax' and gate.k > model.num_experts:
    bad(
      'model.gate.k',
      gate.k,
      f'must satisfy 1 <= k <= model.num_experts={model.num_experts}',
    )
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      bad(
        name,
        config[name],
        f'must be a positive multiple of the {num_devices} devices',
      )
  if config.schedule.name == 'warmup_cosine' and (
    0 < config.num_train_steps <= config.schedule.warmup_steps
  ):
    bad(
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


# ---------------------------------------------------------------------------
# Model, optimizer, state.
# ---------------------------------------------------------------------------


def task_kinds(config) -> Optional[tuple[str, ...]]:
  """The kinds of a feature data set's tasks (``tasks.KINDS``), which decide
  its losses and metrics; None for the image data sets, whose tasks are all
  classifications with labels."""
  spec = input_pipeline.describe(config.data.name)
  return None if spec.is_image else spec.task_kinds


def num_train_steps(config, num_train_examples: int) -> int:
  """``num_train_steps``, or ``num_epochs`` epochs of whole batches."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * (num_train_examples // config.batch_size)


def create_model(
  config: ml_collections.ConfigDict, bn_axis_name: Optional[str] = None
) -> models.MultiTaskMoE | models.RecommenderMoE:
  """The model a config describes (the model never sees the config): a
  MultiTaskMoE of CNN experts for image data sets, a RecommenderMoE of MLP
  experts for feature data sets."""
  gate = config.model.gate
  gate_kwargs = {arg: gate[arg] for arg in GATE_ARGS[gate.name]}
  spec = input_pipeline.describe(config.data.name)
  if not spec.is_image:
    return models.RecommenderMoE(
      num_tasks=spec.num_tasks,
      cardinalities=spec.cardinalities,
      embed_dim=config.model.embed_dim,
      num_experts=config.model.num_experts,
      gate=gate.name,
      gate_kwargs=flax.core.FrozenDict(gate_kwargs),
      shared_gate=config.model.shared_gate,
      expert_kwargs=flax.core.FrozenDict(
        {
          'hidden': (config.model.expert_hidden,),
          'features': config.model.expert_features,
        }
      ),
      tower_hidden=(config.model.tower_hidden,),
    )
  init = config.model.get('init_scheme', 'flax')
  if init == 'paddlerec' and gate.name == 'dselect_k':
    gate_kwargs['w_init'] = gates.symmetric_uniform(
      1.0
    )  # PaddleRec's U(-1, 1).
  conv = conv_impl(config)
  expert_kwargs = {
    **expert_modules(conv, norm_impl(config)),
    'init_scheme': init,
  }
  return models.MultiTaskMoE(
    num_tasks=spec.num_tasks,
    num_experts=config.model.num_experts,
    gate=gate.name,
    gate_kwargs=flax.core.FrozenDict(gate_kwargs),
    shared_gate=config.model.shared_gate,
    routing_input=config.model.routing_input,
    num_classes=spec.num_classes,
    expert_kwargs=flax.core.FrozenDict(expert_kwargs),
    expert_bank=config.model.get('expert_bank', 'loop'),
    fused_eval=config.model.get('fused_eval', True) and not _vmapped(config),
    eval_block=cpu_kernels.conv_relu_pool if conv in _KERNEL_CONVS else None,
    tower_kwargs=flax.core.FrozenDict({'init_scheme': init}),
    bn_axis_name=bn_axis_name,
  )


def expert_modules(conv: str, norm: str) -> dict[str, Any]:
  """MultiMNISTExpert's module arguments for a conv and a norm choice
  (``CONV_IMPLS``, ``NORM_IMPLS``)."""
  return {
    'conv_module': _CONV_MODULES[conv],
    'block_module': _NORM_MODULES[norm],
  }


def _vmapped(config) -> bool:
  """The experts as one nn.vmap, which only XLA's own ops support."""
  return config.model.get('expert_bank', 'loop') == 'vmap'


def conv_impl(config) -> str:
  """The expert convolution a config asks for, with 'auto' resolved.

  'auto' is the CPU kernels' direct convolution on CPU if they build on this
  machine and beat the Toeplitz form there (cpu.DirectConv; measured once
  per machine, ``cpu.calibrate``), else the Toeplitz formulation
  (cpu.ToeplitzConv, faster than XLA's convolution on XLA:CPU), and XLA's
  convolution on other backends or with ``model.expert_bank='vmap'``.
  """
  conv = config.model.get('conv', 'auto')
  if conv != 'auto':
    return conv
  if jax.default_backend() != 'cpu' or _vmapped(config):
    return 'xla'
  if not cpu_kernels.available():
    return 'toeplitz'
  if calibrate.direct_conv_is_faster():
    return 'kernel'
  logging.log_first_n(
    logging.INFO,
    'model.conv=auto: the Toeplitz convolutions; on this CPU they ran the '
    "experts' convolutions in %.1f ms against the direct kernels' %.1f ms "
    '(dselect_jax/cpu/calibrate.py)',
    1,
    1e3 * calibrate.times()['toeplitz_s'],
    1e3 * calibrate.times()['direct_s'],
  )
  return 'toeplitz'


def norm_impl(config) -> str:
  """The experts' BatchNorm-ReLU-pool blocks a config asks for, 'auto' resolved.

  'auto' is the hand-written CPU kernels on CPU (faster there, see
  cpu.BatchNormReLUPool) if they build on this machine, and XLA's ops
  otherwise (on other backends, or without a C++ compiler: logged once).
  """
  norm = config.model.get('norm', 'auto')
  if norm != 'auto':
    return norm
  if jax.default_backend() != 'cpu' or _vmapped(config):
    return 'xla'
  if cpu_kernels.available():
    return 'kernel'
  logging.log_first_n(
    logging.WARNING,
    "model.norm=auto: using XLA's BatchNorm, because the "
    'CPU kernels do not build here: %s',
    1,
    cpu_kernels.build_failure(),
  )
  return 'xla'


def learning_rate_schedule(config, num_train_steps: int) -> optax.Schedule:
  lr = config.optimizer.learning_rate
  if config.schedule.name == 'constant':
    return optax.constant_schedule(lr)
  return optax.warmup_cosine_decay_schedule(
    0.0,
    lr,
    config.schedule.warmup_steps,
    max(num_train_steps, config.schedule.warmup_steps + 1),
  )


def create_optimizer(config, num_train_steps: int):
  schedule = learning_rate_schedule(config, num_train_steps)
  opt = config.optimizer
  if opt.name == 'adam':
    tx = optax.adam(schedule)
  elif opt.name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=opt.momentum)
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def entropy_weight(loss_config, step) -> jax.Array:
  """The entropy term's weight at ``step``: 0 up to entropy_start_step, then
  a linear ramp reaching entropy_weight entropy_ramp_steps later (at once
  when entropy_ramp_steps is 0)."""
  start, ramp = loss_config.entropy_start_step, loss_config.entropy_ramp_steps
  if ramp <= 0:
    frac = (
      (step >= start).astype(jnp.float32)
      if isinstance(step, jax.Array)
      else float(step >= start)
    )
  else:
    frac = jnp.clip((step - start) / ramp, 0, 1)
  return loss_config.entropy_weight * frac


def aux_weights(loss_config, step) -> dict[str, jax.Array]:
  weights = {name: loss_config[field] for name, field in AUX_WEIGHTS.items()}
  weights['entropy'] = entropy_weight(loss_config, step)
  return weights


def example_inputs(spec: input_pipeline.DataSpec) -> tuple:
  """One example of a data set's model inputs (zeros), as
  ``steps.model_inputs`` passes a batch's."""
  if spec.is_image:
    return (jnp.zeros((1, *spec.image_shape), jnp.float32),)
  categorical = {
    name: jnp.zeros((1,), jnp.int32) for name, _ in spec.cardinalities
  }
  return categorical, jnp.zeros((1, spec.num_dense), jnp.float32)


def initial_state(config, model, tx, rng) -> TrainState:
  inputs = example_inputs(input_pipeline.describe(config.data.name))
  params_rng, gating_rng = jax.random.split(rng)
  variables = model.init(
    {'params': params_rng, 'gating': gating_rng}, *inputs, train=False
  )
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),  # None in MLP experts.
    tx=tx,
  )


def abstract_state(config, model, tx) -> TrainState:
  """The state's shapes and dtypes, with no array allocated."""
  return jax.eval_shape(
    functools.partial(initial_state, config, model, tx), jax.random.key(0)
  )
