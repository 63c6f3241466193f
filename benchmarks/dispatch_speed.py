"""Per-example DSelect-k: dense against sparse dispatch, as E grows.

  python benchmarks/dispatch_speed.py [--experts=8,16,32,64] [--batches=256]
      [--kinds=mlp,cnn] [--modes=train,eval] [--routing=spread]
      [--rounds=5] [--steps=5] [--out=FILE] [--plot=PNG]

The multi-task MoE with per-example DSelect-k gates (T = 2 tasks, k = 2),
its gates saturated (bit logits scaled far outside [-gamma/2, gamma/2], so
each example routes to at most T·k experts), on one device. ``--routing``:
``spread``, the scaled logits of the initial gates (the routing spreads
unevenly over all experts), or ``few``, every selector's bits but its
lowest fixed (a random value each), so that each of the T·k selectors
picks one of 2 experts per example, at most 2·T·k experts used whatever
E, as trained gates send most examples to a few experts. ``mlp``: the
recommender's MLP experts on 64 features; ``cnn``: the MultiMNIST CNN
experts on 36x36 images (trained dispatched with BatchNorm over each
expert's routed examples, ``MultiTaskMoE.routed_statistics``, as
``model.sparse_dispatch`` trains them). ``train``: forward and backward
of the loss; ``eval``: the forward pass.

The sparse contenders run through ``steps.Dispatcher``, as training and
evaluation do, each with one layout and dispatching whenever a bucket is
below the batch: ``capacity``, a slot per routed example in each
expert's capacity bucket (``dispatch_capacity``, any expert);
``buckets``, a bucket per expert sized by its own load, none for unused
experts (``dispatch_buckets``, experts in the loop bank); ``blocks``,
the routed pairs in blocks of rows, one expert's each
(``dispatch_blocks``, MLP experts); ``ragged``, the routed pairs as
grouped matmuls (``jax.lax.ragged_dot``, ``dispatch_pairs``, MLP
experts), sized by a gates-only pass before each batch. The first three
route inside the step, their bounds from the steps' own reports.
``chosen`` is what training and evaluation run: the Dispatcher's layout
for the experts, kept only where its timing beat the dense step. Each
(kind, E, batch, mode, routing) times ``--rounds`` alternating windows
of ``--steps`` calls of each contender and prints the median rates,
each sparse one against the fastest dense way:
the loop bank, and the vmapped bank for MLP experts; for CNN experts the
fused evaluation on XLA's convolutions and on the CPU kernels', and in
training the CPU kernels' convolutions and BatchNorm blocks (direct and
Toeplitz), where they build. The dispatched CNN experts evaluate fused,
on the kernels where they build, and train on the convolutions
``model.conv='auto'`` picks and the kernels' BatchNorm blocks (masked to
the routed examples) where they build.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from typing import Any, NamedTuple

from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

from dselect_jax import cli
from dselect_jax import dispatch
from dselect_jax import experts
from dselect_jax import models
from dselect_jax import provenance
from dselect_jax import steps

_EXPERTS = flags.DEFINE_list('experts', ['8', '16', '32', '64'], 'E values.')
_BATCHES = flags.DEFINE_list('batches', ['256'], 'Batch sizes.')
_KINDS = flags.DEFINE_list('kinds', ['mlp', 'cnn'], 'Experts: mlp, cnn.')
_MODES = flags.DEFINE_list('modes', ['train', 'eval'], 'train, eval.')
_ROUTING = flags.DEFINE_list(
  'routing', ['spread'], 'Saturated routing: spread, few (see above).'
)
_ROUNDS = flags.DEFINE_integer(
  'rounds', 5, 'Alternating windows of each contender.', lower_bound=1
)
_STEPS = flags.DEFINE_integer('steps', 5, 'Calls per window.', lower_bound=1)
_OUT = flags.DEFINE_string('out', None, 'Also write the table here.')
_PLOT = flags.DEFINE_string(
  'plot', None, 'Also draw examples/s against E here (PNG).'
)

FEATURES = 64  # The MLP experts' input width.


def _model(kind: str, num_experts: int, **kwargs) -> models.MultiTaskMoE:
  gate = flax.core.FrozenDict({'k': 2, 'per_example': True})
  if kind == 'mlp':
    return models.MultiTaskMoE(
      num_experts=num_experts,
      gate_kwargs=gate,
      num_classes=1,
      expert=experts.MLPExpert,
      expert_kwargs=flax.core.FrozenDict({'hidden': (64,), 'features': 32}),
      tower_kwargs=flax.core.FrozenDict({'hidden': (32,)}),
      **kwargs,
    )
  return models.MultiTaskMoE(
    num_experts=num_experts,
    gate_kwargs=gate,
    expert=experts.MultiMNISTExpert,
    **kwargs,
  )


def _cnn_modules(conv: str, norm: str) -> flax.core.FrozenDict:
  """The CNN experts' convolution and BatchNorm block (``factory``'s
  names: 'xla', 'toeplitz', 'kernel')."""
  from dselect_jax import factory  # pylint: disable=g-import-not-at-top

  return flax.core.FrozenDict(factory.expert_modules(conv, norm))


def _trained_conv() -> str:
  """The convolution ``model.conv='auto'`` trains with on this CPU."""
  if not _kernels_built():
    return 'toeplitz'
  from dselect_jax.cpu import calibrate  # pylint: disable=g-import-not-at-top

  return 'kernel' if calibrate.direct_conv_is_faster() else 'toeplitz'


def _fused(kernels: bool) -> flax.core.FrozenDict:
  """The CNN bank's fused evaluation: XLA's convolutions, or the CPU
  kernels' (as ``model.conv='auto'`` picks them where they build)."""
  block = None
  if kernels:
    from dselect_jax.cpu import kernels as cpu_kernels  # pylint: disable=g-import-not-at-top

    block = cpu_kernels.conv_relu_pool
  return flax.core.FrozenDict({'fused_eval': True, 'eval_block': block})


