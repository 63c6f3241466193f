"""Flax NNX modules: the gates and the multi-task mixture of experts.

The same models as the linen modules (``gates.py``, ``experts.py``,
``models.py``), as ``nnx.Module``s built eagerly with ``rngs=nnx.Rngs(...)``
and called eagerly or under ``nnx.jit``. The math is shared, not copied:
the gates hold their parameters and call ``gates.dselect_k_weights`` and
``gates.top_k_weights``, which the linen gates call too; the attributes are
checked by the same functions.

Each module's variables have the linen module's names, so that
``linen_variables(module)`` is the ``{'params': ..., 'batch_stats': ...}``
the linen module applies, and ``load_linen_variables(module, variables)``
loads a linen module's variables, a train.py checkpoint's included.

Training against evaluation is NNX's: ``module.train()`` and
``module.eval()`` set BatchNorm's ``use_running_average`` and the noisy
top-k gate's ``deterministic``.

Shape legend (as in gates.py):
  B: batch   T: tasks   E: experts   K: selectors   M: bits per selector
  H: expert output features   C: classes   D: routing-input features
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dselect_jax import blocks
from dselect_jax import gates as gates_lib

Array = jax.Array


def _kernel_init(init_scheme: str, conv: bool) -> Callable[..., Array]:
  if init_scheme == 'paddlerec':
    return blocks.xavier_normal if conv else blocks.truncated_normal_fan_in
  return nnx.initializers.lecun_normal()


def _check_per_example(gate, in_features: Optional[int]):
  blocks.check_bool(gate, 'per_example')
  if gate.per_example and (
    isinstance(in_features, bool)
    or not isinstance(in_features, (int, np.integer))
    or in_features < 1
  ):
    raise ValueError(
      f'{type(gate).__name__}: a per-example gate needs in_features, the '
      f'width D of its routing inputs (B, D), an integer >= 1; got '
      f'in_features={in_features!r}.'
    )


# ---------------------------------------------------------------------------
# Gates.
# ---------------------------------------------------------------------------


class DSelectKGate(nnx.Module):
  """DSelect-k (``gates.DSelectKGate``): K selectors of M relaxed bits each,
  mixed by a softmax; exactly K experts once the bits leave
  [-gamma/2, gamma/2].

  Variables, as the linen gate's: static ``z_logits`` (K, M) and
  ``w_logits`` (K,); per-example Linear ``z_logits`` (D -> K*M) and
  ``w_logits`` (D -> K). ``__call__(routing_inputs=None)`` returns
  (weights (E,) or (B, E), aux).

  Args:
    num_experts: E >= 2.
    k: K, 1 <= K <= E.
    gamma: the smooth step's width, > 0.
    per_example: route each example from its routing inputs (B, D).
    in_features: D, needed when per-example.
    z_init, w_init: initializers; default uniform on (-gamma/100,
      gamma/100) and (-0.05, 0.05), as the original layer.
    rngs: the parameters' random numbers.
  """

  def __init__(
    self,
    num_experts: int,
    k: int,
    *,
    gamma: float = 1.0,
    per_example: bool = False,
    in_features: Optional[int] = None,
    z_init: Optional[Callable[..., Array]] = None,
    w_init: Optional[Callable[..., Array]] = None,
    rngs: nnx.Rngs,
  ):
    self.num_experts, self.k, self.gamma = num_experts, k, gamma
    self.per_example = per_example
    gates_lib._check_num_experts(self)  # pylint: disable=protected-access
    gates_lib._check_k(self)  # pylint: disable=protected-access
    gates_lib._check_gamma(self)  # pylint: disable=protected-access
    _check_per_example(self, in_features)
    self.num_bits = gates_lib.num_bits(num_experts)
    z_init = z_init or gates_lib.symmetric_uniform(gamma / 100)
    w_init = w_init or gates_lib.symmetric_uniform(0.05)
    if per_example:
      self.z_logits = nnx.Linear(
        in_features,
        k * self.num_bits,
        kernel_init=z_init,
        bias_init=z_init,
        rngs=rngs,
      )
      self.w_logits = nnx.Linear(
        in_features, k, kernel_init=w_init, bias_init=w_init, rngs=rngs
      )
    else:
      self.z_logits = nnx.Param(z_init(rngs.params(), (k, self.num_bits)))
      self.w_logits = nnx.Param(w_init(rngs.params(), (k,)))

  def __call__(self, routing_inputs: Optional[Array] = None):
    gates_lib._check_routing_inputs(self, routing_inputs)  # pylint: disable=protected-access
    if self.per_example:
      z = self.z_logits(routing_inputs)  # (B, K*M)
      z = z.reshape(-1, self.k, self.num_bits)  # (B, K, M)
      w = self.w_logits(routing_inputs)  # (B, K)
    else:
      z, w = self.z_logits[...], self.w_logits[...]  # (K, M), (K,)
    return gates_lib.dselect_k_weights(z, w, self.num_experts, self.gamma)


class SoftmaxGate(nnx.Module):
  """The MMoE gate (``gates.SoftmaxGate``): a softmax over all experts.

  Variables: static ``logits`` (E,), zeros by default; per-example Linear
  ``logits`` (D -> E), LeCun-normal kernel and zero bias by default.
  """

  def __init__(
    self,
    num_experts: int,
    *,
    per_example: bool = False,
    in_features: Optional[int] = None,
    logits_init: Optional[Callable[..., Array]] = None,
    rngs: nnx.Rngs,
  ):
    self.num_experts, self.per_example = num_experts, per_example
    gates_lib._check_num_experts(self)  # pylint: disable=protected-access
    _check_per_example(self, in_features)
    if per_example:
      kwargs = {'kernel_init': logits_init} if logits_init else {}
      self.logits = nnx.Linear(in_features, num_experts, rngs=rngs, **kwargs)
    else:
      init = logits_init or nnx.initializers.zeros
      self.logits = nnx.Param(init(rngs.params(), (num_experts,)))

  def __call__(self, routing_inputs: Optional[Array] = None):
    gates_lib._check_routing_inputs(self, routing_inputs)  # pylint: disable=protected-access
    if self.per_example:
      logits = self.logits(routing_inputs)  # (B, E)
    else:
      logits = self.logits[...]  # (E,)
    return jax.nn.softmax(logits, axis=-1), {}


class TopKGate(nnx.Module):
  """The noisy top-k gate (``gates.TopKGate``): the k largest logits,
  softmaxed; with ``noisy``, Gaussian noise of learned scale in training
  (``deterministic=False``, set by ``module.train()``), drawn from the
  ``gating`` stream of the rngs given.

  Variables: ``logits`` and, when noisy, ``noise_logits``: (E,) static
  (zeros by default), Linear (D -> E) per-example (zero kernels by default).
  """

  def __init__(
    self,
    num_experts: int,
    k: int,
    *,
    per_example: bool = False,
    in_features: Optional[int] = None,
    noisy: bool = True,
    logits_init: Optional[Callable[..., Array]] = None,
    deterministic: bool = False,
    rngs: nnx.Rngs,
  ):
    self.num_experts, self.k = num_experts, k
    self.per_example, self.noisy = per_example, noisy
    self.deterministic = deterministic
    gates_lib._check_num_experts(self)  # pylint: disable=protected-access
    gates_lib._check_k(self)  # pylint: disable=protected-access
    _check_per_example(self, in_features)
    blocks.check_bool(self, 'noisy')
    init = logits_init or nnx.initializers.zeros

    def logits():
      if per_example:
        return nnx.Linear(in_features, num_experts, kernel_init=init, rngs=rngs)
      return nnx.Param(init(rngs.params(), (num_experts,)))

    self.logits = logits()
    if noisy:
      self.noise_logits = logits()
      self.rngs = rngs

  def _logits(self, layer, routing_inputs) -> Array:
    if self.per_example:
      return layer(routing_inputs)  # (B, E)
    return layer[...][None]  # (1, E)

  def __call__(self, routing_inputs: Optional[Array] = None):
    gates_lib._check_routing_inputs(self, routing_inputs)  # pylint: disable=protected-access
    clean = self._logits(self.logits, routing_inputs)  # (B, E)
    noise_logits = noise = None
    if self.noisy:
      noise_logits = self._logits(self.noise_logits, routing_inputs)
      if not self.deterministic:
        noise = jax.random.normal(self.rngs.gating(), clean.shape)
    weights, aux = gates_lib.top_k_weights(clean, noise_logits, noise, self.k)
    return (weights if self.per_example else weights[0]), aux


GATES: Mapping[str, type[nnx.Module]] = {
  'dselect_k': DSelectKGate,
  'softmax': SoftmaxGate,
  'top_k': TopKGate,
}


# ---------------------------------------------------------------------------
# Experts, towers and the mixture.
# ---------------------------------------------------------------------------


class MultiMNISTExpert(nnx.Module):
  """The MultiMNIST CNN expert (``experts.MultiMNISTExpert``):
  conv5x5(10)-BN-ReLU-pool2-conv5x5(20)-BN-ReLU-pool2-Dense(50)-ReLU-
  Dense(H)-ReLU on (B, 36, 36, 1) images, with its layers' names.

  Args:
    features: H.
    image_size: the input's (H, W): the first Dense's width depends on it.
    bn_axis_name: the axis BatchNorm averages its batch statistics over
      under ``pmap`` or ``shard_map``.
    init_scheme: ``'flax'`` or ``'paddlerec'`` (``blocks.INITS``).
    rngs: the parameters' random numbers.
  """

  def __init__(
    self,
    features: int = 50,
    *,
    image_size: tuple[int, int] = (36, 36),
    bn_axis_name: Optional[str] = None,
    init_scheme: str = 'flax',
    rngs: nnx.Rngs,
  ):
    self.features, self.init_scheme = features, init_scheme
    blocks.check_int(self, 'features', 1)
    blocks.check_init(self)
    if not all(
      isinstance(n, int) and n >= 16 and n % 4 == 0 for n in image_size
    ):
      raise ValueError(
        f'MultiMNISTExpert: image_size={image_size!r} does not fit two valid '
        '5x5 convolutions, each followed by 2x2 pooling: give (H, W) of '
        'multiples of 4, each at least 16 (the MultiMNIST canvas is 36x36).'
      )
    # 36 -> conv 32 -> pool 16 -> conv 12 -> pool 6: 6 * 6 * 20 = 720.
    height, width = (((n - 4) // 2 - 4) // 2 for n in image_size)
    flat = height * width * 20
    conv = _kernel_init(init_scheme, conv=True)
    dense = _kernel_init(init_scheme, conv=False)
    bn = dict(momentum=0.9, epsilon=1e-5, axis_name=bn_axis_name, rngs=rngs)
    self.Conv_0 = nnx.Conv(
      1, 10, (5, 5), padding='VALID', kernel_init=conv, rngs=rngs
    )
    self.BatchNorm_0 = nnx.BatchNorm(10, **bn)
    self.Conv_1 = nnx.Conv(
      10, 20, (5, 5), padding='VALID', kernel_init=conv, rngs=rngs
    )
    self.BatchNorm_1 = nnx.BatchNorm(20, **bn)
    self.Dense_0 = nnx.Linear(flat, 50, kernel_init=dense, rngs=rngs)
    self.Dense_1 = nnx.Linear(50, features, kernel_init=dense, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    blocks.check_images(x, 'MultiMNISTExpert')
    x = self.BatchNorm_0(self.Conv_0(x))  # (B, 32, 32, 10)
    x = blocks.max_pool_2x2(jax.nn.relu(x))  # (B, 16, 16, 10)
    x = self.BatchNorm_1(self.Conv_1(x))  # (B, 12, 12, 20)
    x = blocks.max_pool_2x2(jax.nn.relu(x))  # (B, 6, 6, 20)
    x = jax.nn.relu(self.Dense_0(x.reshape(x.shape[0], -1)))  # (B, 50)
    return jax.nn.relu(self.Dense_1(x))  # (B, H)


class MLPTower(nnx.Module):
  """A task's head (``models.MLPTower``): Dense-ReLU per hidden width, then
  Dense(C) logits."""

  def __init__(
    self,
    in_features: int,
    num_classes: int = 10,
    *,
    hidden: tuple[int, ...] = (50, 50),
    init_scheme: str = 'flax',
    rngs: nnx.Rngs,
  ):
    self.num_classes, self.hidden, self.init_scheme = (
      num_classes,
      hidden,
      init_scheme,
    )
    blocks.check_int(self, 'num_classes', 1)
    blocks.check_widths(self, 'hidden')
    blocks.check_init(self)
    kernel_init = _kernel_init(init_scheme, conv=False)
    widths = (in_features, *hidden, num_classes)
    self.num_layers = len(widths) - 1
    for i in range(self.num_layers):
      setattr(
        self,
        f'Dense_{i}',
        nnx.Linear(
          widths[i], widths[i + 1], kernel_init=kernel_init, rngs=rngs
        ),
      )

  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = getattr(self, f'Dense_{i}')(x)
      if i < self.num_layers - 1:
        x = jax.nn.relu(x)
    return x  # (B, C)


class _Experts(nnx.Module):
  """The experts as ``expert_0``, ``expert_1``, ...: the linen bank's names."""

  def __init__(self, experts: list[nnx.Module]):
    self.num_experts = len(experts)
    for e, expert in enumerate(experts):
      setattr(self, f'expert_{e}', expert)

  def __call__(self, x: Array) -> Array:
    return jnp.stack(
      [getattr(self, f'expert_{e}')(x) for e in range(self.num_experts)]
    )  # (E, B, H)


