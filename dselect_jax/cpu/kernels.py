"""Hand-written CPU kernels: BatchNorm + ReLU + 2x2 max pooling in one, and
direct convolutions.

The expert's ``BatchNorm -> ReLU -> max_pool_2x2`` block, in training mode,
forward and backward, as XLA FFI custom calls (csrc/bn_relu_pool.cc). XLA:CPU
makes about 14 passes over the (B, H, W, C) map for this block in a training
step; the kernels make 5 and split the batch over XLA's CPU threads (what
that buys: docs/performance.md, benchmarks/bn_relu_pool.py and
benchmarks/train_speed.py). Same function as ``nn.BatchNorm``
(training mode, ``use_fast_variance``), ``nn.relu`` and
``blocks.max_pool_2x2``, gradients included (the pooling's ties split as JAX
splits them), up to float rounding; tests/test_cpu_kernels.py checks both
against Flax. ``conv2d`` (custom VJP) and ``conv_relu_pool`` (evaluation's whole block)
sum convolutions directly, in vector registers (csrc/direct_conv.cc).

The C++ sources are compiled on first use with the system's C++ compiler
(``$CXX``, else ``c++``), against the XLA FFI headers that jaxlib ships, into
a cache folder (``$DSELECT_JAX_KERNEL_CACHE``, else
``~/.cache/dselect_jax/kernels``), keyed by the source, the jaxlib version,
the compiler and this CPU. ``load()`` raises ``KernelBuildError`` with the
compiler's message when that fails; ``available()`` says whether it works.

Shape legend: B batch, H rows, W columns (both even), C channels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from dselect_jax import files

Array = jax.Array

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
SOURCES = tuple(
  os.path.join(CSRC, name) for name in ('bn_relu_pool.cc', 'direct_conv.cc')
)
HEADERS = (os.path.join(CSRC, 'parallel_for.h'),)
_PREFIX = 'Dselect'
_TARGETS = (
  'BnReluPoolStats',
  'BnReluPoolForward',
  'BnReluPoolBackwardSums',
  'BnReluPoolBackwardDx',
  'Conv',
  'ConvReluPool',
  'ConvWeightGrad',
)
_FLAGS = ('-O3', '-fno-trapping-math', '-std=c++17', '-shared', '-fPIC')
_NATIVE = '-march=native'  # Dropped if the compiler refuses it.
# The flags that keep a config off the kernels.
WITHOUT = '--config.model.norm=xla --config.model.conv=toeplitz'


class KernelBuildError(RuntimeError):
  """The CPU kernels cannot be built or loaded. The message says why."""


def cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
    os.path.expanduser('~'), '.cache'
  )
  return os.environ.get('DSELECT_JAX_KERNEL_CACHE') or os.path.join(
    base, 'dselect_jax', 'kernels'
  )


def _cpu_signature() -> str:
  """The CPU's model and flags: -march=native code is for this CPU only."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      lines = [l for l in f if l.startswith(('model name', 'flags'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def _compile(compiler: str, out: str) -> None:
  include = jax.ffi.include_dir()
  base = [compiler, *_FLAGS, '-isystem', include, '-I', CSRC, *SOURCES]
  base += ['-o', out]
  errors = []
  for cmd in (base[:1] + [_NATIVE] + base[1:], base):
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
      return
    errors.append(f'$ {" ".join(cmd)}\n{proc.stderr[-2000:]}')
  raise KernelBuildError(
    f'compiling {" ".join(SOURCES)} failed:\n'
    + '\n'.join(errors)
    + '\nFix the compiler (set CXX to a C++17 compiler), or do without '
    f'the kernels: {WITHOUT}.'
  )


_lock = threading.Lock()
_loaded: Optional[str] = None
_failure: Optional[KernelBuildError] = None


def load() -> str:
  """Builds (once per machine) and registers the kernels; returns the .so."""
  global _loaded, _failure
  with _lock:
    if _loaded:
      return _loaded
    if _failure:
      raise _failure
    try:
      _loaded = _build_and_register()
    except KernelBuildError as e:
      _failure = e
      raise
    return _loaded


def _build_and_register() -> str:
  path = _build()
  try:
    lib = ctypes.cdll.LoadLibrary(path)
    for name in _TARGETS:
      jax.ffi.register_ffi_target(
        _PREFIX + name,
        jax.ffi.pycapsule(getattr(lib, _PREFIX + name)),
        platform='cpu',
      )
  except (OSError, AttributeError) as e:
    raise KernelBuildError(
      f'cannot load the kernels from {path}: {e}. Delete that file to '
      f'rebuild it, or do without the kernels: {WITHOUT}.'
    ) from e
  return path