def _kernels_built() -> bool:
  from dselect_jax.cpu import kernels as cpu_kernels  # pylint: disable=g-import-not-at-top

  return cpu_kernels.available()


def _dense_variants(kind: str, num_experts: int, mode: str, variables):
  """The dense model's other ways, each with its variables: the vmapped
  bank (MLP experts), the fused evaluation (CNN experts, XLA's
  convolutions and, where they build, the CPU kernels')."""
  if kind == 'mlp':
    model = _model(kind, num_experts, bank=experts.VmappedExpertBank)
    stacked = experts.stack_expert_variables(variables, num_experts)
    return {'dense (vmap bank)': (_work(model, mode), stacked)}
  variants = {}
  if mode == 'train' and _kernels_built():
    for conv in ('kernel', 'toeplitz'):
      modules = _cnn_modules(conv, 'kernel')
      model = _model(kind, num_experts, expert_kwargs=modules)
      name = f'dense ({"direct" if conv == "kernel" else conv} conv, kernels)'
      variants[name] = (_work(model, mode), variables)
  if mode == 'eval':
    for kernels in (False, True) if _kernels_built() else (False,):
      model = _model(kind, num_experts, bank_kwargs=_fused(kernels))
      name = 'dense (fused eval, kernels)' if kernels else 'dense (fused eval)'
      variants[name] = (_work(model, mode), variables)
  return variants


def _inputs(kind: str, batch: int) -> jax.Array:
  key = jax.random.key(1)
  if kind == 'mlp':
    return jax.random.normal(key, (batch, FEATURES))
  # Centred pixels: the gates' projections then differ from image to image,
  # and saturated routing spreads over the experts as trained gates do
  # (uniform noise images all look alike to a random projection).
  return jax.random.normal(key, (batch, 36, 36, 1))