class MultiTaskMoE(nnx.Module):
  """The multi-gate mixture of experts (``models.MultiTaskMoE``): each task
  t mixes the shared experts with its gate's weights and feeds the mixture
  to its tower: outputs_t = tower_t(sum_e a_{t,e} f_e(x)).

  Args:
    experts: E >= 2 expert modules, each (B, ...) -> (B, H).
    towers: T >= 1 tower modules, each (B, H) -> (B, C).
    gate: a key of ``GATES``.
    gate_kwargs: the gate's arguments (``k``, ``gamma``, ``per_example``...;
      ``in_features`` is set here for per-example gates).
    shared_gate: one gate for every task instead of one per task.
    routing_input: what a per-example gate routes on: ``'input'``, the
      flattened input, of ``routing_features`` values, or ``'experts'``,
      the mean of the expert outputs, of ``routing_features`` = H.
    routing_features: D, needed by per-example gates.
    rngs: the gates' random numbers (and the noisy top-k gate's noise).

  ``__call__(x)`` returns ``(outputs, aux)``: outputs (T, B, C); aux with
  ``expert_weights`` ((T, E) static, (T, B, E) per-example) and ``gate``,
  each auxiliary term stacked over the gates (G, ...).
  """

  def __init__(
    self,
    experts: list[nnx.Module],
    towers: list[nnx.Module],
    *,
    gate: str = 'dselect_k',
    gate_kwargs: Optional[Mapping[str, Any]] = None,
    shared_gate: bool = False,
    routing_input: str = 'input',
    routing_features: Optional[int] = None,
    rngs: nnx.Rngs,
  ):
    if not isinstance(experts, (list, tuple)) or len(experts) < 2:
      raise ValueError(
        'MultiTaskMoE: experts must be a list of at least 2 modules, got '
        f'{type(experts).__name__} of {len(experts) if hasattr(experts, "__len__") else "?"}.'
      )
    if not isinstance(towers, (list, tuple)) or not towers:
      raise ValueError(
        'MultiTaskMoE: towers must be a list of at least 1 module (one per '
        f'task), got {towers!r}.'
      )
    if gate not in GATES:
      raise ValueError(
        f'MultiTaskMoE: unknown gate {gate!r}; choose one of {sorted(GATES)}.'
      )
    if routing_input not in ('input', 'experts'):
      raise ValueError(
        'MultiTaskMoE: routing_input must be "input" or "experts", got '
        f'{routing_input!r}.'
      )
    self.shared_gate, self.routing_input = shared_gate, routing_input
    blocks.check_bool(self, 'shared_gate')
    self.num_experts, self.num_tasks = len(experts), len(towers)
    gate_kwargs = dict(gate_kwargs or {})
    self.per_example = bool(gate_kwargs.get('per_example', False))
    if self.per_example:
      gate_kwargs['in_features'] = routing_features
    self.experts = _Experts(list(experts))
    self.num_gates = 1 if shared_gate else self.num_tasks
    for g in range(self.num_gates):
      setattr(
        self,
        f'gate_{g}',
        GATES[gate](self.num_experts, **gate_kwargs, rngs=rngs),
      )
    for t, tower in enumerate(towers):
      setattr(self, f'tower_{t}', tower)

  def __call__(self, x: Array):
    blocks.check_batch(x, 'MultiTaskMoE')
    experts = self.experts(x)  # (E, B, H)
    routing = None
    if self.per_example:
      routing = (
        x.reshape(x.shape[0], -1)
        if self.routing_input == 'input'
        else jnp.mean(experts, axis=0)
      )  # (B, D)
    weights, gate_aux = [], []
    for g in range(self.num_gates):
      w, aux = getattr(self, f'gate_{g}')(routing)  # (E,) or (B, E)
      weights.append(w)
      gate_aux.append(aux)
    if self.shared_gate:
      weights = weights * self.num_tasks
    outputs = []
    for t in range(self.num_tasks):
      equation = 'be,ebh->bh' if self.per_example else 'e,ebh->bh'
      mixed = jnp.einsum(equation, weights[t], experts)  # (B, H)
      outputs.append(getattr(self, f'tower_{t}')(mixed))
    aux = {
      'expert_weights': jnp.stack(weights),  # (T, E) or (T, B, E)
      'gate': jax.tree.map(lambda *xs: jnp.stack(xs), *gate_aux),  # (G, ...)
    }
    return jnp.stack(outputs), aux  # (T, B, C)


