"""The CPU's fast paths: Toeplitz convolutions and BatchNorm-ReLU-pool kernels.

Both compute what the XLA path of ``models.MultiMNISTExpert`` computes, with
the same parameters, so a checkpoint trained with one runs with the other;
``factory.create_model`` plugs them into the expert on the CPU
(``model.conv`` / ``model.norm`` 'auto'). ``models`` never imports this
package.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dselect_jax.cpu import kernels
from dselect_jax.models import max_pool_2x2

Array = jax.Array


ROWS_IMPLS = ('xla', 'kernel')


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
  rows: str = 'xla',
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

  ``rows`` says who builds the matrix of input rows: ``'xla'`` (slices and
  concatenations; the gradient by autodiff) or ``'kernel'`` (the CPU kernels
  ``kernels.toeplitz_rows`` forward, and in the backward
  ``kernels.toeplitz_columns`` for the weight gradient and
  ``kernels.toeplitz_rows_transpose`` for the input's, so that no matrix is
  transposed; same values up to float summation order).

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
  if rows not in ROWS_IMPLS:
    raise ValueError(
      f'toeplitz_conv: rows must be one of {ROWS_IMPLS}, got {rows!r}.'
    )
  t = _segment(wo, tile)
  bias = jnp.zeros((f,), x.dtype) if bias is None else bias.astype(x.dtype)
  if rows == 'kernel':
    return _kernel_toeplitz_conv(x, kernel.astype(x.dtype), bias, t)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_toeplitz_conv(x: Array, kernel: Array, bias: Array, t: int):
  """toeplitz_conv with rows='kernel' and segments of t columns."""
  return _kernel_conv_forward(x, kernel, bias, t)[0]


def _kernel_conv_forward(x, kernel, bias, t):
  b, h, w, _ = x.shape
  kh, kw, _, f = kernel.shape
  matrix = kernels.toeplitz_rows(x, kh, kw, t)  # (B, Ho, N, kh U C)
  y = matrix @ toeplitz_matrix(kernel, t) + jnp.tile(bias, t)  # (B, Ho, N, t F)
  return y.reshape(b, h - kh + 1, w - kw + 1, f), (x, kernel)


def _kernel_conv_backward(t, residuals, dy):  # dy: (B, Ho, Wo, F)
  """The weight gradient is rows^T @ dy, its transposed rows gathered from
  the input in one pass (toeplitz_columns; XLA shares it between the
  experts' first convolutions, which all read the same image). Keeping the
  second convolution's forward rows and letting XLA transpose them instead
  trained 0.86x as fast (one alternating run, 5 rounds at batch 256; not
  committed)."""
  x, kernel = residuals
  kh, kw, _, f = kernel.shape
  toeplitz, toeplitz_vjp = jax.vjp(lambda k: toeplitz_matrix(k, t), kernel)
  dy = dy.reshape(-1, t * f)  # (B Ho N, t F)
  dtoeplitz = kernels.toeplitz_columns(x, kh, kw, t) @ dy  # (kh U C, t F)
  b, h, w, _ = x.shape
  drows = (dy @ toeplitz.T).reshape(b, h - kh + 1, (w - kw + 1) // t, -1)
  dx = kernels.toeplitz_rows_transpose(drows, kh, kw, t)
  dbias = dy.reshape(-1, f).sum(0)
  return dx, toeplitz_vjp(dtoeplitz)[0], dbias


_kernel_toeplitz_conv.defvjp(_kernel_conv_forward, _kernel_conv_backward)


class ToeplitzConv(nn.Module):
  """``nn.Conv(features, kernel_size, padding='VALID')`` by ``toeplitz_conv``.

  Same parameters (``kernel`` (kh, kw, C, F), ``bias`` (F,), nn.Conv's
  initializers, so the same values from the same key) and outputs as nn.Conv.
  ``rows``: who builds the input rows, as in ``toeplitz_conv`` ('kernel'
  needs the CPU kernels).
  """

  features: int
  kernel_size: tuple[int, int] = (5, 5)
  tile: int = 4
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  rows: str = 'xla'

  def __post_init__(self):
    if self.features < 1 or min(self.kernel_size) < 1 or self.tile < 1:
      raise ValueError(
        'ToeplitzConv: features, kernel_size and tile must be '
        f'>= 1, got features={self.features}, kernel_size='
        f'{self.kernel_size}, tile={self.tile}.'
      )
    if self.rows not in ROWS_IMPLS:
      raise ValueError(
        f'ToeplitzConv: rows must be one of {ROWS_IMPLS}, got '
        f'rows={self.rows!r}.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = _conv_params(self, x)
    return toeplitz_conv(x, kernel, self.tile, self.rows, bias)


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
  def __call__(self, x: Array) -> Array:  # (B, H, W, C) -> (B, H/2, W/2, C)
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable(
      'batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32)
    )
    ra_var = self.variable(
      'batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32)
    )
    if self.use_running_average:  # nn.BatchNorm's arithmetic, in its order.
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return max_pool_2x2(nn.relu((x - ra_mean.value) * mul + bias))
    y, mean, var = kernels.bn_relu_pool(
      x, scale, bias, self.epsilon, self.axis_name
    )
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean
      ra_var.value = m * ra_var.value + (1 - m) * var
    return y