def _saturated(model, x, routing: str):
  variables = flax.core.unfreeze(model.init(jax.random.key(0), x, train=False))
  bits = (model.num_experts - 1).bit_length()  # M per selector.
  rng = np.random.default_rng(0)
  for name, gate in variables['params'].items():
    if name.startswith('gate_'):
      z = gate['z_logits']
      for leaf in ('kernel', 'bias'):
        z[leaf] = z[leaf] * 1000
      if routing == 'few':  # Bits 1.. of each selector fixed: 2 experts.
        fixed = np.arange(z['bias'].shape[-1]) % bits != 0  # (K*M,)
        signs = rng.choice([-1e4, 1e4], size=fixed.shape)
        z['kernel'] = jnp.where(fixed, 0.0, z['kernel'])
        z['bias'] = jnp.where(fixed, signs, z['bias'])
  return variables


def _work(model, mode: str):
  """The timed computation of one batch: the loss's value and gradients,
  or the forward pass; with the dispatched model's routing report (a
  device axis of 1, as the mapped steps give it) for the Dispatcher."""

  def report(aux):
    return {n: aux[n][None] for n in steps.DISPATCH_REPORT if n in aux}

  if mode == 'eval':

    def forward(variables, x):
      outputs, aux = model.apply(variables, x, train=False)
      return outputs, report(aux)

    return jax.jit(forward)

  def loss(params, variables, x):
    outputs, aux = model.apply(
      {**variables, 'params': params},
      x,
      train=True,
      mutable=['batch_stats'],
    )[0]
    return jnp.mean(outputs**2) + aux['gate']['entropy'].sum(), report(aux)

  grad = jax.jit(jax.grad(loss, has_aux=True))
  return lambda variables, x: grad(variables['params'], variables, x)


class _State(NamedTuple):
  params: Any  # What steps.routing_load reads.


def _contenders(
  kind: str, num_experts: int, batch: int, mode: str, routing: str
):
  model = _model(kind, num_experts)
  x = _inputs(kind, batch)
  variables = _saturated(model, x, routing)
  dense = _work(model, mode)
  # The dispatched CNN experts evaluate fused, on the kernels where built,
  # and train on model.conv='auto''s convolutions and blocks, BatchNorm over
  # each expert's routed examples.
  dispatched = model
  if kind == 'cnn' and mode == 'eval':
    dispatched = _model(kind, num_experts, bank_kwargs=_fused(_kernels_built()))
  elif kind == 'cnn':
    dispatched = _model(
      kind,
      num_experts,
      routed_statistics=True,
      expert_kwargs=_cnn_modules(
        _trained_conv(), 'kernel' if _kernels_built() else 'xla'
      ),
    )

  def sparse(layout: str, measure: int = 0):
    """steps.Dispatcher with a layout: its bounds from the steps' own
    routing reports, read one step late (or, ragged, from a gates-only
    pass before each batch); ``measure``: its timed choice against dense,
    as the trainer and the Evaluator run it."""
    dispatcher = steps.Dispatcher(
      dispatched,
      lambda m: _work(m, mode),
      layout,
      axis_name=None,
      measure=measure,
      compile_ahead=False,  # Its programs compile in the warm-up calls.
    )
    state = _State(jax.tree.map(lambda v: v[None], variables['params']))
    device_batch = {'image': x[None]}  # One device.

    def run(variables, x):
      result, report = dispatcher(state, device_batch)(variables, x)
      dispatcher.observe(report)
      return result

    return run

  contenders = {
    'dense (loop bank)': (dense, variables),
    **_dense_variants(kind, num_experts, mode, variables),
    'capacity': (sparse('capacity'), variables),
  }
  if models.bucketed_experts(dispatched):
    contenders['buckets'] = (sparse('buckets'), variables)
  if models.ragged_experts(model):
    contenders['blocks'] = (sparse('blocks'), variables)
    contenders['ragged'] = (sparse('ragged'), variables)
  contenders['chosen'] = (sparse('auto', measure=3), variables)
  weights = models.per_example_weights(model, variables['params'], x)
  counts = dispatch.counts(weights)
  load = (int(jnp.max(counts)), int(jnp.sum(counts > 0)))
  return contenders, x, load


