"""Config -> model, optimizer and train state: the one place that reads a
config's model and optimizer fields and picks implementations.

The config has passed ``config_schema.validate``; the data set's spec comes
from ``datasets.resolve``. ``create_model``, ``create_optimizer`` and
``initial_state`` build what the trainer, the evaluator and the checkpoints
share, so a restore always sees the structure training saved.
"""

from __future__ import annotations

from typing import Any, Optional

from absl import logging
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dselect_jax import config_schema
from dselect_jax import cpu
from dselect_jax import experts
from dselect_jax import gates
from dselect_jax import models
from dselect_jax.cpu import calibrate
from dselect_jax.cpu import kernels as cpu_kernels
from dselect_jax.datasets.spec import DataSpec

_CONV_MODULES = {
  'xla': None,
  'toeplitz': cpu.ToeplitzConv,
  'kernel': cpu.DirectConv,
}
_NORM_MODULES = {'xla': None, 'kernel': cpu.BatchNormReLUPool}


class TrainState(train_state.TrainState):
  """Params, BatchNorm statistics and optimizer state, with the step."""

  batch_stats: Any = None


# ---------------------------------------------------------------------------
# Model, optimizer, state.
# ---------------------------------------------------------------------------


def num_train_steps(config, num_train_examples: int) -> int:
  """``num_train_steps``, or ``num_epochs`` epochs of whole batches."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * (num_train_examples // config.batch_size)


def create_model(
  config: ml_collections.ConfigDict,
  spec: DataSpec,
  bn_axis_name: Optional[str] = None,
) -> models.MultiTaskMoE | models.RecommenderMoE:
  """The model a config describes (the model never sees the config): a
  MultiTaskMoE of CNN experts for image data sets, a RecommenderMoE of MLP
  experts for feature data sets (``spec``: the data set's)."""
  gate = config.model.gate
  gate_kwargs = {arg: gate[arg] for arg in config_schema.GATE_ARGS[gate.name]}
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
  init = config.model.init_scheme
  if init == 'paddlerec' and gate.name == 'dselect_k':
    gate_kwargs['w_init'] = gates.symmetric_uniform(
      1.0
    )  # PaddleRec's U(-1, 1).
  conv = conv_impl(config)
  expert_kwargs = {
    **expert_modules(conv, norm_impl(config)),
    'init_scheme': init,
  }
  bank_kwargs = {}
  if not config_schema.vmapped(config):  # The loop's evaluation options.
    bank_kwargs = {
      'fused_eval': config.model.fused_eval,
      'eval_block': cpu_kernels.conv_relu_pool if conv == 'kernel' else None,
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
    bank=experts.EXPERT_BANKS[config.model.expert_bank],
    bank_kwargs=flax.core.FrozenDict(bank_kwargs),
    tower_kwargs=flax.core.FrozenDict({'init_scheme': init}),
    bn_axis_name=bn_axis_name,
    # Dispatched training normalizes each expert over its routed examples,
    # its dense steps too, so that both are one function.
    routed_statistics=config.model.sparse_dispatch and gate.name == 'dselect_k',
  )


def expert_modules(conv: str, norm: str) -> dict[str, Any]:
  """MultiMNISTExpert's module arguments for a conv and a norm choice
  (``CONV_IMPLS``, ``NORM_IMPLS``)."""
  return {
    'conv_module': _CONV_MODULES[conv],
    'block_module': _NORM_MODULES[norm],
  }


def conv_impl(config) -> str:
  """The expert convolution a config asks for, with 'auto' resolved.

  'auto' is the CPU kernels' direct convolution on CPU if they build on this
  machine and beat the Toeplitz form there (cpu.DirectConv; measured once
  per machine, ``cpu.calibrate``), else the Toeplitz formulation
  (cpu.ToeplitzConv, faster than XLA's convolution on XLA:CPU), and XLA's
  convolution on other backends or with ``model.expert_bank='vmap'``.
  """
  conv = config.model.conv
  if conv != 'auto':
    return conv
  if jax.default_backend() != 'cpu' or config_schema.vmapped(config):
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
  norm = config.model.norm
  if norm != 'auto':
    return norm
  if jax.default_backend() != 'cpu' or config_schema.vmapped(config):
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


def example_inputs(spec: DataSpec) -> tuple:
  """One example of a data set's model inputs (zeros), as
  ``steps.model_inputs`` passes a batch's."""
  if spec.is_image:
    return (jnp.zeros((1, *spec.image_shape), jnp.float32),)
  categorical = {
    name: jnp.zeros((1,), jnp.int32) for name, _ in spec.cardinalities
  }
  return categorical, jnp.zeros((1, spec.num_dense), jnp.float32)


def initial_state(model, tx, rng, spec: DataSpec) -> TrainState:
  """A new state: the model initialized on ``spec``'s example inputs."""
  inputs = example_inputs(spec)
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


def abstract_state(model, tx, spec: DataSpec) -> TrainState:
  """The state's shapes and dtypes, with no array allocated."""
  return jax.eval_shape(
    lambda rng: initial_state(model, tx, rng, spec), jax.random.key(0)
  )
