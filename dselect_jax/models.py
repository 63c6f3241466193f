"""Multi-task mixture of experts: shared experts, a gate per task, towers.

Shape legend (as in gates.py):
  B: batch   T: tasks   E: experts   G: gates (T, or 1 when shared)
  H: expert output features   C: classes   D: routing-input features

The MultiMNIST expert and tower are the networks of PaddleRec's DSelect-k
model (the reference recipe), with BatchNorm after each convolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dselect_jax import gates as gates_lib

Array = jax.Array
ModuleFactory = Callable[..., nn.Module]


class MultiMNISTExpert(nn.Module):
  """conv5x5(10)-BN-ReLU-pool2-conv5x5(20)-BN-ReLU-pool2-Dense(50)-ReLU-Dense(50)-ReLU.

  Valid convolutions on a (36, 36, 1) image: 36 -> 32 -> 16 -> 12 -> 6, so the
  first Dense sees 6 * 6 * 20 = 720 features. About 2.0 MFLOP per image.

  Attributes:
    features: output width H.
    bn_axis_name: pmap axis over which BatchNorm averages its batch statistics,
      so that a data-parallel step equals one step on the whole batch.
  """
  features: int = 50
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                epsilon=1e-5, axis_name=self.bn_axis_name)
    x = nn.Conv(10, (5, 5), padding='VALID')(x)  # (B, 32, 32, 10)
    x = nn.relu(norm()(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # (B, 16, 16, 10)
    x = nn.Conv(20, (5, 5), padding='VALID')(x)  # (B, 12, 12, 20)
    x = nn.relu(norm()(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # (B, 6, 6, 20)
    x = x.reshape(x.shape[0], -1)  # (B, 720)
    x = nn.relu(nn.Dense(50)(x))
    return nn.relu(nn.Dense(self.features)(x))  # (B, H)


class MLPTower(nn.Module):
  """Dense(50)-ReLU-Dense(50)-ReLU-Dense(C): a task's head, returning logits.

  The softmax lives in the loss only (PaddleRec applies one here and another
  in its loss).
  """
  num_classes: int = 10
  hidden: tuple[int, ...] = (50, 50)

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    del train  # No dropout or BatchNorm in the tower.
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)  # (B, C)


class ExpertBank(nn.Module):
  """All E experts on a shared input, stacked: ``(B, ...) -> (E, B, H)``.

  The one place where the experts are computed, so a faster formulation can
  replace this loop without touching the rest of the model.
  """
  num_experts: int
  expert: ModuleFactory = MultiMNISTExpert
  expert_kwargs: Mapping[str, Any] = flax.core.FrozenDict()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    outputs = [
        self.expert(**self.expert_kwargs, name=f'expert_{e}')(x, train=train)
        for e in range(self.num_experts)
    ]
    return jnp.stack(outputs)  # (E, B, H)


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
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    if self.num_tasks < 1:
      raise ValueError(f'MultiTaskMoE: num_tasks must be >= 1, got '
                       f'num_tasks={self.num_tasks}.')
    if self.gate not in gates_lib.GATES:
      raise ValueError(f'MultiTaskMoE: unknown gate {self.gate!r}; choose one '
                       f'of {sorted(gates_lib.GATES)}.')
    if self.routing_input not in ('input', 'experts'):
      raise ValueError(f'MultiTaskMoE: routing_input must be "input" or '
                       f'"experts", got {self.routing_input!r}.')
    # Builds one gate now so that bad gate arguments fail at construction.
    gates_lib.make_gate(self.gate, self.num_experts, **self.gate_kwargs,
                        parent=None)
    super().__post_init__()

  @property
  def per_example(self) -> bool:
    return bool(self.gate_kwargs.get('per_example', False))

  @nn.compact
  def __call__(self, x: Array, *, train: bool):
    expert_kwargs = dict(self.expert_kwargs)
    if self.bn_axis_name is not None:
      expert_kwargs.setdefault('bn_axis_name', self.bn_axis_name)
    experts = ExpertBank(self.num_experts, self.expert,
                         flax.core.FrozenDict(expert_kwargs),
                         name='experts')(x, train=train)  # (E, B, H)

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
      gate = gates_lib.make_gate(self.gate, self.num_experts,
                                 **self.gate_kwargs, name=f'gate_{g}')
      w, aux = gate(routing, **call_kwargs)  # w: (E,) or (B, E)
      weights.append(w)
      gate_aux.append(aux)
    weights = [weights[0]] * self.num_tasks if self.shared_gate else weights

    logits = []
    for t in range(self.num_tasks):
      if self.per_example:
        mixed = jnp.einsum('be,ebh->bh', weights[t], experts)  # (B, H)
      else:
        mixed = jnp.einsum('e,ebh->bh', weights[t], experts)  # (B, H)
      tower = self.tower(num_classes=self.num_classes, **self.tower_kwargs,
                         name=f'tower_{t}')
      logits.append(tower(mixed, train=train))  # (B, C)

    aux = {
        'expert_weights': jnp.stack(weights),  # (T, E) or (T, B, E)
        'gate': jax.tree.map(lambda *xs: jnp.stack(xs), *gate_aux),  # (G, ...)
    }
    return jnp.stack(logits), aux  # (T, B, C)
