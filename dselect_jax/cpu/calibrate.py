"""Whether the direct convolution kernels are the fast choice on this CPU.

The direct kernels (csrc/direct_conv.cc) keep a block of 2 rows x 16
columns x up to 10 channels of sums in 16-float vectors: 20 accumulators
that fit the 32 vector registers of an AVX-512 CPU, and not the 16 of an
AVX2 one, where the sums spill to memory and the Toeplitz matmuls win
(docs/performance.md has the measurements). Which CPU a user has is not
known in advance, so ``direct_conv_is_faster`` times both on the experts'
convolutions, once per machine, and ``factory.conv_impl`` lets 'auto' pick
the direct kernels only where they won.

The answer is stored beside the compiled kernels (its name carries their
key, which covers the sources, the compiler and this CPU), as JSON with
both times, so each machine measures once.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dselect_jax import files
from dselect_jax.cpu import kernels
from dselect_jax.cpu import layers

# The experts' two convolutions (MultiMNIST: 36 x 36 x 1 -> 10 channels,
# then 16 x 16 x 10 -> 20), 5 x 5, at a batch small enough to time quickly.
SHAPES = (((32, 36, 36, 1), (5, 5, 1, 10)), ((32, 16, 16, 10), (5, 5, 10, 20)))
REPEATS = 5

_lock = threading.Lock()
_times: Optional[dict[str, float]] = None


def _train_cost(conv: Callable) -> Callable:
  """A jitted function of (x, kernel, bias) that runs conv forward and
  backward, as a training step does."""

  def loss(x, kernel, bias):
    return jnp.sum(jnp.square(conv(x, kernel, bias)))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _toeplitz(x, kernel, bias):
  return layers.toeplitz_conv(x, kernel, bias=bias)


def _seconds(fn: Callable, args) -> float:
  """The fastest of REPEATS calls, after one that compiles."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def measure() -> dict[str, float]:
  """Seconds of one forward and backward of both experts' convolutions,
  direct kernels against the Toeplitz form (each the fastest of REPEATS
  calls, the two alternating per shape)."""
  rng = np.random.default_rng(0)
  direct = toeplitz = 0.0
  for x_shape, k_shape in SHAPES:
    args = (
      jnp.asarray(rng.standard_normal(x_shape, np.float32)),
      jnp.asarray(rng.standard_normal(k_shape, np.float32)),
      jnp.zeros(k_shape[-1], jnp.float32),
    )
    direct += _seconds(_train_cost(kernels.conv2d), args)
    toeplitz += _seconds(_train_cost(_toeplitz), args)
  return {'direct_s': direct, 'toeplitz_s': toeplitz}


def times() -> dict[str, float]:
  """This machine's ``measure()``: measured on first call, then read from
  beside the compiled kernels. Builds the kernels; raises
  ``kernels.KernelBuildError`` where they do not build."""
  global _times
  with _lock:
    if _times is not None:
      return _times
    path = kernels.load() + '.calibration.json'
    try:
      with open(path) as f:
        stored = json.load(f)
      _times = {k: float(stored[k]) for k in ('direct_s', 'toeplitz_s')}
      return _times
    except (OSError, ValueError, KeyError, TypeError):
      pass  # Not measured yet (or a damaged file): measure.
    _times = measure()
    try:
      files.write_atomically(path, json.dumps(_times))
    except OSError:
      pass  # A read-only cache: measured again by the next process.
    return _times


def direct_conv_is_faster() -> bool:
  """True where the direct kernels ran the experts' convolutions faster
  than the Toeplitz form on this machine (``times()``)."""
  measured = times()
  return measured['direct_s'] < measured['toeplitz_s']
