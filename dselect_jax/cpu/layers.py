"""The CPU's fast paths: Toeplitz convolutions, direct convolutions and
BatchNorm-ReLU-pool blocks on the CPU kernels.

Both compute what the XLA path of ``experts.MultiMNISTExpert`` computes, with
the same parameters, so a checkpoint trained with one runs with the other;
``factory.create_model`` plugs them into the expert on the CPU
(``model.conv`` / ``model.norm`` 'auto'). ``models`` never imports this
package.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dselect_jax.blocks import batch_norm_variables
from dselect_jax.blocks import max_pool_2x2
from dselect_jax.blocks import update_running_averages
from dselect_jax.cpu import kernels

Array = jax.Array


def _segment(wo: int, tile: int) -> int:
  """t: the largest divisor of Wo that is <= tile."""
  return max(d for d in range(1, min(tile, wo) + 1) if wo % d == 0)


def toeplitz_matrix(kernel: Array, t: int) -> Array:
  """T (kh U C, t F) of a (kh, kw, C, F) kernel: see toeplitz_conv."""
  kh, kw, c, f = kernel.shape
  u = t + kw - 1
  # shift[dx, i, o] = 1 where input column i of a segment meets output column
  # o through kernel column dx = i - o.
  shift = np.zeros((kw, u, t), np.float32)
  for dx in range(kw):
    shift[dx, np.arange(t) + dx, np.arange(t)] = 1
  toeplitz = jnp.einsum('xuo,yxcf->yucof', shift, kernel)
  return toeplitz.reshape(kh * u * c, t * f)


def toeplitz_conv(
  x: Array,
  kernel: Array,
  tile: int = 4,
  bias: Optional[Array] = None,
) -> Array:
  """A VALID, stride-1 2-D convolution computed as matmuls on image rows.

  ``(B, H, W, C), (kh, kw, C, F) -> (B, Ho, Wo, F)``, equal to
  ``lax.conv_general_dilated(x, kernel, (1, 1), 'VALID')`` (NHWC, HWIO) in
  another formulation: each output row is cut into segments of t columns,
  and a segment is one matmul of the kh input rows it sees (t + kw - 1
  columns each, flattened) with a banded (Toeplitz) matrix built from the
  kernel:

    y[b, i, j0 + o, f] = sum_{dy, u, c} x[b, i + dy, j0 + u, c] T[dy, u, c, o, f]
    T[dy, u, c, o, f] = kernel[dy, u - o, c, f] if 0 <= u - o < kw else 0

  The matmuls do (t + kw - 1) / kw times the convolution's FLOPs, but with
  few channels (MultiMNIST's experts have 1 -> 10 -> 20) XLA:CPU runs them
  faster than its convolution, forward and backward (docs/performance.md,
  benchmarks/expert_formulations.py).

  ``bias`` (F,), if given, is added to the matmul's (B, Ho, N, t F) output,
  tiled t times (ToeplitzConv's bias; the same as adding it afterwards).

  Shape legend: Ho = H - kh + 1, Wo = W - kw + 1; N = Wo / t segments of t
  columns (t: the largest divisor of Wo <= tile); U = t + kw - 1 input columns.
  """
  b, h, w, c = x.shape
  kh, kw, _, f = kernel.shape
  ho, wo = h - kh + 1, w - kw + 1
  if ho < 1 or wo < 1:
    raise ValueError(
      f'toeplitz_conv: input {h}x{w} is smaller than the kernel {kh}x{kw}.'
    )
  t = _segment(wo, tile)
  bias = jnp.zeros((f,), x.dtype) if bias is None else bias.astype(x.dtype)
  n, u = wo // t, t + kw - 1
  segments = jnp.stack(
    [x[:, :, j * t : j * t + u] for j in range(n)], axis=2
  )  # (B, H, N, U, C)
  matrix = jnp.concatenate(
    [segments[:, dy : dy + ho].reshape(b, ho, n, u * c) for dy in range(kh)],
    axis=-1,
  )  # (B, Ho, N, kh U C)
  toeplitz = toeplitz_matrix(kernel.astype(x.dtype), t)  # (kh U C, t F)
  y = matrix @ toeplitz + jnp.tile(bias, t)  # (B, Ho, N, t F)
  return y.reshape(b, ho, wo, f)


class ToeplitzConv(nn.Module):
  """``nn.Conv(features, kernel_size, padding='VALID')`` by ``toeplitz_conv``.

  Same parameters (``kernel`` (kh, kw, C, F), ``bias`` (F,), nn.Conv's
  initializers, so the same values from the same key) and outputs as nn.Conv.
  """

  features: int
  kernel_size: tuple[int, int] = (5, 5)
  tile: int = 4
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()

  def __post_init__(self):
    if self.features < 1 or min(self.kernel_size) < 1 or self.tile < 1:
      raise ValueError(
        'ToeplitzConv: features, kernel_size and tile must be '
        f'>= 1, got features={self.features}, kernel_size='
        f'{self.kernel_size}, tile={self.tile}.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = _conv_params(self, x)
    return toeplitz_conv(x, kernel, self.tile, bias)


def _conv_params(conv: nn.Module, x: Array) -> tuple[Array, Array]:
  """nn.Conv's parameters, ``kernel`` (kh, kw, C, F) and ``bias`` (F,),
  declared in ``conv`` (with ``features``, ``kernel_size``, ``kernel_init``)
  as nn.Conv declares them, so the same key gives the same values."""
  kernel = conv.param(
    'kernel', conv.kernel_init, (*conv.kernel_size, x.shape[-1], conv.features)
  )
  bias = conv.param('bias', nn.initializers.zeros, (conv.features,))
  return kernel, bias


class DirectConv(nn.Module):
  """``nn.Conv(features, kernel_size, padding='VALID')`` by ``kernels.conv2d``.

  Same parameters (``kernel`` (kh, kw, C, F), ``bias`` (F,), nn.Conv's
  initializers, so the same values from the same key) and outputs as
  nn.Conv, summed directly by the CPU kernels, forward and backward (no
  matrix of rows, none of the Toeplitz form's extra FLOPs). CPU backend only.
  """

  features: int
  kernel_size: tuple[int, int] = (5, 5)
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()

  def __post_init__(self):
    if self.features < 1 or min(self.kernel_size) < 1:
      raise ValueError(
        'DirectConv: features and kernel_size must be >= 1, got '
        f'features={self.features}, kernel_size={self.kernel_size}.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = _conv_params(self, x)
    return kernels.conv2d(x, kernel.astype(x.dtype), bias.astype(x.dtype))


class BatchNormReLUPool(nn.Module):
  """``max_pool_2x2(nn.relu(nn.BatchNorm(...)(x)))`` on the CPU kernels.

  In training mode one custom call computes the statistics and one the
  normalized, rectified, pooled map, and the backward is two more
  (kernels.bn_relu_pool); with running averages it is plain JAX. The
  variables are nn.BatchNorm's (params ``scale``, ``bias``; batch_stats
  ``mean``, ``var``), updated as nn.BatchNorm updates them, so a checkpoint
  trained with either runs with the other. CPU backend only.

  Attributes:
    use_running_average: normalize with the running averages (evaluation)
      instead of the batch statistics (training, which updates them).
    momentum, epsilon, axis_name: as nn.BatchNorm's.
  """

  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    """(B, H, W, C) -> (B, H/2, W/2, C). ``mask`` (B,) bool: in training,
    the statistics over these examples of this device only, as
    ``blocks.RoutedBatchNorm`` (``kernels.masked_bn_relu_pool``; the
    running averages kept when none is selected); needs axis_name None."""
    if mask is not None and self.axis_name is not None:
      raise ValueError(
        "BatchNormReLUPool: a mask selects this device's examples; set "
        f'axis_name=None (got {self.axis_name!r}).'
      )
    scale, bias, ra_mean, ra_var = batch_norm_variables(self, x.shape[-1])
    if self.use_running_average:  # nn.BatchNorm's arithmetic, in its order.
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return max_pool_2x2(nn.relu((x - ra_mean.value) * mul + bias))
    if mask is None:
      y, mean, var = kernels.bn_relu_pool(
        x, scale, bias, self.epsilon, self.axis_name
      )
      seen = True
    else:
      y, mean, var = kernels.masked_bn_relu_pool(
        x, scale, bias, mask, self.epsilon
      )
      seen = jnp.any(mask)
    update_running_averages(self, ra_mean, ra_var, mean, var, seen)
    return y