def multimnist_moe(
  num_experts: int = 8,
  num_tasks: int = 2,
  *,
  features: int = 50,
  num_classes: int = 10,
  bn_axis_name: Optional[str] = None,
  init_scheme: str = 'flax',
  rngs: nnx.Rngs,
  **moe_kwargs,
) -> MultiTaskMoE:
  """The MultiMNIST model that train.py trains (``factory.create_model``):
  ``num_experts`` CNN experts and an MLP tower per task, with the linen
  model's variable names, so ``load_linen_variables`` takes its
  checkpoints. ``moe_kwargs`` go to ``MultiTaskMoE`` (``gate``,
  ``gate_kwargs``, ``shared_gate``...); a per-example gate routing on the
  input gets D = 36 * 36."""
  if moe_kwargs.get('routing_input', 'input') == 'input':
    moe_kwargs.setdefault('routing_features', 36 * 36)
  else:
    moe_kwargs.setdefault('routing_features', features)
  return MultiTaskMoE(
    [
      MultiMNISTExpert(
        features, bn_axis_name=bn_axis_name, init_scheme=init_scheme, rngs=rngs
      )
      for _ in range(num_experts)
    ],
    [
      MLPTower(features, num_classes, init_scheme=init_scheme, rngs=rngs)
      for _ in range(num_tasks)
    ],
    rngs=rngs,
    **moe_kwargs,
  )


