"""The experts and the banks that run them: ``(B, ...) -> (E, B, H)``.

Shape legend (as in gates.py):
  B: batch   E: experts   H: expert output features

``MultiMNISTExpert`` is the CNN of PaddleRec's DSelect-k model, with
BatchNorm after each convolution; it owns its fast evaluation
(``MultiMNISTExpert.evaluate_bank``), which the bank calls when asked.
``MLPExpert`` is the feature data sets' expert. ``ExpertBank`` runs E
experts one after another, ``VmappedExpertBank`` as one ``nn.vmap``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dselect_jax.blocks import RoutedBatchNorm
from dselect_jax.blocks import check_batch
from dselect_jax.blocks import check_images
from dselect_jax.blocks import check_init
from dselect_jax.blocks import check_int
from dselect_jax.blocks import check_widths
from dselect_jax.blocks import max_pool_2x2
from dselect_jax.blocks import truncated_normal_fan_in
from dselect_jax.blocks import xavier_normal

Array = jax.Array
ModuleFactory = Callable[..., nn.Module]


def _conv_valid(x: Array, kernel: Array, groups: int = 1) -> Array:
  """nn.Conv's VALID, stride-1 convolution (NHWC, HWIO), without bias;
  ``groups`` splits the channels as ``feature_group_count``."""
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
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
      holds the same variables. Called on ``(x)``, or ``(x, mask)`` for
      statistics over the masked examples (``__call__``'s ``mask``).
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
  # The layers' names: they name the variables (and so the checkpoints),
  # and evaluate_bank reads each layer's variables through them.
  CONVS = ('Conv_0', 'Conv_1')
  NORMS = ('BatchNorm_0', 'BatchNorm_1')
  DENSES = ('Dense_0', 'Dense_1')
  EPSILON = 1e-5  # BatchNorm's.
  # Its training normalizes over a batch: a mask can restrict that to the
  # examples routed to it (``__call__``'s ``mask``).
  BATCH_STATISTICS = True

  def __post_init__(self):
    check_int(self, 'features', 1)
    check_init(self)
    super().__post_init__()

  @nn.compact
  def __call__(
    self, x: Array, *, train: bool, mask: Optional[Array] = None
  ) -> Array:
    """x (B, H, W, 1) -> (B, features). ``mask`` (B,) bool: in training,
    each BatchNorm's statistics are over these examples of this device
    only (``blocks.RoutedBatchNorm``, or ``block_module`` called with the
    mask: sparse dispatch, where the expert sees its routed examples and
    padding); unused with running averages. Not summed over
    ``bn_axis_name``: the dispatched step computes them inside a
    conditional, and under pmap XLA:CPU ran all-reduces there beside the
    step's others, which met at the same rendezvous (crashes on 4
    devices)."""
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
      epsilon=self.EPSILON,
      axis_name=self.bn_axis_name,
    )
    routed = {**bn, 'axis_name': None}  # This device's (see the docstring).
    if train and mask is not None and self.block_module is None:
      block = lambda x, name: max_pool_2x2(
        nn.relu(RoutedBatchNorm(**routed, name=name)(x, mask))
      )
    elif train and mask is not None:
      block = lambda x, name: self.block_module(**routed, name=name)(x, mask)
    elif self.block_module is None:
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
    x = conv(10, self.CONVS[0])(x)  # (B, 32, 32, 10)
    x = block(x, self.NORMS[0])  # (B, 16, 16, 10)
    x = conv(20, self.CONVS[1])(x)  # (B, 12, 12, 20)
    x = block(x, self.NORMS[1])  # (B, 6, 6, 20)
    x = x.reshape(x.shape[0], -1)  # (B, 720)
    x = nn.relu(dense(50, name=self.DENSES[0])(x))
    return nn.relu(dense(self.features, name=self.DENSES[1])(x))  # (B, H)

  @staticmethod
  def evaluate_bank(
    variables: Mapping[str, Any],
    x: Array,
    experts: Sequence[int],
    conv_relu_pool: Optional[Callable[[Array, Array, Array], Array]] = None,
    per_expert_inputs: bool = False,
  ) -> Array:
    """MultiMNISTExperts ``experts`` in evaluation mode, as one computation.

    ``variables``: an ExpertBank's (``params`` and ``batch_stats`` of
    ``expert_<e>``); ``x`` (B, H, W, 1) -> (E', B, H_out), or with
    ``per_expert_inputs`` (E', C, H, W, 1), row e for the e-th expert
    (sparse dispatch) -> (E', C, H_out). The function of each expert with
    running averages, arranged for speed:
    - each BatchNorm, an affine map in evaluation, is folded into the
      convolution before it: kernel * s, (bias - mean) * s + beta with
      s = scale / sqrt(var + EPSILON);
    - the experts' first convolutions all read the same image, so they run
      as one convolution with E' * F0 output channels, then ReLU and pooling
      on all of them at once (per-expert inputs: the images of the experts
      as E' input channels, a grouped convolution, one group per expert);
    - the rest per expert: the second convolution and pooling, and the
      dense layers as one batched matmul over the experts' stacked
      kernels (fewer, larger operations than a matmul per expert).
    ``conv_relu_pool``: None (XLA's convolutions), or a function computing
    ``max_pool_2x2(relu(conv(x, kernel) + bias))`` per group, (B, H, W, G Cg),
    (G, kh, kw, Cg, Fg), (G, Fg) -> (B, H', W', G Fg), which then runs both
    blocks, the second for all experts at once (``cpu.kernels.
    conv_relu_pool``). Equal to the loop up to float rounding (the folding
    reorders it; tested), and faster on the CPU (docs/performance.md).
    """
    params, stats = variables['params'], variables['batch_stats']

    layers = MultiMNISTExpert

    def folded(e, i):
      conv = params[f'expert_{e}'][layers.CONVS[i]]
      bn = params[f'expert_{e}'][layers.NORMS[i]]
      st = stats[f'expert_{e}'][layers.NORMS[i]]
      mul = jax.lax.rsqrt(st['var'] + layers.EPSILON) * bn['scale']
      return conv['kernel'] * mul, (conv['bias'] - st['mean']) * mul + bn[
        'bias'
      ]

    first = [folded(e, 0) for e in experts]
    kernel = jnp.concatenate([k for k, _ in first], axis=-1)  # (5, 5, 1, E' F0)
    bias = jnp.concatenate([b for _, b in first])  # (E' F0,)
    width = first[0][0].shape[-1]  # F0
    second = [folded(e, 1) for e in experts]
    groups = 1
    if per_expert_inputs:  # (E', C, H, W, 1) -> (C, H, W, E').
      groups = len(experts)
      x = jnp.moveaxis(x[..., 0], 0, -1)
    if conv_relu_pool is None:
      y = max_pool_2x2(nn.relu(_conv_valid(x, kernel, groups) + bias))
      pooled = []  # E' x (B, 6, 6, F1)
      for i, (k, b) in enumerate(second):
        z = y[..., i * width : (i + 1) * width]  # (B, 16, 16, F0)
        pooled.append(max_pool_2x2(nn.relu(_conv_valid(z, k) + b)))
      pooled = jnp.stack(pooled)  # (E', B, 6, 6, F1)
    else:
      y = conv_relu_pool(  # (B, 16, 16, E' F0)
        x,
        jnp.moveaxis(kernel.reshape(*kernel.shape[:3], groups, -1), 3, 0),
        bias.reshape(groups, -1),
      )
      z = conv_relu_pool(
        y, jnp.stack([k for k, _ in second]), jnp.stack([b for _, b in second])
      )  # (B, 6, 6, E' F1)
      # (B, 6, 6, E' F1) -> (E', B, 6, 6, F1).
      pooled = jnp.moveaxis(z.reshape(*z.shape[:3], len(experts), -1), 3, 0)
    z = pooled.reshape(*pooled.shape[:2], -1)  # (E', B, 720)
    for layer in layers.DENSES:  # One batched matmul over the experts.
      dense = [params[f'expert_{e}'][layer] for e in experts]
      kernel = jnp.stack([d['kernel'] for d in dense])  # (E', F, H)
      bias = jnp.stack([d['bias'] for d in dense])  # (E', H)
      z = nn.relu(jnp.einsum('ebf,efh->ebh', z, kernel) + bias[:, None])
    return z  # (E', B, H_out)


class ExpertBank(nn.Module):
  """All E experts on a shared input, stacked: ``(B, ...) -> (E, B, H)``.

  The one place where the experts are computed: E ``expert`` modules, one
  after another (any expert module), or only the ``active`` ones. With
  ``fused_eval``, evaluation computes the same function from the same
  variables as one computation instead, the expert's own
  ``evaluate_bank`` (MultiMNISTExpert has one), its blocks by
  ``eval_block``: None for XLA's convolutions, or
  ``cpu.kernels.conv_relu_pool``; training and initialization are the loop.
  """

  num_experts: int
  expert: ModuleFactory = MultiMNISTExpert
  expert_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  active: Optional[tuple[int, ...]] = None
  fused_eval: bool = False
  eval_block: Optional[Callable[[Array, Array, Array], Array]] = None

  def __post_init__(self):
    check_int(self, 'num_experts', 1)
    if self.fused_eval and not hasattr(self.expert, 'evaluate_bank'):
      raise ValueError(
        f'{type(self).__name__}: fused_eval needs an expert with '
        f'evaluate_bank (MultiMNISTExpert), not '
        f'{getattr(self.expert, "__name__", self.expert)}; set '
        'fused_eval=False.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(
    self,
    x: Array | Mapping[int, Array],
    *,
    train: bool,
    per_expert_inputs: bool = False,
    mask: Optional[Array | Mapping[int, Array]] = None,
  ) -> Array | dict[int, Array]:
    """``x`` (B, ...) shared by the experts, or with
    ``per_expert_inputs`` (E', C, ...), row e for the e-th computed expert
    (sparse dispatch, ``dispatch.gather``) -> (E', B or C, H). ``mask``
    (E', B or C) bool: in training, the examples each expert's batch
    statistics are over (experts with ``BATCH_STATISTICS``: the routed
    ones, ``MultiTaskMoE.routed_statistics``).

    Or ``x`` a mapping {e: (C_e, ...)}, each expert's own rows (a bucket
    per expert, ``dispatch.bucket_rows``), ``mask`` likewise {e: (C_e,)}
    -> {e: (C_e, H)}: only those experts computed (each one an ``active``
    one). The batched ways (``fused_eval``, ``padded_bank``) run once per
    group of experts with buckets of one size."""
    active = range(self.num_experts) if self.active is None else self.active
    if isinstance(x, Mapping):
      _check_buckets(self, x, mask, active)
      batched = None  # Else the loop, which also creates the variables.
      initializing = self.is_initializing()
      if not initializing and hasattr(self.expert, 'padded_bank'):
        batched = self.expert.padded_bank
      elif not initializing and self.fused_eval and not train:
        batched = functools.partial(
          self.expert.evaluate_bank,
          conv_relu_pool=self.eval_block,
          per_expert_inputs=True,
        )
      outputs = {}
      if batched is not None:
        for size in sorted({rows.shape[0] for rows in x.values()}):
          group = tuple(e for e in sorted(x) if x[e].shape[0] == size)
          stacked = jnp.stack([x[e] for e in group])  # (E_g, C_e, ...)
          outputs.update(zip(group, batched(self.variables, stacked, group)))
        return outputs
      for e in sorted(x):
        masked = {} if mask is None or not train else {'mask': mask[e]}
        outputs[e] = self.expert(**self.expert_kwargs, name=f'expert_{e}')(
          x[e], train=train, **masked
        )
      return outputs
    _check_mask(self, mask, x, len(active), per_expert_inputs)
    # Each expert's row of the mask, where one is given and used.
    masked = lambda i: {} if mask is None or not train else {'mask': mask[i]}
    if (
      per_expert_inputs
      and hasattr(self.expert, 'padded_bank')
      and not self.is_initializing()
    ):
      return self.expert.padded_bank(self.variables, x, tuple(active))
    if self.fused_eval and not train and not self.is_initializing():
      if not per_expert_inputs:
        check_images(x, type(self).__name__)
      return self.expert.evaluate_bank(
        self.variables,
        x,
        tuple(active),
        conv_relu_pool=self.eval_block,
        per_expert_inputs=per_expert_inputs,
      )
    outputs = []
    for i, e in enumerate(active):
      inputs = x[i] if per_expert_inputs else x
      outputs.append(
        self.expert(**self.expert_kwargs, name=f'expert_{e}')(
          inputs, train=train, **masked(i)
        )
      )
    return jnp.stack(outputs)  # (E', B or C, H)


def _check_statistics(bank):
  """A clear error for a mask given to experts without batch statistics."""
  if not getattr(bank.expert, 'BATCH_STATISTICS', False):
    raise ValueError(
      f'{type(bank).__name__}: a mask restricts batch statistics, and '
      f'{getattr(bank.expert, "__name__", bank.expert)} has none; pass '
      'mask=None.'
    )


def _check_mask(bank, mask, x, num_experts: int, per_expert_inputs: bool):
  """A clear error for a mask the bank cannot use: experts without batch
  statistics, or not one row per computed expert and input example."""
  if mask is None:
    return
  _check_statistics(bank)
  rows = x.shape[1] if per_expert_inputs else x.shape[0]
  if jnp.shape(mask) != (num_experts, rows):
    raise ValueError(
      f'{type(bank).__name__}: the mask must have shape ({num_experts}, '
      f'{rows}), one row per computed expert and one entry per example; '
      f'got {jnp.shape(mask)}.'
    )


def _check_buckets(bank, x, mask, active):
  """A clear error for a bucket per expert the bank cannot run: experts
  it does not compute, or a mask not one entry per row of each."""
  unknown = sorted(set(x) - set(active))
  if not x or unknown:
    raise ValueError(
      f'{type(bank).__name__}: a bucket per expert needs at least one '
      f'expert, each of them computed by the bank ({tuple(active)}); got '
      f'{sorted(x)}.'
    )
  if mask is None:
    return
  _check_statistics(bank)
  shapes = {e: jnp.shape(m) for e, m in dict(mask).items()}
  if shapes != {e: (rows.shape[0],) for e, rows in x.items()}:
    raise ValueError(
      f'{type(bank).__name__}: with a bucket per expert the mask must map '
      'the same experts to one entry per row of theirs; got shapes '
      f'{shapes} for inputs of '
      f'{ {e: rows.shape[0] for e, rows in x.items()} } rows.'
    )


class _OneExpert(nn.Module):
  """One expert with ``train`` fixed: what VmappedExpertBank maps."""

  expert: ModuleFactory
  expert_kwargs: Mapping[str, Any]
  train: bool

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    masked = {} if mask is None or not self.train else {'mask': mask}
    return self.expert(**self.expert_kwargs, name='expert')(
      x, train=self.train, **masked
    )


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
  def __call__(
    self,
    x: Array,
    *,
    train: bool,
    per_expert_inputs: bool = False,
    mask: Optional[Array] = None,
  ) -> Array:
    if isinstance(x, Mapping):
      raise ValueError(
        'VmappedExpertBank: a bucket per expert runs the experts one by one; '
        'use the loop bank (ExpertBank).'
      )
    if (per_expert_inputs or mask is not None) and self.active is not None:
      raise ValueError(
        'VmappedExpertBank: per-expert inputs and masks are for all '
        'experts; active must be None.'
      )
    _check_mask(self, mask, x, self.num_experts, per_expert_inputs)
    x_axis = 0 if per_expert_inputs else None
    bank = nn.vmap(
      _OneExpert,
      variable_axes={'params': 0, 'batch_stats': 0},
      split_rngs={'params': True},
      in_axes=x_axis if mask is None else (x_axis, 0),
      out_axes=0,
      axis_size=self.num_experts,
    )
    inputs = (x,) if mask is None else (x, mask)
    out = bank(self.expert, self.expert_kwargs, train, name='expert')(*inputs)
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


class MLPExpert(nn.Module):
  """Dense-ReLU layers, ``(B, F) -> (B, H)``: an expert on feature vectors.

  Attributes:
    hidden: widths of the layers before the last.
    features: H, the output width.
  """

  hidden: tuple[int, ...] = (64,)
  features: int = 32
  BATCH_STATISTICS = False  # No BatchNorm: a batch's examples are independent.

  def __post_init__(self):
    check_widths(self, 'hidden')
    check_int(self, 'features', 1)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    del train  # No dropout or BatchNorm.
    check_batch(x, 'MLPExpert')
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f'Dense_{i}')(x))
    return nn.relu(nn.Dense(self.features, name=f'Dense_{len(self.hidden)}')(x))

  @staticmethod
  def _stacked_layers(variables, experts: Sequence[int]):
    """Each layer's kernels (E', F, H) and biases (E', H), stacked over
    ``experts`` from an ExpertBank's variables."""
    banks = [variables['params'][f'expert_{e}'] for e in experts]
    names = sorted(banks[0], key=lambda name: int(name.rpartition('_')[2]))
    return [
      (
        jnp.stack([bank[name]['kernel'] for bank in banks]),
        jnp.stack([bank[name]['bias'] for bank in banks]),
      )
      for name in names
    ]

  @staticmethod
  def padded_bank(
    variables: Mapping[str, Any], x: Array, experts: Sequence[int]
  ) -> Array:
    """``experts`` of an ExpertBank, each on its own rows: x (E', C, F) ->
    (E', C, H), each layer one batched matmul over the experts' stacked
    kernels (the same function as each expert's Dense layers; what sparse
    dispatch's padded buckets run)."""
    for kernel, bias in MLPExpert._stacked_layers(variables, experts):
      x = nn.relu(jnp.einsum('ecf,efh->ech', x, kernel) + bias[:, None])
    return x

  @staticmethod
  def block_bank(
    variables: Mapping[str, Any], x: Array, expert: Array, num_experts: int
  ) -> Array:
    """An ExpertBank's experts on blocks of rows, each block one expert's:
    x (N, G, F), ``expert`` (N,) -> (N, G, H), each layer one batched
    matmul over each block's own kernel (``dispatch.block_rows``)."""
    for kernel, bias in MLPExpert._stacked_layers(
      variables, range(num_experts)
    ):
      x = nn.relu(
        jnp.einsum('ngf,nfh->ngh', x, kernel[expert]) + bias[expert][:, None]
      )
    return x

  @staticmethod
  def ragged_bank(
    variables: Mapping[str, Any],
    x: Array,
    expert: Array,
    group_sizes: Array,
  ) -> Array:
    """An ExpertBank's experts on rows sorted by expert: x (M, F), row i
    for expert ``expert[i]`` (``group_sizes`` (E,) rows each, in order;
    ``dispatch.pairs``) -> (M, H), each layer one ``jax.lax.ragged_dot``
    over the stacked kernels. Rows past the groups give ReLU(bias), for
    the caller to mask."""
    experts = range(group_sizes.shape[0])
    for kernel, bias in MLPExpert._stacked_layers(variables, experts):
      x = nn.relu(jax.lax.ragged_dot(x, kernel, group_sizes) + bias[expert])
    return x