def _window(fn, variables, x, steps: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(variables, x)
  jax.block_until_ready(out)
  return steps / (time.perf_counter() - start)


def main(argv):
  del argv
  cli.output_file('out', _OUT.value)
  cli.output_file('plot', _PLOT.value)
  for name, values, allowed in (
    ('kinds', _KINDS.value, ('mlp', 'cnn')),
    ('modes', _MODES.value, ('train', 'eval')),
    ('routing', _ROUTING.value, ('spread', 'few')),
  ):
    if not values or set(values) - set(allowed):
      raise cli.UsageError(
        f'--{name}={",".join(values)}: choose among {",".join(allowed)}.'
      )
  expert_counts = cli.positive_ints('experts', _EXPERTS.value, minimum=2)
  batches = cli.positive_ints('batches', _BATCHES.value)
  git = provenance.git_state()
  lines = [
    f'$ python {" ".join(sys.argv)}',
    f'# code at {git["commit"]}{"+dirty" if git.get("dirty") else ""}',
    f'# {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; T = 2 tasks, '
    'k = 2, saturated per-example DSelect-k gates; median of '
    f'{_ROUNDS.value} alternating windows of {_STEPS.value} calls',
    '',
    '| experts | E | batch | mode | routing | busiest expert / batch, '
    'experts used | fastest dense examples/s | capacity examples/s (x '
    'dense) | buckets (x dense) | blocks (x dense) | ragged (x dense) | '
    'the Dispatcher, measured choice (x dense) |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  print('\n'.join(lines), flush=True)
  panels = {}  # (kind, mode, batch, routing) -> {contender: [(E, rate)]}
  for kind, mode, batch, routing, num_experts in itertools.product(
    _KINDS.value, _MODES.value, batches, _ROUTING.value, expert_counts
  ):
    contenders, x, load = _contenders(kind, num_experts, batch, mode, routing)
    for fn, variables in contenders.values():  # Compile, measure.
      for _ in range(8):
        jax.block_until_ready(fn(variables, x))
    rates = {name: [] for name in contenders}
    for _ in range(_ROUNDS.value):
      for name, (fn, variables) in contenders.items():
        rates[name].append(batch * _window(fn, variables, x, _STEPS.value))
    median = {n: statistics.median(r) for n, r in rates.items()}
    fastest = max((n for n in median if n.startswith('dense')), key=median.get)
    base = median[fastest]
    cells = [
      f'{median[n]:.0f} (x{median[n] / base:.2f})' if n in median else '-'
      for n in ('capacity', 'buckets', 'blocks', 'ragged', 'chosen')
    ]
    lines.append(
      f'| {kind} | {num_experts} | {batch} | {mode} | {routing} | '
      f'{load[0]} / {batch}, {load[1]} | {base:.0f} '
      f'({fastest[7:-1]}) | {" | ".join(cells)} |'
    )
    print(lines[-1], flush=True)
    panel = panels.setdefault((kind, mode, batch, routing), {})
    for name, rate in (('fastest dense', base), *median.items()):
      if not name.startswith('dense'):
        panel.setdefault(name, []).append((num_experts, rate))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write('\n'.join(lines) + '\n')
  if _PLOT.value:
    _draw(panels, _PLOT.value)


def _draw(panels, path: str) -> None:
  """One panel per (experts, mode, batch): examples/s against E, the
  fastest dense way and each dispatched one, log-log."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(
    1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False
  )
  for ax, ((kind, mode, batch, routing), lines) in zip(axes[0], panels.items()):
    for name, points in lines.items():
      e, rate = zip(*points)
      style = '--' if name == 'fastest dense' else '-'
      ax.plot(e, rate, style, marker='o', label=name)
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_title(f'{kind} experts, {mode}, batch {batch}, {routing} routing')
    ax.set_xlabel('experts E (k = 2, T = 2)')
    ax.set_ylabel('examples/s')
    ax.grid(True, which='both', alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == '__main__':
  cli.run(main)
