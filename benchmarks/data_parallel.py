"""The same train step under jax.pmap, jit(shard_map) and jit(vmap).

  python benchmarks/data_parallel.py [--batch=256] [--steps=10] [--repeats=3]

steps.train_step of configs/multimnist.py (experts 'loop', conv and norm
as --conv / --norm) on all local devices (one on a plain CPU), three or four
ways, in one process, alternating, warm, best of --repeats windows of
--steps steps: ``jax.pmap`` with BatchNorm averaging over the devices (the
baseline), ``jax.jit(jax.shard_map(...))`` over a one-axis mesh of the same
devices, and, on one device only, ``jax.jit(jax.vmap(...))`` over a leading
axis of size 1 (what the trainer maps on one device, steps.one_device)
and ``jax.pmap`` with a model whose BatchNorm has no axis. All run the same
per-device function; the script first checks that one step from the same
state computes the same gradients, BatchNorm statistics and metrics every
way.
"""

import functools
import time

from absl import flags
import jax
import numpy as np
import optax

from configs import multimnist
from dselect_jax import cli
from dselect_jax import config_schema
from dselect_jax import datasets
from dselect_jax import factory
from dselect_jax import steps

_BATCH = flags.DEFINE_integer(
  'batch', 256, 'Images per step, all devices.', lower_bound=1
)
_STEPS = flags.DEFINE_integer(
  'steps', 10, 'Steps per timed window.', lower_bound=1
)
_REPEATS = flags.DEFINE_integer(
  'repeats', 3, 'Timed windows per way.', lower_bound=1
)
_CONV = flags.DEFINE_enum(
  'conv', 'auto', config_schema.CONV_IMPLS + ('auto',), 'config.model.conv'
)
_NORM = flags.DEFINE_enum(
  'norm', 'auto', config_schema.NORM_IMPLS + ('auto',), 'config.model.norm'
)


def main(argv):
  del argv
  config = multimnist.get_config()
  config.model.conv, config.model.norm = _CONV.value, _NORM.value
  n = jax.local_device_count()
  data_spec = datasets.resolve(config.data).spec
  model = factory.create_model(config, data_spec, bn_axis_name=steps.AXIS)
  tx = factory.create_optimizer(config, 1000)
  state = factory.initial_state(model, tx, jax.random.key(0), data_spec)
  rng = np.random.default_rng(0)
  per_device = _BATCH.value // n
  batch = {  # (n, b, ...): one shard per device.
    'image': rng.random((n, per_device, 36, 36, 1), np.float32),
    'target': rng.integers(0, 10, (n, per_device, 2)).astype(np.int32),
    'weight': np.ones((n, per_device, 2), np.float32),
  }
  key = jax.random.key(1)
  step = functools.partial(
    steps.train_step,
    loss_config=config.loss,
    task_kinds=data_spec.task_kinds,
  )
  alone = functools.partial(  # BatchNorm without collectives.
    steps.train_step,
    loss_config=config.loss,
    task_kinds=data_spec.task_kinds,
    model=factory.create_model(config, data_spec, bn_axis_name=None),
  )

  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (steps.AXIS,))
  spec = jax.sharding.PartitionSpec(steps.AXIS)

  def per_shard(state, batch, key):  # shard_map keeps the leading axis (1).
    squeeze = lambda tree: jax.tree.map(lambda x: x[0], tree)
    state, metrics = step(squeeze(state), squeeze(batch), key)
    return jax.tree.map(lambda x: x[None], (state, metrics))

  ways = {
    'pmap': (
      jax.pmap(
        step, axis_name=steps.AXIS, in_axes=(0, 0, None), donate_argnums=(0,)
      ),
      steps.replicate,
    ),
    'jit(shard_map)': (
      jax.jit(
        jax.shard_map(
          per_shard,
          mesh=mesh,
          in_specs=(spec, spec, None),
          out_specs=spec,
          check_vma=False,
        ),
        donate_argnums=(0,),
      ),
      steps.replicate,
    ),
  }
  if n == 1:
    one_device = steps.one_device  # pylint: disable=protected-access
    ways['jit(vmap)'] = (
      one_device(step, in_axes=(0, 0, None), donate_argnums=(0,)),
      steps.replicate,
    )
    ways['pmap, BatchNorm without axis'] = (
      jax.pmap(
        alone, axis_name=steps.AXIS, in_axes=(0, 0, None), donate_argnums=(0,)
      ),
      steps.replicate,
    )

  # One step from the same state must compute the same thing every way. The
  # parameters are the wrong thing to compare: Adam's first update is
  # lr * g / (|g| + eps), about lr * sign(g), so where a gradient cancels to
  # nearly 0 rounding alone picks the sign (at batch 32, pmap against
  # jit(vmap): one weight moved 1.9e-4 apart, while every gradient agreed
  # to 2e-6 of its leaf's largest value). Compare the gradients instead, as
  # Adam's first moment holds them after one step (mu = (1 - b1) * g), to
  # 1e-5 of each leaf's largest value, with the BatchNorm statistics and the
  # step's metrics.
  states, firsts = {}, {}
  for name, (fn, place) in ways.items():
    states[name], metrics = fn(place(state), batch, key)  # Compiles.
    mu = optax.tree_utils.tree_get(states[name].opt_state, 'mu')
    assert mu is not None, "The check reads Adam's mu; the config has no Adam."
    first = jax.tree.map(
      lambda x: x[0], (mu, states[name].batch_stats, metrics)
    )
    firsts[name] = jax.device_get(first)

  def check(reference, other):  # (+ 1e-12: a leaf that is all zeros.)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(
      other, reference, rtol=0, atol=1e-5 * scale + 1e-12
    )

  for name in ways:
    jax.tree.map(check, firsts['pmap'], firsts[name])

  rates = {name: 0.0 for name in ways}
  for _ in range(_REPEATS.value):
    for name, (fn, _) in ways.items():
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        states[name], metrics = fn(states[name], batch, key)
      jax.block_until_ready(metrics)
      rates[name] = max(
        rates[name], _BATCH.value * _STEPS.value / (time.perf_counter() - start)
      )
  print(
    f'{jax.devices()[0].platform}, {n} device(s), batch {_BATCH.value}, '
    f'conv {factory.conv_impl(config)}, norm {factory.norm_impl(config)}; '
    f'train step, best of {_REPEATS.value} windows of {_STEPS.value} '
    'steps (one step from the same state gave the same gradients, '
    'BatchNorm statistics and metrics every way, to 1e-5 of the '
    'largest value of each array)\n'
  )
  print('| way | train img/s | x pmap |')
  print('| --- | --- | --- |')
  for name, rate in rates.items():
    print(f'| {name} | {rate:.0f} | {rate / rates["pmap"]:.2f} |')


if __name__ == '__main__':
  cli.run(main)
