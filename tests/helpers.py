"""Helpers shared by the test modules (fixtures are in conftest.py).

The factory's builders with the config's data set resolved here, the tiny
config most trainer tests run, and a digest of a folder's files.
"""

import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import multimnist_sample
from dselect_jax import config_schema
from dselect_jax import datasets
from dselect_jax import factory


def tiny_config(num_train_steps=6, **overrides):
  """The sample config shrunk to 2 experts, batch 32 and a few steps."""
  config = multimnist_sample.get_config()
  config.model.num_experts = 2
  config.model.gate.k = 1
  config.batch_size = 32
  config.eval_batch_size = 200
  config.num_train_steps = num_train_steps
  config.log_every_steps = 3
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  return set_fields(config, overrides)


def set_fields(config, fields):
  """``config`` with {'model.gate.k': 2, ...} set (type-checked by the
  locked ConfigDict)."""
  for key, value in fields.items():
    section = config
    *path, last = key.split('.')
    for name in path:
      section = section[name]
    section[last] = value
  return config


def spec_of(config) -> datasets.DataSpec:
  return datasets.resolve(config.data).spec


def validate(config, num_devices: int):
  """What train.py checks before reading any data."""
  config_schema.check_fields(config)
  config_schema.validate(config, num_devices, spec_of(config))


def create_model(config, bn_axis_name=None):
  return factory.create_model(config, spec_of(config), bn_axis_name)


def initial_state(config, model, tx, rng):
  return factory.initial_state(model, tx, rng, spec_of(config))


def abstract_state(config, model, tx):
  return factory.abstract_state(model, tx, spec_of(config))


def tree_digest(folder):
  """SHA-256 of every file but the lock (which holds the last owner's pid),
  and every folder (as None), so that an empty folder left behind shows."""
  digest = {}
  for d, folders, files in os.walk(folder):
    for name in folders:
      digest[os.path.relpath(os.path.join(d, name), folder)] = None
    for name in files:
      if name == '.lock':
        continue
      path = os.path.join(d, name)
      with open(path, 'rb') as f:
        digest[os.path.relpath(path, folder)] = hashlib.sha256(
          f.read()
        ).hexdigest()
  return digest


def sample(split: str):
  """A split of the MultiMNIST sample shipped in the package."""
  return datasets.resolve(multimnist_sample.get_config().data).split(split)


def assert_states_close(a, b, rtol: float):
  """Two train states (or parts of one) equal up to float32 rounding, as
  when only the summation order differs. The convolutions' biases feed
  BatchNorm: their true gradient is 0, so they and their optimizer traces
  hold nothing but rounding noise of the gradient times the learning rate,
  of order 1e-6 whatever the order; they are compared at that scale."""

  def close(path, x, y):
    name = jax.tree_util.keystr(path)
    noise_only = 'Conv_' in name and name.endswith("['bias']")
    np.testing.assert_allclose(
      x, y, rtol=rtol, atol=1e-5 if noise_only else 1e-6, err_msg=name
    )

  jax.tree_util.tree_map_with_path(close, a, b)


def cnn_train_state_on_four_devices(model, variables, images):
  """A CNN MoE's TrainState (SGD 0.1) from ``variables``, its 16
  ``images`` with random classification targets for 2 tasks sharded over
  the 4 fake devices (4, 4, ...), and the routing mask of each device's
  examples, (4, 4, E), from the model's gates: for
  ``dispatched_train_steps``."""
  import optax  # pylint: disable=g-import-not-at-top

  from dselect_jax import dispatch  # pylint: disable=g-import-not-at-top

  state = factory.TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=optax.sgd(0.1),
    batch_stats=variables['batch_stats'],
  )
  rng = np.random.default_rng(6)
  batch = {
    'image': images,
    'target': jnp.asarray(rng.integers(0, 10, (16, 2)), jnp.float32),
    'weight': jnp.ones((16, 2)),
  }
  sharded = jax.tree.map(lambda x: x.reshape((4, 4) + x.shape[1:]), batch)
  _, aux = model.clone(bn_axis_name=None).apply(variables, images, train=False)
  mask = np.asarray(dispatch.routed(aux['expert_weights']))
  return state, sharded, mask.reshape(4, 4, -1)


def dispatched_train_steps(model, state, sharded, task_kinds, capacities):
  """steps.train_step mapped over the 4 fake devices on ``sharded`` (4,
  b, ...), from ``state``, once for each of ``capacities``: None the
  dense step, else ``model`` dispatched at that capacity (an int) or with
  those bounds (a dict of its fields), devices agreeing on the branch.
  Returns each step's (device 0's new params and batch_stats, metrics)."""
  import flax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from dselect_jax import steps  # pylint: disable=g-import-not-at-top

  loss_config = ml_collections.ConfigDict(
    {
      'name': 'cross_entropy',
      'label_smoothing': 0.0,
      'entropy_weight': 0.1,
      'entropy_start_step': 0,
      'entropy_ramp_steps': 0,
      'reachability_weight': 0.0,
      'importance_weight': 0.0,
      'load_weight': 0.0,
    }
  )
  results = []
  for capacity in capacities:
    bounds = {}
    if isinstance(capacity, dict):
      bounds = {**capacity, 'dispatch_axis_name': steps.AXIS}
    elif capacity is not None:
      bounds = {'dispatch_capacity': capacity, 'dispatch_axis_name': steps.AXIS}
    step = jax.pmap(
      functools.partial(
        steps.train_step,
        loss_config=loss_config,
        task_kinds=task_kinds,
        model=model.clone(**bounds),
      ),
      axis_name=steps.AXIS,
      in_axes=(0, 0, None),
    )
    new_state, metrics = step(
      flax.jax_utils.replicate(state), sharded, jax.random.key(5)
    )
    first = jax.tree.map(
      lambda x: np.asarray(x)[0], (new_state.params, new_state.batch_stats)
    )
    results.append((first, metrics))
  return results
