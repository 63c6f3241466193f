"""Pieces shared by the experts and the towers: checks of their attributes
and inputs, 2x2 max pooling, BatchNorm over the routed examples and
PaddleRec's initializers."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def check_int(module: nn.Module, name: str, low: int):
  """A clear error, naming the attribute, where ``module.<name>`` is not an
  integer >= ``low``."""
  value = getattr(module, name)
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or value < low
  ):
    raise ValueError(
      f'{type(module).__name__}: {name} must be an integer >= {low}, got '
      f'{name}={value!r}.'
    )


def check_widths(module: nn.Module, name: str):
  """A clear error where ``module.<name>`` is not a tuple of integers >= 1
  (the widths of layers)."""
  value = getattr(module, name)
  if not isinstance(value, (tuple, list)) or not all(
    isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 1
    for w in value
  ):
    raise ValueError(
      f'{type(module).__name__}: {name} must be a tuple of integers >= 1 '
      f'(layer widths), got {name}={value!r}.'
    )


def check_bool(module: nn.Module, name: str):
  value = getattr(module, name)
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(
      f'{type(module).__name__}: {name} must be True or False, got '
      f'{name}={value!r}.'
    )


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
  reshape and a max because XLA:CPU differentiates that faster than
  ``nn.max_pool``'s reduce_window.
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def batch_norm_variables(module: nn.Module, features: int):
  """nn.BatchNorm's variables, declared in ``module`` as nn.BatchNorm
  declares them: params ``scale`` (ones) and ``bias`` (zeros), and the
  running averages batch_stats ``mean`` (zeros) and ``var`` (ones), (F,)
  each. Returns (scale, bias, mean variable, var variable)."""
  shape = (features,)
  scale = module.param('scale', nn.initializers.ones, shape, jnp.float32)
  bias = module.param('bias', nn.initializers.zeros, shape, jnp.float32)
  mean = module.variable('batch_stats', 'mean', jnp.zeros, shape, jnp.float32)
  var = module.variable('batch_stats', 'var', jnp.ones, shape, jnp.float32)
  return scale, bias, mean, var


def update_running_averages(module, ra_mean, ra_var, mean, var, seen=True):
  """nn.BatchNorm's update, m * old + (1 - m) * new with m the module's
  momentum, where ``seen`` (some example counted) and not at
  initialization."""
  if module.is_initializing():
    return
  m = module.momentum
  ra_mean.value = jnp.where(
    seen, m * ra_mean.value + (1 - m) * mean, ra_mean.value
  )
  ra_var.value = jnp.where(seen, m * ra_var.value + (1 - m) * var, ra_var.value)


class RoutedBatchNorm(nn.Module):
  """``nn.BatchNorm`` whose batch statistics are over the examples a mask
  selects: in a mixture of experts, those some task routes to this expert.

  Sparse dispatch computes an expert only on its routed examples (and on
  padding), so batch statistics over the whole batch are not available
  there; this is the function both the dispatched and the dense step
  compute, so that they agree: each expert normalizes by the mean and
  variance of what it actually mixes in. Before per-example gates
  saturate every example is routed to every expert and this is
  nn.BatchNorm. Across devices (``axis_name``) the sums and the counts
  are summed, so a device with fewer routed examples weighs less (where
  nn.BatchNorm's ``pmean`` of per-device means weighs devices equally, the
  same when every example counts). With no routed example anywhere the
  output is (x * rsqrt(epsilon)) * scale + bias, which the mixture weighs
  0, and the running averages keep their values.

  Same variables as nn.BatchNorm (params ``scale``, ``bias``;
  batch_stats ``mean``, ``var``) and the same arithmetic (the biased
  variance as E[x^2] - E[x]^2, Flax's fast variance; the running
  averages updated as m * old + (1 - m) * new, not at initialization),
  so a checkpoint trained with either runs with the other.

  Attributes:
    use_running_average: normalize with the running averages
      (evaluation; the mask is then unused) instead of the statistics of
      the routed examples (training, which updates them).
    momentum, epsilon, axis_name: as nn.BatchNorm's.
  """

  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    """x (B, ..., F), mask (B,) bool -> (B, ..., F)."""
    features = x.shape[-1]
    if jnp.shape(mask) != x.shape[:1]:
      raise ValueError(
        f'RoutedBatchNorm: the mask must have shape ({x.shape[0]},), one '
        f'entry per example of x {x.shape}; got {jnp.shape(mask)}.'
      )
    scale, bias, ra_mean, ra_var = batch_norm_variables(self, features)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      weight = mask.astype(jnp.float32).reshape(
        mask.shape + (1,) * (x.ndim - 1)
      )
      sums = jnp.stack(
        [jnp.sum(x32 * weight, axes), jnp.sum(x32 * x32 * weight, axes)]
      )
      count = jnp.sum(weight) * np.prod(x.shape[1:-1], dtype=np.float32)
      if self.axis_name is not None:
        sums, count = jax.lax.psum((sums, count), self.axis_name)
      mean, mean_square = sums / jnp.maximum(count, 1.0)
      var = jnp.maximum(0.0, mean_square - mean * mean)
      update_running_averages(self, ra_mean, ra_var, mean, var, count > 0)
    # nn.BatchNorm's order: (x - mean) * (rsqrt(var + eps) * scale) + bias.
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    return ((x - mean) * mul + bias).astype(x.dtype)


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


def check_init(module: nn.Module):
  if module.init_scheme not in INITS:
    raise ValueError(
      f'{type(module).__name__}: init_scheme must be one of '
      f'{INITS}, got init_scheme={module.init_scheme!r}.'
    )
