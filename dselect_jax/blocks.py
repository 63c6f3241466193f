"""Pieces shared by the experts and the towers: checks of their attributes
and inputs, 2x2 max pooling and PaddleRec's initializers."""

from __future__ import annotations

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