def _build() -> str:
  """The path of the compiled library, built when missing or damaged."""
  compiler = shutil.which(os.environ.get('CXX', 'c++'))
  if compiler is None:
    raise KernelBuildError(
      f'no C++ compiler: {os.environ.get("CXX", "c++")!r} is not on PATH. '
      'Install one (e.g. g++) or set CXX to it, or do without the '
      f'kernels: {WITHOUT}.'
    )
  try:
    version = subprocess.run(
      [compiler, '--version'], capture_output=True, text=True, check=False
    ).stdout
  except OSError as e:
    raise KernelBuildError(
      f'cannot run the C++ compiler {compiler}: {e}. Set '
      f'CXX to a working one, or do without the kernels: {WITHOUT}.'
    ) from e
  source = b''
  for name in SOURCES + HEADERS:
    with open(name, 'rb') as f:
      source += f.read()
  key = hashlib.sha256(
    b'\0'.join(
      [
        source,
        jaxlib.__version__.encode(),
        compiler.encode(),
        version.encode(),
        ' '.join(_FLAGS + (_NATIVE,)).encode(),
        platform.machine().encode(),
        _cpu_signature().encode(),
      ]
    )
  ).hexdigest()[:16]
  folder = cache_dir()
  path = os.path.join(folder, f'cpu_kernels-{key}.so')
  if os.path.exists(path) and not _intact(path):
    # A truncated library can pass dlopen and then crash the process with
    # a bus error when a kernel runs: checked against the digest written
    # beside it when it was built, and rebuilt.
    logging.warning(
      'the compiled CPU kernels %s are damaged (their SHA-256 '
      'differs from the one recorded at build time); '
      'rebuilding them.',
      path,
    )
    os.remove(path)
  if not os.path.exists(path):
    try:
      os.makedirs(folder, exist_ok=True)
      fd, tmp = tempfile.mkstemp(suffix='.so', dir=folder)
      os.close(fd)
    except OSError as e:
      raise KernelBuildError(
        f'cannot write the kernel cache {folder}: {e}. Set '
        'DSELECT_JAX_KERNEL_CACHE to a writable folder.'
      ) from e
    try:
      _compile(compiler, tmp)
      files.write_atomically(path + '.sha256', _sha256(tmp))
      os.replace(tmp, path)  # Atomic: other processes see all or nothing.
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return path


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _intact(path: str) -> bool:
  """The library at ``path`` is the one that was built (its digest file)."""
  try:
    with open(path + '.sha256') as f:
      return f.read().strip() == _sha256(path)
  except OSError:
    return False


def available() -> bool:
  """True if the kernels build and load on this machine (CPU backend)."""
  if jax.default_backend() != 'cpu':
    return False
  try:
    load()
  except KernelBuildError:
    return False
  return True


def build_failure() -> Optional[str]:
  """Why the kernels did not build, or None (after load() or available())."""
  return str(_failure) if _failure else None


def _call(target: str, shape, *args: Array) -> Array:
  return jax.ffi.ffi_call(
    _PREFIX + 'BnReluPool' + target,
    jax.ShapeDtypeStruct(shape, jnp.float32),
    vmap_method='sequential',
  )(*args)


def _count(x: Array, axis_name: Optional[str]) -> int | Array:
  """P, the positions each channel's statistics average over."""
  b, h, w, _ = x.shape
  return b * h * w * (1 if axis_name is None else jax.lax.psum(1, axis_name))


def _psum(v: Array, axis_name: Optional[str]) -> Array:
  return v if axis_name is None else jax.lax.psum(v, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def bn_relu_pool(
  x: Array,
  scale: Array,
  bias: Array,
  epsilon: float = 1e-5,
  axis_name: Optional[str] = None,
) -> tuple[Array, Array, Array]:
  """``max_pool_2x2(relu(BatchNorm(x)))``, BatchNorm in training mode.

  Args:
    x: (B, H, W, C) float32, H and W even.
    scale, bias: (C,), BatchNorm's parameters.
    epsilon: added to the variance.
    axis_name: pmap axis to average the statistics over (as nn.BatchNorm's
      ``axis_name``), or None.

  Returns:
    (y, mean, var): y (B, H/2, W/2, C); the batch mean and (biased) variance
    per channel, (C,), which nn.BatchNorm folds into its running averages.
  """
  return _forward(x, scale, bias, epsilon, axis_name)[0]


def _forward(x, scale, bias, epsilon, axis_name):
  b, h, w, c = x.shape
  if x.dtype != jnp.float32 or h % 2 or w % 2:
    raise ValueError(
      f'bn_relu_pool: x must be float32 (B, H, W, C) with even '
      f'H and W, got {x.dtype} {x.shape}.'
    )
  load()
  sums = _psum(_call('Stats', (2, c), x), axis_name) / _count(x, axis_name)
  mean, mean2 = sums[0], sums[1]  # (C,), (C,)
  var = jnp.maximum(mean2 - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  a = scale * rstd  # z = a x + b is BatchNorm's output.
  b_ = bias - mean * a
  y = _call('Forward', (b, h // 2, w // 2, c), x, a, b_)
  return (y, mean, var), (x, a, b_, mean, rstd)


def _backward(epsilon, axis_name, residuals, cotangents):
  """dx, dscale, dbias from dy (and from the cotangents of mean and var).

  With z = scale * xhat + bias, xhat = (x - mean) * rstd, and g = dL/dz
  (dy routed back through the pooling and ReLU), BatchNorm's backward is
    dbias = sum g,  dscale = sum g xhat,
    dx = a (g - dbias / P - xhat dscale / P)  (a = scale * rstd),
  where, in dx, the sums and P run over the batch on all devices of
  axis_name (the statistics did); the dbias and dscale returned are this
  device's sums, as autodiff of nn.BatchNorm gives them. The mean and var
  outputs add dmean / P + dvar * 2 (x - mean) / P to dx. Both are
  dx = a g + k0 + xhat k1 with per-channel k0, k1.
  """
  del epsilon
  x, a, b_, mean, rstd = residuals
  dy, dmean, dvar = cotangents
  c = x.shape[-1]
  p = _count(x, axis_name)
  local = _call('BackwardSums', (2, c), x, a, b_, mean, rstd, dy)
  dbias, dscale = local[0], local[1]  # This device's share of the grads.
  total = _psum(local, axis_name)
  k0 = (dmean - a * total[0]) / p
  k1 = (2.0 * dvar / rstd - a * total[1]) / p
  dx = _call(
    'BackwardDx', x.shape, x, a, b_, mean, rstd, dy, jnp.stack([k0, k1])
  )
  return dx, dscale, dbias


bn_relu_pool.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def masked_bn_relu_pool(
  x: Array, scale: Array, bias: Array, mask: Array, epsilon: float = 1e-5
) -> tuple[Array, Array, Array]:
  """``bn_relu_pool`` with the statistics over the examples ``mask``
  (B,) bool selects (``blocks.RoutedBatchNorm``'s, on this device):
  their mean and variance normalize every example, and only they get a
  gradient. The same kernels: the statistics of x times the mask over the
  selected count, and in the backward pass the other examples' output
  cotangents and input gradients zeroed (their outputs are not used
  where the statistics are theirs). Returns (y, mean, var) as
  ``bn_relu_pool``; with no example selected, mean and var are 0."""
  return _masked_forward(x, scale, bias, mask, epsilon)[0]


def _selected(mask: Array) -> Array:
  return mask.astype(jnp.float32)[:, None, None, None]  # (B, 1, 1, 1)


def _masked_forward(x, scale, bias, mask, epsilon):
  b, h, w, c = x.shape
  if x.dtype != jnp.float32 or h % 2 or w % 2 or jnp.shape(mask) != (b,):
    raise ValueError(
      f'masked_bn_relu_pool: x must be float32 (B, H, W, C) with even H '
      f'and W and the mask (B,), got {x.dtype} {x.shape} and mask '
      f'{jnp.shape(mask)}.'
    )
  load()
  count = jnp.maximum(jnp.sum(mask, dtype=jnp.float32) * (h * w), 1.0)
  sums = _call('Stats', (2, c), x * _selected(mask)) / count
  mean, mean2 = sums[0], sums[1]
  var = jnp.maximum(mean2 - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  a = scale * rstd
  b_ = bias - mean * a
  y = _call('Forward', (b, h // 2, w // 2, c), x, a, b_)
  return (y, mean, var), (x, a, b_, mean, rstd, mask, count)


def _masked_backward(epsilon, residuals, cotangents):
  """``_backward`` over the selected examples: P their positions, the
  sums over them (the others' output cotangents zeroed first), and dx
  zero on the others."""
  del epsilon
  x, a, b_, mean, rstd, mask, count = residuals
  dy, dmean, dvar = cotangents
  dy = dy * _selected(mask)
  local = _call('BackwardSums', (2, a.shape[0]), x, a, b_, mean, rstd, dy)
  dbias, dscale = local[0], local[1]
  k0 = (dmean - a * dbias) / count
  k1 = (2.0 * dvar / rstd - a * dscale) / count
  dx = _call(
    'BackwardDx', x.shape, x, a, b_, mean, rstd, dy, jnp.stack([k0, k1])
  )
  return dx * _selected(mask), dscale, dbias, None


masked_bn_relu_pool.defvjp(_masked_forward, _masked_backward)


def _check_conv(who: str, x: Array, kernel: Array, bias: Array, pooled: bool):
  """A clear error where x (B, H, W, G Cg), kernel (G, kh, kw, Cg, Fg) and
  bias (G, Fg) do not fit, or the output is not whole."""
  ok = kernel.ndim == 5 and x.ndim == 4 and bias.ndim == 2
  if ok:
    g, kh, kw, cg, fg = kernel.shape
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    ok = (
      x.shape[3] == g * cg
      and bias.shape == (g, fg)
      and min(ho, wo) >= (2 if pooled else 1)
      and not (pooled and (ho % 2 or wo % 2))
      and all(a.dtype == jnp.float32 for a in (x, kernel, bias))
    )
  if not ok:
    raise ValueError(
      f'{who}: x (B, H, W, G Cg), kernel (G, kh, kw, Cg, Fg) and bias (G, '
      f'Fg) must be float32 with H >= kh and W >= kw'
      + (' and even H - kh + 1 and W - kw + 1' if pooled else '')
      + f'; got {x.dtype} {x.shape}, {kernel.dtype} {kernel.shape}, '
      f'{bias.dtype} {bias.shape}.'
    )
  load()


def _conv_call(x, kernel, bias, pad_h: int = 0, pad_w: int = 0) -> Array:
  """DselectConv: (B, H, W, G Cg) -> (B, Ho, Wo, G Fg), x zero-padded."""
  b, h, w, _ = x.shape
  g, kh, kw, _, fg = kernel.shape
  shape = (b, h + 2 * pad_h - kh + 1, w + 2 * pad_w - kw + 1, g * fg)
  return jax.ffi.ffi_call(
    _PREFIX + 'Conv',
    jax.ShapeDtypeStruct(shape, jnp.float32),
    vmap_method='sequential',
  )(x, kernel, bias, pad_h=np.int64(pad_h), pad_w=np.int64(pad_w))


@jax.custom_vjp
def conv2d(x: Array, kernel: Array, bias: Array) -> Array:
  """``conv(x, kernel) + bias``, VALID and stride 1, by direct summation.

  x (B, H, W, C), kernel (kh, kw, C, F), bias (F,), all float32 ->
  (B, H - kh + 1, W - kw + 1, F): ``nn.Conv(F, (kh, kw), padding='VALID')``'s
  function (NHWC, HWIO) up to float summation order. The backward is two
  more kernels: dx is the convolution of dz, zero-padded, with the flipped
  kernel, and dkernel, dbias come from one pass over x and dz
  (csrc/direct_conv.cc).
  """
  return _conv2d_forward(x, kernel, bias)[0]


def _conv2d_forward(x, kernel, bias):
  if kernel.ndim != 4 or bias.ndim != 1:
    raise ValueError(
      'conv2d: kernel must be (kh, kw, C, F) and bias (F,); got '
      f'{kernel.shape}, {bias.shape}.'
    )
  _check_conv('conv2d', x, kernel[None], bias[None], pooled=False)
  return _conv_call(x, kernel[None], bias[None]), (x, kernel)


def _conv2d_backward(residuals, dz):
  x, kernel = residuals
  kh, kw, c, _ = kernel.shape
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # (kh, kw, F, C)
  dx = _conv_call(
    dz, flipped[None], jnp.zeros((1, c), jnp.float32), kh - 1, kw - 1
  )
  dkernel, dbias = jax.ffi.ffi_call(
    _PREFIX + 'ConvWeightGrad',
    (
      jax.ShapeDtypeStruct((1, *kernel.shape), jnp.float32),
      jax.ShapeDtypeStruct(kernel.shape[-1:], jnp.float32),
    ),
    vmap_method='sequential',
  )(x, dz)
  return dx, dkernel[0], dbias


conv2d.defvjp(_conv2d_forward, _conv2d_backward)


def conv_relu_pool(x: Array, kernel: Array, bias: Array) -> Array:
  """``max_pool_2x2(relu(conv(x, kernel) + bias))`` per group, in one pass.

  x (B, H, W, G Cg), kernel (G, kh, kw, Cg, Fg), bias (G, Fg), all float32
  -> (B, Ho / 2, Wo / 2, G Fg): group g's VALID, stride-1 convolution
  (NHWC, HWIO) reads input channels [g Cg, (g + 1) Cg) and writes output
  channels [g Fg, (g + 1) Fg); Ho = H - kh + 1 and Wo = W - kw + 1 must be
  even. The experts' blocks in evaluation, each BatchNorm folded into its
  convolution (``experts.MultiMNISTExpert.evaluate_bank``); the full-size
  convolution output is never stored (csrc/direct_conv.cc). No gradient:
  evaluation only.
  """
  _check_conv('conv_relu_pool', x, kernel, bias, pooled=True)
  g, kh, kw, _, fg = kernel.shape
  b, h, w, _ = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  return jax.ffi.ffi_call(
    _PREFIX + 'ConvReluPool',
    jax.ShapeDtypeStruct((b, ho // 2, wo // 2, g * fg), jnp.float32),
    vmap_method='sequential',
  )(x, kernel, bias)
