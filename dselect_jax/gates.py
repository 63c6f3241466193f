"""Mixture-of-experts gates: DSelect-k and the baselines it is compared with.

Every gate is a Flax linen module called as ``gate(routing_inputs=None)`` that
returns ``(expert_weights, aux)``:

* ``expert_weights``: ``(E,)`` for a static gate (one weight vector, learned per
  task), ``(B, E)`` for a per-example gate (weights computed from the routing
  inputs). Weights are non-negative and sum to at most one.
* ``aux``: a dict. Scalar entries are the gate's auxiliary loss terms,
  unweighted: the trainer owns their weights and schedules, and logs every raw
  term. Array entries (``selector_outputs``) are diagnostics.

Shape legend:
  B: batch          E: experts        K: single-expert selectors (non-zeros)
  M: bits per selector, ceil(log2 E)  D: routing-input features

The DSelect-k gate follows Hazimeh et al., "DSelect-k: Differentiable Selection
in the Mixture of Experts with Applications to Multi-Task Learning" (NeurIPS
2021, arXiv 2106.03760), Sections 3 and 4, and reproduces the original
TensorFlow layer (google-research ``dselect_k_moe``) number for number, so
weights trained with it can be loaded with :func:`params_from_tf`.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Array]

# Added inside the entropy's log so a selector output of exactly 0 is finite,
# as in the original layer.
EPSILON = 1e-6


# ---------------------------------------------------------------------------
# Building blocks of DSelect-k.
# ---------------------------------------------------------------------------


def num_bits(num_experts: int) -> int:
  """M = ceil(log2(E)): the bits a selector needs to address E experts."""
  if num_experts < 2:
    raise ValueError(
      f'num_experts must be >= 2, got num_experts={num_experts}.'
    )
  # (E - 1).bit_length() is exact integer arithmetic; math.log2 can round.
  return (num_experts - 1).bit_length()


def binary_codes(num_experts: int) -> np.ndarray:
  """The ``(E, M)`` boolean matrix whose row i is i in binary, MSB first.

  Column 0 is the most significant bit and is paired with ``z[..., 0]``, as in
  the original layer. Integer bit operations, not ``np.binary_repr``: the usual
  ``np.array(list(np.binary_repr(i))).astype(bool)`` turns the characters '0'
  and '1' into True alike under NumPy >= 2.
  """
  m = num_bits(num_experts)
  experts = np.arange(num_experts)[:, None]  # (E, 1)
  shifts = np.arange(m - 1, -1, -1)[None, :]  # (1, M): MSB first.
  return ((experts >> shifts) & 1).astype(bool)  # (E, M)


def smooth_step(t: Array, gamma: float = 1.0) -> Array:
  """The cubic smooth step S of the paper (Section 3, Equation 4).

  S(t) = 0 for t <= -gamma/2, 1 for t >= gamma/2 and
  -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2 in between. S is continuously
  differentiable: the cubic's slope is 0 at both ends of its interval, so a
  selector bit whose logit leaves the interval stops receiving gradient.
  """
  lower, upper = -gamma / 2, gamma / 2
  a3, a1, a0 = -2 / gamma**3, 3 / (2 * gamma), 0.5
  cubic = a3 * t**3 + a1 * t + a0
  return jnp.where(
    t <= lower,
    jnp.zeros_like(t),
    jnp.where(t >= upper, jnp.ones_like(t), cubic),
  )


def symmetric_uniform(scale: float) -> Initializer:
  """Initializer uniform on (-scale, scale).

  Flax's ``nn.initializers.uniform(scale)`` samples [0, scale), which is not the
  original layer's ``RandomUniform(-scale, scale)``.
  """

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)

  return init


def selector_outputs(z_logits: Array, num_experts: int, gamma: float) -> Array:
  """Single-expert selector outputs r from their bit logits (paper, Eq. 5).

  r[..., k, i] = prod_j (S(z[..., k, j]) if bit j of i is 1 else
  1 - S(z[..., k, j])), with bits MSB first.

  Args:
    z_logits: ``(..., K, M)`` logits.
    num_experts: E.
    gamma: the smooth step's width.

  Returns:
    ``(..., K, E)`` selector outputs. Each row sums to 1 over all 2^M codes, so
    it sums to less than 1 over the E reachable experts when E < 2^M.
  """
  codes = binary_codes(num_experts)  # (E, M)
  s = smooth_step(z_logits, gamma)[..., None, :]  # (..., K, 1, M)
  # The M factors multiplied one by one rather than by jnp.prod, whose
  # gradient (products of all the other factors, by cumulative products)
  # cost the per-example gate more than its forward pass.
  r = jnp.where(codes[:, 0], s[..., 0], 1 - s[..., 0])  # (..., K, E)
  for j in range(1, codes.shape[1]):
    r = r * jnp.where(codes[:, j], s[..., j], 1 - s[..., j])
  return r


def entropy(r: Array) -> Array:
  """Sum over the trailing ``(K, E)`` axes of -r log(r + EPSILON).

  The entropy regularizer of Section 4: it pushes every selector towards a
  one-hot output, so the gate settles on exactly K experts sooner.
  """
  return -jnp.sum(r * jnp.log(r + EPSILON), axis=(-2, -1))


def reachability(r: Array, num_experts: int) -> Array:
  """Sum over selectors of 1 / sum_i r_i over the E reachable experts.

  When E is not a power of two, codes >= E address no expert. This term keeps
  a selector from putting all its mass there (Section 4). It is defined as
  exactly 0 when E is a power of two, where every code is an expert.
  """
  if num_experts == 2 ** num_bits(num_experts):
    return jnp.zeros(r.shape[:-2], r.dtype)
  return jnp.sum(1 / jnp.sum(r, axis=-1), axis=-1)


def dselect_k_weights(
  z_logits: Array, w_logits: Array, num_experts: int, gamma: float
) -> tuple[Array, dict[str, Array]]:
  """DSelect-k's expert weights and aux terms from its logits (Section 3):
  each selector's output r from its bits, mixed by softmax(w).

  Args:
    z_logits: ``([B,] K, M)`` bit logits.
    w_logits: ``([B,] K)`` selector-weight logits.
    num_experts: E.
    gamma: the smooth step's width.

  Returns:
    ``([B,] E)`` weights and ``{'selector_outputs': ([B,] K, E), 'entropy':
    (), 'reachability': ()}``, the terms averaged over the batch.
  """
  r = selector_outputs(z_logits, num_experts, gamma)  # ([B,] K, E)
  alpha = jax.nn.softmax(w_logits, axis=-1)  # ([B,] K)
  weights = jnp.sum(alpha[..., None] * r, axis=-2)  # ([B,] E)
  aux = {
    'selector_outputs': r,
    'entropy': jnp.mean(entropy(r)),
    'reachability': jnp.mean(reachability(r, num_experts)),
  }
  return weights, aux


def _check_routing_inputs(gate, routing_inputs: Optional[Array]):
  name = type(gate).__name__
  if gate.per_example and routing_inputs is None:
    raise ValueError(
      f'{name} with per_example=True needs routing_inputs of shape (B, D); '
      'got None. Pass routing_inputs, or use per_example=False.'
    )
  if not gate.per_example and routing_inputs is not None:
    raise ValueError(
      f'{name} with per_example=False is static and takes no routing_inputs; '
      f'got an array of shape {jnp.shape(routing_inputs)}. Drop them, or use '
      'per_example=True.'
    )
  if routing_inputs is not None and jnp.ndim(routing_inputs) != 2:
    raise ValueError(
      f'{name}: routing_inputs must have shape (B, D); got shape '
      f'{jnp.shape(routing_inputs)}. Flatten the features first.'
    )


def _check_num_experts(gate):
  if (
    not isinstance(gate.num_experts, (int, np.integer)) or gate.num_experts < 2
  ):
    raise ValueError(
      f'{type(gate).__name__}: num_experts must be an integer '
      f'>= 2, got num_experts={gate.num_experts!r}.'
    )


def _check_k(gate):
  if (
    not isinstance(gate.k, (int, np.integer))
    or not 1 <= gate.k <= gate.num_experts
  ):
    raise ValueError(
      f'{type(gate).__name__}: k must be an integer with 1 <= k <= '
      f'num_experts={gate.num_experts}, got k={gate.k!r}.'
    )


def _check_gamma(gate):
  if not (
    isinstance(gate.gamma, (int, float, np.number))
    and math.isfinite(gate.gamma)
    and gate.gamma > 0
  ):
    raise ValueError(
      f'{type(gate).__name__}: gamma must be a finite number > 0 (the width '
      f'of the smooth step), got gamma={gate.gamma!r}.'
    )


# ---------------------------------------------------------------------------
# Gates.
# ---------------------------------------------------------------------------


class DSelectKGate(nn.Module):
  """DSelect-k: a differentiable gate that converges to exactly k experts.

  K single-expert selectors each pick one expert through M = ceil(log2 E)
  relaxed binary bits (Section 3); a softmax over K more logits mixes them.
  Once every bit logit is outside [-gamma/2, gamma/2], each selector is one-hot
  and at most K experts have non-zero weight.

  Parameters, named as the original layer's variables:
    static: ``z_logits`` ``(K, M)``, ``w_logits`` ``(K,)``.
    per-example: Dense ``z_logits`` (kernel ``(D, K*M)``, bias ``(K*M,)``;
      output column c is selector c // M, bit c % M) and Dense ``w_logits``
      (kernel ``(D, K)``, bias ``(K,)``).

  Attributes:
    num_experts: E >= 2.
    k: K, the number of selectors: at most K experts end with non-zero weight.
    gamma: width of the smooth step's cubic region; > 0.
    per_example: route each example from its routing inputs instead of
      learning one weight vector.
    z_init: initializer of the bit logits (kernel and bias when per-example).
      Default: uniform on (-gamma/100, gamma/100), as in the original.
    w_init: initializer of the selector-weight logits. Default: uniform on
      (-0.05, 0.05), Keras' ``RandomUniform()`` default used by the original.
  """

  num_experts: int
  k: int
  gamma: float = 1.0
  per_example: bool = False
  z_init: Optional[Initializer] = None
  w_init: Optional[Initializer] = None

  def __post_init__(self):
    _check_num_experts(self)
    _check_k(self)
    _check_gamma(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, routing_inputs: Optional[Array] = None):
    _check_routing_inputs(self, routing_inputs)
    k, m = self.k, num_bits(self.num_experts)
    z_init = self.z_init or symmetric_uniform(self.gamma / 100)
    w_init = self.w_init or symmetric_uniform(0.05)

    if self.per_example:
      z = nn.Dense(
        k * m, kernel_init=z_init, bias_init=z_init, name='z_logits'
      )(routing_inputs)  # (B, K*M)
      z = z.reshape(-1, k, m)  # (B, K, M)
      w = nn.Dense(k, kernel_init=w_init, bias_init=w_init, name='w_logits')(
        routing_inputs
      )  # (B, K)
    else:
      z = self.param('z_logits', z_init, (k, m))  # (K, M)
      w = self.param('w_logits', w_init, (k,))  # (K,)

    return dselect_k_weights(z, w, self.num_experts, self.gamma)


class SoftmaxGate(nn.Module):
  """The MMoE gate (Ma et al., KDD 2018): a dense softmax over all experts.

  Parameters: static ``logits`` ``(E,)``; per-example Dense ``logits``
  (kernel ``(D, E)``, bias ``(E,)``). It has no auxiliary loss terms.

  Attributes:
    num_experts: E >= 2.
    per_example: route each example from its routing inputs.
    logits_init: initializer of the logits (kernel and bias when per-example);
      default zeros for static (uniform weights) and LeCun normal kernels.
  """

  num_experts: int
  per_example: bool = False
  logits_init: Optional[Initializer] = None

  def __post_init__(self):
    _check_num_experts(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, routing_inputs: Optional[Array] = None):
    _check_routing_inputs(self, routing_inputs)
    if self.per_example:
      kwargs = {'kernel_init': self.logits_init} if self.logits_init else {}
      logits = nn.Dense(self.num_experts, name='logits', **kwargs)(
        routing_inputs
      )  # (B, E)
    else:
      logits = self.param(
        'logits', self.logits_init or nn.initializers.zeros, (self.num_experts,)
      )  # (E,)
    return jax.nn.softmax(logits, axis=-1), {}


def cv_squared(x: Array) -> Array:
  """Squared coefficient of variation, var(x) / mean(x)^2, over the last axis.

  Shazeer et al. (2017), Section 4: 0 when every expert gets the same share.
  """
  mean = jnp.mean(x, axis=-1)
  return jnp.var(x, axis=-1) / (mean**2 + 1e-10)


class TopKGate(nn.Module):
  """The noisy top-k gate of Shazeer et al., ICLR 2017 ("Outrageously large
  neural networks"), Section 2.1 and Appendix A.

  logits H = x W_g, plus, when noisy and not deterministic, N(0, 1) noise
  scaled by softplus(x W_noise); the top k logits are kept and softmaxed, the
  rest get weight 0. The weights are not differentiable in which experts are
  kept, which is the instability DSelect-k removes.

  Auxiliary terms: ``importance``, the CV^2 of the per-expert sum of weights
  over the batch; ``load``, the CV^2 of the smooth estimate of how many
  examples each expert receives (Appendix A; it needs noise, and without
  noise it is the CV^2 of the hard counts, which has no gradient). A static
  gate is treated as a batch of one.

  Parameters: ``logits`` (and ``noise_logits`` when noisy) ``(E,)`` static, or
  Dense modules of those names per-example.

  Attributes:
    num_experts: E >= 2.
    k: experts kept per example, 1 <= k <= E.
    per_example: route each example from its routing inputs.
    noisy: add the tunable Gaussian noise during training.
    logits_init: initializer of the gate logits; default zeros (static) and zero
      kernels (per-example), as the paper recommends, so the start is uniform.
  """

  num_experts: int
  k: int
  per_example: bool = False
  noisy: bool = True
  logits_init: Optional[Initializer] = None

  def __post_init__(self):
    _check_num_experts(self)
    _check_k(self)
    super().__post_init__()

  def _logits(self, name: str, routing_inputs: Optional[Array]) -> Array:
    init = self.logits_init or nn.initializers.zeros
    if self.per_example:
      return nn.Dense(self.num_experts, kernel_init=init, name=name)(
        routing_inputs
      )  # (B, E)
    return self.param(name, init, (self.num_experts,))[None]  # (1, E)

  @nn.compact
  def __call__(
    self, routing_inputs: Optional[Array] = None, *, deterministic: bool = True
  ):
    _check_routing_inputs(self, routing_inputs)
    clean = self._logits('logits', routing_inputs)  # (B, E)
    noise_std = noise = None
    if self.noisy:
      noise_std = self._logits('noise_logits', routing_inputs)  # (B, E)
    if self.noisy and not deterministic:
      noise = jax.random.normal(self.make_rng('gating'), clean.shape)
    weights, aux = top_k_weights(clean, noise_std, noise, self.k)
    if not self.per_example:
      weights = weights[0]  # (E,)
    return weights, aux


def top_k_weights(
  clean: Array,
  noise_logits: Optional[Array],
  noise: Optional[Array],
  k: int,
) -> tuple[Array, dict[str, Array]]:
  """The noisy top-k gate's weights and aux terms from its logits.

  Args:
    clean: ``(B, E)`` logits x W_g.
    noise_logits: ``(B, E)`` x W_noise (the noise's scale is their softplus,
      + 0.01), or None for a gate without noise.
    noise: ``(B, E)`` N(0, 1) samples, or None (evaluation, or no noise).
    k: experts kept per example.

  Returns:
    ``(B, E)`` weights and ``{'importance': (), 'load': ()}``.
  """
  num_experts = clean.shape[-1]
  use_noise = noise_logits is not None and noise is not None
  if use_noise:
    noise_std = jax.nn.softplus(noise_logits) + 1e-2  # (B, E)
    logits = clean + noise * noise_std
  else:
    logits = clean

  top_logits, top_idx = jax.lax.top_k(logits, k)  # (B, k)
  top_weights = jax.nn.softmax(top_logits, axis=-1)  # (B, k)
  one_hot = jax.nn.one_hot(top_idx, num_experts, dtype=logits.dtype)
  weights = jnp.einsum('bk,bke->be', top_weights, one_hot)  # (B, E)

  if use_noise and k < num_experts:
    # P(expert e stays in the top k under fresh noise), Appendix A: compare
    # its clean logit with the k-th (or, for kept experts, (k+1)-th) largest
    # noisy logit of the others.
    top_kp1, _ = jax.lax.top_k(logits, k + 1)  # (B, k+1)
    in_top = logits >= top_kp1[:, k - 1 : k]  # (B, E)
    threshold = jnp.where(
      in_top, top_kp1[:, k : k + 1], top_kp1[:, k - 1 : k]
    )  # (B, E)
    prob = jax.scipy.stats.norm.cdf((clean - threshold) / noise_std)
    load = jnp.sum(prob, axis=0)  # (E,)
  else:
    load = jnp.sum((weights > 0).astype(weights.dtype), axis=0)  # (E,)
  aux = {
    'importance': cv_squared(jnp.sum(weights, axis=0)),
    'load': cv_squared(load),
  }
  return weights, aux


GATES: Mapping[str, type[nn.Module]] = {
  'dselect_k': DSelectKGate,
  'softmax': SoftmaxGate,
  'top_k': TopKGate,
}


def make_gate(gate: str, num_experts: int, /, **kwargs: Any) -> nn.Module:
  """The gate called ``gate`` (a key of GATES) over ``num_experts`` experts.

  ``kwargs`` go to the gate's constructor (``k``, ``per_example``, and Flax's
  ``name`` or ``parent``).
  """
  if gate not in GATES:
    raise ValueError(f'Unknown gate {gate!r}; choose one of {sorted(GATES)}.')
  return GATES[gate](num_experts=num_experts, **kwargs)


# ---------------------------------------------------------------------------
# Weights trained with the original TensorFlow layer.
# ---------------------------------------------------------------------------


def params_from_tf(tf_weights: Mapping[str, Any]) -> dict[str, Any]:
  """Converts the original TF ``DSelectKGate``'s weights into this gate's params.

  Args:
    tf_weights: for a static gate, ``{'z_logits': (K, 1, M), 'w_logits':
      (K, 1)}`` (the layer's variables); for a per-example gate
      ``{'z_logits': {'kernel': (D, K*M), 'bias': (K*M,)}, 'w_logits':
      {'kernel': (D, K), 'bias': (K,)}}`` (its two Dense layers'
      ``get_weights()``, whose layout Flax's Dense shares).

  Returns:
    The ``params`` collection for ``DSelectKGate.apply({'params': ...})``.
  """
  expected = (
    "{'z_logits': (K, 1, M), 'w_logits': (K, 1)} for a static "
    "gate, or {'z_logits': {'kernel', 'bias'}, 'w_logits': "
    "{'kernel', 'bias'}} for a per-example gate"
  )
  if not isinstance(tf_weights, Mapping):
    raise TypeError(
      f'params_from_tf: tf_weights must be a mapping, got '
      f'{type(tf_weights).__name__}; expected {expected}.'
    )
  for name in ('z_logits', 'w_logits'):
    if name not in tf_weights:
      raise ValueError(
        f'params_from_tf: no {name!r} in the TF weights (keys: '
        f'{sorted(tf_weights)}); expected {expected}.'
      )
  z, w = tf_weights['z_logits'], tf_weights['w_logits']
  if isinstance(z, Mapping) or isinstance(w, Mapping):
    for name in ('z_logits', 'w_logits'):
      layer = tf_weights[name]
      if not isinstance(layer, Mapping) or {'kernel', 'bias'} - set(layer):
        have = (
          sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
        )
        raise ValueError(
          f'params_from_tf: {name!r} must hold a Dense '
          f"layer's 'kernel' and 'bias', got {have}; expected "
          f'{expected}.'
        )
    return {
      name: {
        'kernel': jnp.asarray(tf_weights[name]['kernel']),
        'bias': jnp.asarray(tf_weights[name]['bias']),
      }
      for name in ('z_logits', 'w_logits')
    }
  z, w = np.asarray(z), np.asarray(w)
  if z.ndim != 3 or z.shape[1] != 1 or w.shape != (z.shape[0], 1):
    raise ValueError(
      "Expected the static TF layer's z_logits of shape (K, 1, M) and "
      f'w_logits of shape (K, 1); got {z.shape} and {w.shape}.'
    )
  return {'z_logits': jnp.asarray(z[:, 0, :]), 'w_logits': jnp.asarray(w[:, 0])}