# ---------------------------------------------------------------------------
# Variables both ways.
# ---------------------------------------------------------------------------


def linen_variables(module: nnx.Module) -> dict[str, Any]:
  """The module's variables as its linen counterpart takes them:
  ``{'params': ...}``, with ``'batch_stats'`` when it has BatchNorm."""
  variables = {'params': nnx.to_pure_dict(nnx.state(module, nnx.Param))}
  stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
  if stats:
    variables['batch_stats'] = stats
  return variables


def load_linen_variables(module: nnx.Module, variables: Mapping[str, Any]):
  """Sets the module's parameters (and BatchNorm statistics) from a linen
  module's ``variables`` (``{'params': ..., 'batch_stats': ...}``, as
  ``model.init`` returns them or a train.py checkpoint holds them). Every
  array must be there with the module's shape: a ValueError names the
  first that is not."""
  for collection, kind in (
    ('params', nnx.Param),
    ('batch_stats', nnx.BatchStat),
  ):
    state = nnx.state(module, kind)
    want = nnx.to_pure_dict(state)
    if not want:
      continue
    if collection not in variables:
      raise ValueError(
        f'load_linen_variables: no {collection!r} in the variables given '
        f'(keys: {sorted(variables)}).'
      )
    got = variables[collection]
    flat_want = dict(_flatten(want))
    flat_got = dict(_flatten(got))
    for path, array in flat_want.items():
      if path not in flat_got:
        raise ValueError(
          f'load_linen_variables: {collection}/{"/".join(path)} is missing '
          f'from the variables given.'
        )
      if np.shape(flat_got[path]) != np.shape(array):
        raise ValueError(
          f'load_linen_variables: {collection}/{"/".join(path)} has shape '
          f'{np.shape(flat_got[path])}; the module needs {np.shape(array)}.'
        )
    nnx.replace_by_pure_dict(
      state,
      jax.tree.map(
        jnp.asarray, _unflatten({p: flat_got[p] for p in flat_want})
      ),
    )
    nnx.update(module, state)


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), value


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree
