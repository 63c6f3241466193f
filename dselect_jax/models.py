"""Multi-task mixture of experts: shared experts, a gate per task, towers.

Shape legend (as in gates.py):
  B: batch   T: tasks   E: experts   G: gates (T, or 1 when shared)
  H: expert output features   C: classes   D: routing-input features

The MultiMNIST expert and tower are the networks of PaddleRec's DSelect-k
model (the reference recipe), with BatchNorm after each convolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dselect_jax import gates as gates_lib

Array = jax.Array
ModuleFactory = Callable[..., nn.Module]


def check_batch(x: Array, who: str):
  """A clear error for what is not a non-empty batch (B, ...)."""
  shape = jnp.shape(x)
  if len(shape) < 2:
    raise ValueError(
      f'{who}: inputs must have a batch axis and features, (B, ...); got '
      f'shape {shape}.'
    )
  if shape[0] == 0:
    raise ValueError(
      f'{who}: the batch is empty (shape {shape}); pass at least one example.'
    )


def check_images(x: Array, who: str):
  """A clear error for what is not a non-empty (B, H, W, C) image batch."""
  shape = jnp.shape(x)
  if len(shape) != 4:
    hint = ' (add the channel axis: x[..., None])' if len(shape) == 3 else ''
    raise ValueError(
      f'{who}: images must have shape (B, H, W, C); got shape {shape}{hint}.'
    )
  check_batch(x, who)


def max_pool_2x2(x: Array) -> Array:
  """2x2 max pooling, stride 2, of (B, H, W, C) with even H and W.

  Equal to ``nn.max_pool(x, (2, 2), strides=(2, 2))`` (tested); written as a
  reshape and a max because XLA:CPU differentiates it faster than
  ``nn.max_pool``'s reduce_window (the expert bank's forward+backward went
  from 334 to 444 images/s in one session's run of
  benchmarks/expert_formulations.py; not committed as a result file).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


INITS = ('flax', 'paddlerec')


def truncated_normal_fan_in(key, shape, dtype=jnp.float32) -> Array:
  """PaddleRec's dense kernels: normal with std 1 / sqrt(fan_in), cut at 2
  standard deviations and not rescaled (so the std is about 0.88 of it)."""
  return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) / np.sqrt(
    shape[0]
  ).astype(dtype)


# PaddleRec's convolution kernels: XavierNormal, std sqrt(2 / (fan_in +
# fan_out)) with the receptive field in both fans; untruncated.
xavier_normal = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


def _check_init(module: nn.Module):
  if module.init_scheme not in INITS:
    raise ValueError(
      f'{type(module).__name__}: init_scheme must be one of '
      f'{INITS}, got init_scheme={module.init_scheme!r}.'
    )


class MultiMNISTExpert(nn.Module):
  """conv5x5(10)-BN-ReLU-pool2-conv5x5(20)-BN-ReLU-pool2-Dense(50)-ReLU-Dense(50)-ReLU.

  Valid convolutions on a (36, 36, 1) image: 36 -> 32 -> 16 -> 12 -> 6, so the
  first Dense sees 6 * 6 * 20 = 720 features. About 2.0 MFLOP per image.

  Attributes:
    features: output width H.
    bn_axis_name: pmap axis over which BatchNorm averages its batch statistics,
      so that a data-parallel step equals one step on the whole batch.
    conv_module: the convolution, called as ``conv_module(features,
      kernel_size, kernel_init=..., name=...)`` with VALID padding; None is
      ``nn.Conv`` (XLA's convolution). ``dselect_jax.cpu.ToeplitzConv`` (row
      matmuls, faster on XLA:CPU) computes the same function with the same
      parameters, so a checkpoint trained with one runs with the other.
    block_module: each BatchNorm-ReLU-pool block, called as
      ``block_module(use_running_average=..., momentum=..., epsilon=...,
      axis_name=..., name=...)``; None is ``nn.BatchNorm``, ``nn.relu`` and
      ``max_pool_2x2``. ``dselect_jax.cpu.BatchNormReLUPool`` (C++ kernels)
      holds the same variables.
    init_scheme: ``'flax'`` (Flax's LeCun-normal kernels) or
      ``'paddlerec'`` (PaddleRec's: ``xavier_normal`` convolutions,
      ``truncated_normal_fan_in`` dense layers); zero biases either way.
  """

  features: int = 50
  bn_axis_name: Optional[str] = None
  conv_module: Optional[ModuleFactory] = None
  block_module: Optional[ModuleFactory] = None
  init_scheme: str = 'flax'
  MIN_SIZE = 16  # 16 -> 12 -> 6 -> 2 -> 1.

  def __post_init__(self):
    _check_init(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    check_images(x, 'MultiMNISTExpert')
    if not all(n >= self.MIN_SIZE and n % 4 == 0 for n in x.shape[1:3]):
      raise ValueError(
        f'MultiMNISTExpert: images of {x.shape[1]}x{x.shape[2]} pixels do '
        f'not fit: two valid 5x5 convolutions, each followed by 2x2 '
        f'pooling, need H and W at least {self.MIN_SIZE} and multiples of '
        '4 (the MultiMNIST canvas is 36x36).'
      )
    bn = dict(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=self.bn_axis_name,
    )
    if self.block_module is None:
      block = lambda x, name: max_pool_2x2(
        nn.relu(nn.BatchNorm(**bn, name=name)(x))
      )
    else:
      block = lambda x, name: self.block_module(**bn, name=name)(x)
    paddlerec = self.init_scheme == 'paddlerec'
    conv_init = xavier_normal if paddlerec else nn.initializers.lecun_normal()
    dense = functools.partial(
      nn.Dense,
      kernel_init=(
        truncated_normal_fan_in if paddlerec else nn.initializers.lecun_normal()
      ),
    )
    if self.conv_module is None:
      conv = lambda f, name: nn.Conv(
        f, (5, 5), padding='VALID', kernel_init=conv_init, name=name
      )
    else:
      conv = lambda f, name: self.conv_module(
        f, (5, 5), kernel_init=conv_init, name=name
      )
    x = conv(10, 'Conv_0')(x)  # (B, 32, 32, 10)
    x = block(x, 'BatchNorm_0')  # (B, 16, 16, 10)
    x = conv(20, 'Conv_1')(x)  # (B, 12, 12, 20)
    x = block(x, 'BatchNorm_1')  # (B, 6, 6, 20)
    x = x.reshape(x.shape[0], -1)  # (B, 720)
    x = nn.relu(dense(50, name='Dense_0')(x))
    return nn.relu(dense(self.features, name='Dense_1')(x))  # (B, H)


def _conv_valid(x: Array, kernel: Array) -> Array:
  """nn.Conv's VALID, stride-1 convolution (NHWC, HWIO), without bias."""
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def multimnist_experts_eval(
  variables: Mapping[str, Any],
  x: Array,
  experts: Sequence[int],
  epsilon: float = 1e-5,
  conv_relu_pool: Optional[Callable[[Array, Array, Array], Array]] = None,
) -> Array:
  """MultiMNISTExperts ``experts`` in evaluation mode, as one computation.

  ``variables``: an ExpertBank's (``params`` and ``batch_stats`` of
  ``expert_<e>``); ``x`` (B, H, W, 1) -> (E', B, H_out). The function of
  each expert with running averages, arranged for speed:
  - each BatchNorm, an affine map in evaluation, is folded into the
    convolution before it: kernel * s, (bias - mean) * s + beta with
    s = scale / sqrt(var + epsilon);
  - the experts' first convolutions all read the same image, so they run
    as one convolution with E' * F0 output channels, then ReLU and pooling
    on all of them at once;
  - the rest (second convolution, pooling, the dense layers) per expert.
  ``conv_relu_pool``: None (XLA's convolutions), or a function computing
  ``max_pool_2x2(relu(conv(x, kernel) + bias))`` per group, (B, H, W, G Cg),
  (G, kh, kw, Cg, Fg), (G, Fg) -> (B, H', W', G Fg), which then runs both
  blocks, the second for all experts at once (``cpu.kernels.
  conv_relu_pool``). Equal to the loop up to float rounding (the folding
  reorders it; tested), and faster on the CPU (docs/performance.md).
  """
  params, stats = variables['params'], variables['batch_stats']

  def folded(e, i):
    conv = params[f'expert_{e}'][f'Conv_{i}']
    bn = params[f'expert_{e}'][f'BatchNorm_{i}']
    st = stats[f'expert_{e}'][f'BatchNorm_{i}']
    mul = jax.lax.rsqrt(st['var'] + epsilon) * bn['scale']
    return conv['kernel'] * mul, (conv['bias'] - st['mean']) * mul + bn['bias']

  first = [folded(e, 0) for e in experts]
  kernel = jnp.concatenate([k for k, _ in first], axis=-1)  # (5, 5, 1, E' F0)
  bias = jnp.concatenate([b for _, b in first])  # (E' F0,)
  width = first[0][0].shape[-1]  # F0
  second = [folded(e, 1) for e in experts]
  if conv_relu_pool is None:
    y = max_pool_2x2(nn.relu(_conv_valid(x, kernel) + bias))
    pooled = []  # E' x (B, 6, 6, F1)
    for i, (k, b) in enumerate(second):
      z = y[..., i * width : (i + 1) * width]  # (B, 16, 16, F0)
      pooled.append(max_pool_2x2(nn.relu(_conv_valid(z, k) + b)))
  else:
    y = conv_relu_pool(x, kernel[None], bias[None])  # (B, 16, 16, E' F0)
    z = conv_relu_pool(
      y, jnp.stack([k for k, _ in second]), jnp.stack([b for _, b in second])
    )  # (B, 6, 6, E' F1)
    out = second[0][0].shape[-1]  # F1
    pooled = [z[..., i * out : (i + 1) * out] for i in range(len(experts))]
  outputs = []
  for e, z in zip(experts, pooled):
    z = z.reshape(z.shape[0], -1)  # (B, 720)
    for layer in ('Dense_0', 'Dense_1'):
      dense = params[f'expert_{e}'][layer]
      z = nn.relu(z @ dense['kernel'] + dense['bias'])
    outputs.append(z)  # (B, H_out)
  return jnp.stack(outputs)  # (E', B, H_out)


class MLPTower(nn.Module):
  """Dense(50)-ReLU-Dense(50)-ReLU-Dense(C): a task's head, returning logits.

  The softmax lives in the loss only (PaddleRec applies one here and another
  in its loss).
  """

  num_classes: int = 10
  hidden: tuple[int, ...] = (50, 50)
  init_scheme: str = 'flax'  # Or 'paddlerec': truncated_normal_fan_in kernels.

  def __post_init__(self):
    _check_init(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    del train  # No dropout or BatchNorm in the tower.
    dense = functools.partial(
      nn.Dense,
      kernel_init=(
        truncated_normal_fan_in
        if self.init_scheme == 'paddlerec'
        else nn.initializers.lecun_normal()
      ),
    )
    for i, width in enumerate(self.hidden):
      x = nn.relu(dense(width, name=f'Dense_{i}')(x))
    return dense(self.num_classes, name=f'Dense_{len(self.hidden)}')(x)


class ExpertBank(nn.Module):
  """All E experts on a shared input, stacked: ``(B, ...) -> (E, B, H)``.

  The one place where the experts are computed: E ``expert`` modules, one
  after another (any expert module), or only the ``active`` ones. With
  ``fused_eval`` (MultiMNISTExperts only), evaluation computes the same
  function from the same variables as one computation instead
  (``multimnist_experts_eval``, its blocks by ``eval_block``: None for XLA's
  convolutions, or ``cpu.kernels.conv_relu_pool``); training and
  initialization are the loop.
  """

  num_experts: int
  expert: ModuleFactory = MultiMNISTExpert
  expert_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  active: Optional[tuple[int, ...]] = None
  fused_eval: bool = False
  eval_block: Optional[Callable[[Array, Array, Array], Array]] = None

  def __post_init__(self):
    if self.fused_eval and self.expert is not MultiMNISTExpert:
      raise ValueError(
        f'{type(self).__name__}: fused_eval computes MultiMNISTExperts only, '
        f'not {getattr(self.expert, "__name__", self.expert)}; set '
        'fused_eval=False.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    active = range(self.num_experts) if self.active is None else self.active
    if self.fused_eval and not train and not self.is_initializing():
      check_images(x, type(self).__name__)
      return multimnist_experts_eval(
        self.variables, x, tuple(active), conv_relu_pool=self.eval_block
      )
    outputs = [
      self.expert(**self.expert_kwargs, name=f'expert_{e}')(x, train=train)
      for e in active
    ]
    return jnp.stack(outputs)  # (E, B, H), or (len(active), B, H)


class _OneExpert(nn.Module):
  """One expert with ``train`` fixed: what VmappedExpertBank maps."""

  expert: ModuleFactory
  expert_kwargs: Mapping[str, Any]
  train: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self.expert(**self.expert_kwargs, name='expert')(x, train=self.train)


class VmappedExpertBank(ExpertBank):
  """ExpertBank's function as one ``nn.vmap`` over the experts:
  ``(B, ...) -> (E, B, H)``.

  Every variable gets a leading expert axis instead of one subtree per
  expert: ``experts/expert/expert/Conv_0/kernel`` has shape
  ``(E, 5, 5, 1, 10)`` (``stack_expert_variables`` converts the loop's).
  XLA sees the E experts as one batched computation, which is what a GPU
  wants; the CPU paths (``cpu.ToeplitzConv``, the FFI kernels) are not
  vmapped. ``active`` keeps
  only those experts' outputs, computing all of them. Checked on the CPU
  against ExpertBank; not yet run on a GPU. Its attributes are ExpertBank's.
  """

  def __post_init__(self):
    if self.fused_eval:
      raise ValueError(
        'VmappedExpertBank: fused_eval is for the loop (ExpertBank); set '
        'fused_eval=False.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    bank = nn.vmap(
      _OneExpert,
      variable_axes={'params': 0, 'batch_stats': 0},
      split_rngs={'params': True},
      in_axes=None,
      out_axes=0,
      axis_size=self.num_experts,
    )
    out = bank(self.expert, self.expert_kwargs, train, name='expert')(x)
    if self.active is not None:
      out = out[jnp.asarray(self.active)]
    return out  # (E, B, H), or (len(active), B, H)


EXPERT_BANKS = {'loop': ExpertBank, 'vmap': VmappedExpertBank}


def stack_expert_variables(variables, num_experts: int):
  """A MultiTaskMoE's variables with ExpertBank's experts (``experts/
  expert_<e>/...``) -> the same with VmappedExpertBank's (``experts/expert/
  expert/...``, each leaf stacked over e). Other entries are kept."""

  def convert(tree):
    if not isinstance(tree, Mapping) or 'experts' not in tree:
      return tree
    bank = tree['experts']
    per_expert = [bank[f'expert_{e}'] for e in range(num_experts)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_expert)
    return {**tree, 'experts': {'expert': {'expert': stacked}}}

  return {name: convert(tree) for name, tree in variables.items()}


class MultiTaskMoE(nn.Module):
  """Multi-gate mixture of experts (Ma et al. 2018; the paper's Section 5).

  Each task t mixes the shared experts with its gate's weights and feeds the
  mixture to its own tower: logits_t = tower_t(sum_e a_{t,e} f_e(x)).

  Attributes:
    num_tasks: T >= 1.
    num_experts: E >= 2.
    gate: gate name, a key of ``gates.GATES``.
    gate_kwargs: keyword arguments of the gate (``k``, ``gamma``,
      ``per_example``...).
    shared_gate: one gate for all tasks (PaddleRec's setup) instead of one per
      task (the paper's).
    routing_input: what a per-example gate routes on: ``'input'``, the
      flattened model input, or ``'experts'``, the mean of the expert outputs.
    num_classes: C, classes per task.
    expert, expert_kwargs: the expert module factory and its arguments.
    tower, tower_kwargs: the tower module factory and its arguments (it gets
      ``num_classes`` too).
    active_experts: compute only these experts (sorted indices), as when
      every static gate gives the others weight exactly 0: the output is the
      dense one, for a fraction of the cost. None computes all.
    expert_bank: ``'loop'`` (ExpertBank: one module per expert) or
      ``'vmap'`` (VmappedExpertBank: the same function, stacked variables).
    fused_eval: the loop's MultiMNISTExperts evaluated as one computation
      (``multimnist_experts_eval``): the same function, faster.
    eval_block: with ``fused_eval``, what computes each convolution-ReLU-pool
      block: None (XLA's ops) or ``cpu.kernels.conv_relu_pool`` (CPU only).
    bn_axis_name: passed to the expert when it takes ``bn_axis_name``.

  Returns ``(logits, aux)`` with logits ``(T, B, C)`` and aux holding
  ``expert_weights`` (``(T, E)`` static, ``(T, B, E)`` per-example) and
  ``gate``, a dict of each auxiliary term stacked over gates, ``(G, ...)``.
  """

  num_tasks: int = 2
  num_experts: int = 8
  gate: str = 'dselect_k'
  gate_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  shared_gate: bool = False
  routing_input: str = 'input'
  num_classes: int = 10
  expert: ModuleFactory = MultiMNISTExpert
  expert_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  tower: ModuleFactory = MLPTower
  tower_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  active_experts: Optional[tuple[int, ...]] = None
  bn_axis_name: Optional[str] = None
  expert_bank: str = 'loop'
  fused_eval: bool = False
  eval_block: Optional[Callable[[Array, Array, Array], Array]] = None

  def __post_init__(self):
    if self.expert_bank not in EXPERT_BANKS:
      raise ValueError(
        f'MultiTaskMoE: expert_bank must be one of {sorted(EXPERT_BANKS)}, '
        f'got {self.expert_bank!r}.'
      )
    if self.active_experts is not None and self.per_example:
      raise ValueError(
        'MultiTaskMoE: active_experts needs static gates; a '
        'per-example gate can pick any expert.'
      )
    if self.num_tasks < 1:
      raise ValueError(
        f'MultiTaskMoE: num_tasks must be >= 1, got num_tasks={self.num_tasks}.'
      )
    if self.gate not in gates_lib.GATES:
      raise ValueError(
        f'MultiTaskMoE: unknown gate {self.gate!r}; choose one '
        f'of {sorted(gates_lib.GATES)}.'
      )
    if self.routing_input not in ('input', 'experts'):
      raise ValueError(
        f'MultiTaskMoE: routing_input must be "input" or '
        f'"experts", got {self.routing_input!r}.'
      )
    # Builds one gate now so that bad gate arguments fail at construction.
    gates_lib.make_gate(
      self.gate, self.num_experts, **self.gate_kwargs, parent=None
    )
    super().__post_init__()

  @property
  def per_example(self) -> bool:
    return bool(self.gate_kwargs.get('per_example', False))

  @nn.compact
  def __call__(self, x: Array, *, train: bool):
    check_batch(x, 'MultiTaskMoE')  # Each expert checks its own input shape.
    expert_kwargs = dict(self.expert_kwargs)
    if self.bn_axis_name is not None:
      expert_kwargs.setdefault('bn_axis_name', self.bn_axis_name)
    experts = EXPERT_BANKS[self.expert_bank](
      self.num_experts,
      self.expert,
      flax.core.FrozenDict(expert_kwargs),
      active=self.active_experts,
      fused_eval=self.fused_eval,
      eval_block=self.eval_block,
      name='experts',
    )(x, train=train)  # (E', B, H)

    routing = None
    if self.per_example:
      if self.routing_input == 'input':
        routing = x.reshape(x.shape[0], -1)  # (B, D)
      else:
        routing = jnp.mean(experts, axis=0)  # (B, H)
    call_kwargs = {'deterministic': not train} if self.gate == 'top_k' else {}

    num_gates = 1 if self.shared_gate else self.num_tasks
    weights, gate_aux = [], []
    for g in range(num_gates):
      gate = gates_lib.make_gate(
        self.gate, self.num_experts, **self.gate_kwargs, name=f'gate_{g}'
      )
      w, aux = gate(routing, **call_kwargs)  # w: (E,) or (B, E)
      weights.append(w)
      gate_aux.append(aux)
    weights = [weights[0]] * self.num_tasks if self.shared_gate else weights

    logits = []
    for t in range(self.num_tasks):
      if self.per_example:
        mixed = jnp.einsum('be,ebh->bh', weights[t], experts)  # (B, H)
      elif self.active_experts is not None:
        used = weights[t][jnp.asarray(self.active_experts)]  # (E',)
        mixed = jnp.einsum('e,ebh->bh', used, experts)  # (B, H)
      else:
        mixed = jnp.einsum('e,ebh->bh', weights[t], experts)  # (B, H)
      tower = self.tower(
        num_classes=self.num_classes, **self.tower_kwargs, name=f'tower_{t}'
      )
      logits.append(tower(mixed, train=train))  # (B, C)

    aux = {
      'expert_weights': jnp.stack(weights),  # (T, E) or (T, B, E)
      'gate': jax.tree.map(lambda *xs: jnp.stack(xs), *gate_aux),  # (G, ...)
    }
    return jnp.stack(logits), aux  # (T, B, C)


class MLPExpert(nn.Module):
  """Dense-ReLU layers, ``(B, F) -> (B, H)``: an expert on feature vectors.

  Attributes:
    hidden: widths of the layers before the last.
    features: H, the output width.
  """

  hidden: tuple[int, ...] = (64,)
  features: int = 32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    del train  # No dropout or BatchNorm.
    check_batch(x, 'MLPExpert')
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f'Dense_{i}')(x))
    return nn.relu(nn.Dense(self.features, name=f'Dense_{len(self.hidden)}')(x))


class FeatureEmbedding(nn.Module):
  """Categorical features embedded, then concatenated with the dense ones:
  ``({name: (B,) int}, (B, D)) -> (B, F)``, F = len(cardinalities) * dim + D,
  the embeddings in the order of ``cardinalities``.

  Attributes:
    cardinalities: (name, number of values) of each categorical feature; its
      ids run from 0 to that number - 1 (out-of-range ids are clamped by
      ``nn.Embed``'s lookup, so the data must keep to the range).
    dim: width of every embedding.
  """

  cardinalities: tuple[tuple[str, int], ...]
  dim: int = 8

  def __post_init__(self):
    bad = [(n, c) for n, c in self.cardinalities if not c >= 1]
    if not self.cardinalities or bad or self.dim < 1:
      raise ValueError(
        'FeatureEmbedding: needs at least one (name, cardinality >= 1) and '
        f'dim >= 1; got cardinalities={self.cardinalities!r}, dim={self.dim}.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, categorical: Mapping[str, Array], dense: Array) -> Array:
    missing = [n for n, _ in self.cardinalities if n not in categorical]
    if missing:
      raise ValueError(
        f'FeatureEmbedding: categorical features {missing} are missing; '
        f'got {sorted(categorical)}.'
      )
    parts = [
      nn.Embed(card, self.dim, name=f'embed_{name}')(categorical[name])
      for name, card in self.cardinalities
    ]  # each (B, dim)
    return jnp.concatenate([*parts, dense.astype(parts[0].dtype)], axis=-1)


class RecommenderMoE(nn.Module):
  """A multi-task recommender: embedded features, MLP experts, one gate and
  one tower per task, one output per task (a logit or a value).

  ``(categorical, dense) -> (outputs (T, B), aux)``; aux as MultiTaskMoE's.
  Per-example gates route on the embedded features.

  Attributes:
    num_tasks: T.
    cardinalities, embed_dim: of the FeatureEmbedding.
    num_experts, gate, gate_kwargs, shared_gate, active_experts: as
      MultiTaskMoE's (its variables are under ``moe``).
    expert_kwargs: MLPExpert's (``hidden``, ``features``).
    tower_hidden: widths of each task's tower before its single output.
  """

  num_tasks: int
  cardinalities: tuple[tuple[str, int], ...]
  embed_dim: int = 8
  num_experts: int = 8
  gate: str = 'dselect_k'
  gate_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  shared_gate: bool = False
  expert_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  tower_hidden: tuple[int, ...] = (32,)
  active_experts: Optional[tuple[int, ...]] = None

  @property
  def per_example(self) -> bool:
    return bool(self.gate_kwargs.get('per_example', False))

  @nn.compact
  def __call__(self, categorical, dense: Array, *, train: bool):
    check_batch(dense, 'RecommenderMoE')
    x = FeatureEmbedding(self.cardinalities, self.embed_dim, name='embed')(
      categorical, dense
    )  # (B, F)
    outputs, aux = MultiTaskMoE(
      num_tasks=self.num_tasks,
      num_experts=self.num_experts,
      gate=self.gate,
      gate_kwargs=self.gate_kwargs,
      shared_gate=self.shared_gate,
      routing_input='input',
      num_classes=1,
      expert=MLPExpert,
      expert_kwargs=self.expert_kwargs,
      tower_kwargs=flax.core.FrozenDict({'hidden': self.tower_hidden}),
      active_experts=self.active_experts,
      name='moe',
    )(x, train=train)  # (T, B, 1)
    return outputs[..., 0], aux  # (T, B)


def gate_params(params) -> Mapping[str, Any]:
  """The variables holding the ``gate_<g>`` entries: a MultiTaskMoE's own,
  a RecommenderMoE's under ``moe``."""
  return params['moe'] if 'moe' in params else params


def active_experts(expert_weights) -> tuple[int, ...]:
  """Experts with non-zero weight for some task, from static weights (T, E)."""
  weights = np.asarray(expert_weights)
  return tuple(int(e) for e in np.flatnonzero(np.any(weights > 0, axis=0)))


def static_expert_weights(model: nn.Module, params) -> np.ndarray:
  """Each task's expert weights (T, E) from the params of a static-gated
  MultiTaskMoE or RecommenderMoE.

  Static gates take no input, so the weights come from the gates' params
  alone, with no expert computed.
  """
  if model.per_example:
    raise ValueError('static_expert_weights: the gates are per-example.')
  params = gate_params(params)
  gate = gates_lib.make_gate(model.gate, model.num_experts, **model.gate_kwargs)
  num_gates = 1 if model.shared_gate else model.num_tasks
  weights = [
    np.asarray(gate.apply({'params': params[f'gate_{g}']})[0])
    for g in range(num_gates)
  ]
  return np.stack(weights * model.num_tasks if model.shared_gate else weights)
