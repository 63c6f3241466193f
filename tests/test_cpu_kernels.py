"""The CPU kernels against Flax: nn.BatchNorm + nn.relu + 2x2 max pooling.

The reference is Flax's own BatchNorm (training mode: batch statistics and
the running-average update; evaluation: running averages), JAX's relu and
JAX's max (whose gradient splits ties equally), differentiated by JAX.
"""

import functools
import json
import os
import re
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dselect_jax import blocks
from dselect_jax import cpu
from dselect_jax import experts
from dselect_jax import factory
from dselect_jax import models
from dselect_jax.cpu import kernels as cpu_kernels
from tests import helpers


class FlaxBlock(nn.Module):
  use_running_average: bool
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(
      use_running_average=self.use_running_average,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=self.axis_name,
      name='bn',
    )(x)
    b, h, w, c = x.shape
    return nn.relu(x).reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class KernelBlock(nn.Module):
  use_running_average: bool
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, mask=None):
    return cpu.BatchNormReLUPool(
      self.use_running_average, axis_name=self.axis_name, name='bn'
    )(x, mask)


def random_variables(rng, c):
  """scale, bias and running stats away from their initial 1, 0, 0, 1."""
  return {
    'params': {
      'bn': {
        'scale': rng.normal(size=c).astype(np.float32),
        'bias': rng.normal(size=c).astype(np.float32),
      }
    },
    'batch_stats': {
      'bn': {
        'mean': rng.normal(size=c).astype(np.float32),
        'var': rng.uniform(0.5, 2, size=c).astype(np.float32),
      }
    },
  }


def tied_input(rng, shape):
  """Integers in [-3, 3]: many windows whose maximum occurs 2-4 times."""
  return rng.integers(-3, 4, size=shape).astype(np.float32)


def train_outputs(block, variables, x, dy):
  """y, the updated batch_stats, and d sum(y * dy) / d (x, params)."""

  def loss(params, x):
    y, upd = block.apply(
      {**variables, 'params': params}, x, mutable=['batch_stats']
    )
    return jnp.sum(y * dy), (y, upd['batch_stats'])

  (_, (y, stats)), (dparams, dx) = jax.value_and_grad(
    loss, argnums=(0, 1), has_aux=True
  )(variables['params'], x)
  return y, stats, dparams, dx


def assert_trees_close(a, b, rtol=2e-5, atol=2e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), rtol=rtol, atol=atol
    )


@pytest.fixture(autouse=True)
def kernels(request):
  """Every test here but those marked ``without_kernels`` (the ones about
  a missing or failing compiler) needs the kernels built: skipped, with the
  compiler's message, where they do not build."""
  if not request.node.get_closest_marker('without_kernels'):
    request.getfixturevalue('cpu_kernels_built')


@pytest.mark.parametrize(
  'shape,ties',
  [((8, 6, 4, 3), True), ((16, 12, 12, 20), False), ((4, 32, 32, 10), True)],
)
def test_training_mode_equals_flax(shape, ties):
  rng = np.random.default_rng(sum(shape))
  x = (
    tied_input(rng, shape)
    if ties
    else rng.normal(1.0, 3.0, size=shape).astype(np.float32)
  )
  b, h, w, c = shape
  dy = rng.normal(size=(b, h // 2, w // 2, c)).astype(np.float32)
  variables = random_variables(rng, c)
  got = train_outputs(KernelBlock(False), variables, x, dy)
  want = train_outputs(FlaxBlock(False), variables, x, dy)
  assert_trees_close(got, want)
  if ties:  # The input really has tied positive maxima.
    windows = np.asarray(x).reshape(b, h // 2, 2, w // 2, 2, c)
    top = windows.max(axis=(2, 4), keepdims=True)
    assert ((windows == top).sum(axis=(2, 4)) > 1).mean() > 0.2


def test_evaluation_mode_equals_flax():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 8, 8, 5)).astype(np.float32)
  variables = random_variables(rng, 5)
  got = KernelBlock(True).apply(variables, x)
  want = FlaxBlock(True).apply(variables, x)
  np.testing.assert_array_equal(got, want)  # The same ops in the same order.


def test_gradients_through_mean_and_var():
  """The batch statistics are outputs too; their cotangents reach x."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 4, 6, 3)).astype(np.float32)
  scale, bias = (rng.normal(size=3).astype(np.float32) for _ in range(2))
  u, v = (rng.normal(size=3).astype(np.float32) for _ in range(2))

  def loss(fn, x, scale, bias):
    y, mean, var = fn(x, scale, bias)
    return jnp.sum(y**2) + jnp.sum(mean * u) + jnp.sum(var * v)

  def reference(x, scale, bias):  # nn.BatchNorm's statistics, by hand.
    mean = x.mean(axis=(0, 1, 2))
    var = jnp.maximum((x * x).mean(axis=(0, 1, 2)) - mean**2, 0.0)
    z = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
    y = blocks.max_pool_2x2(nn.relu(z))
    return y, mean, var

  grad = functools.partial(jax.grad, argnums=(0, 1, 2))
  got = grad(functools.partial(loss, cpu_kernels.bn_relu_pool))(x, scale, bias)
  want = grad(functools.partial(loss, reference))(x, scale, bias)
  assert_trees_close(got, want)


def test_pmap_statistics_span_the_devices():
  """With axis_name, 4 devices of 3 images each equal Flax on the same 4."""
  devices = jax.local_devices()[:4]
  assert len(devices) == 4  # conftest asks for 4 host devices.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 3, 8, 6, 2)).astype(np.float32)
  dy = rng.normal(size=(4, 3, 4, 3, 2)).astype(np.float32)
  variables = random_variables(rng, 2)

  def run(block):
    step = jax.pmap(
      functools.partial(train_outputs, block),
      axis_name='i',
      in_axes=(None, 0, 0),
      devices=devices,
    )
    return step(variables, x, dy)

  got = run(KernelBlock(False, axis_name='i'))
  want = run(FlaxBlock(False, axis_name='i'))
  assert_trees_close(got, want)
  # And the statistics really are global: one device alone differs.
  alone = train_outputs(FlaxBlock(False), variables, x[0], dy[0])
  assert not np.allclose(got[0][0], alone[0], atol=1e-3)


def test_expert_with_kernels_equals_expert_with_flax():
  x = jax.random.uniform(jax.random.key(0), (8, 36, 36, 1))
  by_pair = {  # (conv, norm): Flax's own, the kernels' BatchNorm, all kernels.
    pair: experts.MultiMNISTExpert(**factory.expert_modules(*pair))
    for pair in (
      ('xla', 'xla'),
      ('toeplitz', 'kernel'),
      ('kernel', 'kernel'),
    )
  }
  variables = by_pair['xla', 'xla'].init(jax.random.key(1), x, train=False)
  for pair, expert in by_pair.items():
    assert jax.tree.structure(variables) == jax.tree.structure(
      expert.init(jax.random.key(1), x, train=False)
    ), pair
  for train in (True, False):
    outs = {
      pair: expert.apply(
        variables, x, train=train, mutable=['batch_stats'] if train else False
      )
      for pair, expert in by_pair.items()
    }
    for pair in (('toeplitz', 'kernel'), ('kernel', 'kernel')):
      assert_trees_close(outs[pair], outs['xla', 'xla'], rtol=1e-4, atol=1e-5)


# x[0, i, j, 0] = 4 i + j on a 3 x 4 image, for the kernels by hand.
X34 = jnp.arange(12.0).reshape(1, 3, 4, 1)


@pytest.mark.without_kernels
def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv('DSELECT_JAX_KERNEL_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'no-such-compiler')
  with pytest.raises(
    cpu_kernels.KernelBuildError,
    match=r"no C\+\+ compiler: 'no-such-compiler'.*"
    r'--config.model.norm=xla --config.model.conv=toeplitz',
  ):
    cpu_kernels._build_and_register()  # pylint: disable=protected-access


@pytest.mark.without_kernels
def test_failing_compiler_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv('DSELECT_JAX_KERNEL_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')  # Runs, and exits 1.
  with pytest.raises(
    cpu_kernels.KernelBuildError,
    match=r'(?s)compiling .*bn_relu_pool.cc .*direct_conv.cc failed.*'
    r'--config.model.norm=xla --config.model.conv=toeplitz',
  ):
    cpu_kernels._build_and_register()  # pylint: disable=protected-access
  assert not list(tmp_path.iterdir())  # No half-written library is left.


def test_auto_falls_back_to_xla_without_the_kernels(monkeypatch):
  from configs import multimnist  # pylint: disable=g-import-not-at-top
  from dselect_jax import factory  # pylint: disable=g-import-not-at-top

  config = multimnist.get_config()
  assert config.model.norm == 'auto'
  assert factory.norm_impl(config) == 'kernel'  # They build here.
  monkeypatch.setattr(cpu_kernels, 'available', lambda: False)
  assert factory.norm_impl(config) == 'xla'
  assert factory.conv_impl(config) == 'toeplitz'
  kwargs = helpers.create_model(config).expert_kwargs
  assert kwargs['block_module'] is None
  assert kwargs['conv_module'] is cpu.ToeplitzConv
  config.model.norm = 'kernel'  # Asked for by name: no fallback.
  config.model.conv = 'kernel'
  assert factory.norm_impl(config) == 'kernel'
  assert factory.conv_impl(config) == 'kernel'


@pytest.mark.slow  # For the 5-minute default run.
def test_a_truncated_library_is_rebuilt(
  cpu_kernels_built, monkeypatch, tmp_path
):
  """A library cut short (a full disk, a killed copy) would load and then
  crash the process when a kernel runs: its digest gives it away, and it is
  rebuilt with a warning that names it."""
  del cpu_kernels_built
  build = cpu_kernels._build  # pylint: disable=protected-access
  built = build()  # The session's library, and its digest beside it.
  for name in os.listdir(os.path.dirname(built)):
    if name.startswith(os.path.basename(built)):
      shutil.copy(os.path.join(os.path.dirname(built), name), tmp_path)
  monkeypatch.setenv('DSELECT_JAX_KERNEL_CACHE', str(tmp_path))
  warnings = []
  monkeypatch.setattr(
    cpu_kernels.logging,
    'warning',
    lambda msg, *args: warnings.append(msg % args),
  )
  path = build()  # The copy: intact, so not rebuilt.
  assert path == str(tmp_path / os.path.basename(built)) and not warnings
  with open(path, 'rb') as f:
    whole = f.read()
  with open(path, 'wb') as f:
    f.write(whole[: len(whole) // 2])
  assert build() == path
  assert (
    len(warnings) == 1 and path in warnings[0] and 'damaged' in (warnings[0])
  )
  with open(path, 'rb') as f:
    assert len(f.read()) == len(whole)
  # Intact now: no second rebuild.
  assert build() == path and len(warnings) == 1


def _conv_relu_pool_reference(x, kernel, bias):
  """Per group: XLA's convolution (highest precision), + bias, ReLU, Flax-
  style 2x2 max pooling: an independent computation of conv_relu_pool."""
  groups, _, _, cg, _ = kernel.shape
  out = []
  for g in range(groups):
    z = jax.lax.conv_general_dilated(
      x[..., g * cg : (g + 1) * cg],
      kernel[g],
      (1, 1),
      'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision='highest',
    )
    out.append(blocks.max_pool_2x2(nn.relu(z + bias[g])))
  return jnp.concatenate(out, axis=-1)


def test_conv_relu_pool_by_hand():
  # X34 (4 i + j) with a 2x2 kernel of ones: the window sums are
  # 4 (4 i + j) + 10, i in 0..1, j in 0..2; keep columns 0..1 (an even
  # width) by giving the kernel a 3x4 input's first 3 columns.
  x = X34[:, :, :3]  # (1, 3, 3, 1): Ho = Wo = 2 with a 2x2 kernel.
  ones = jnp.ones((1, 2, 2, 1, 1))
  # Sums 10, 14 / 26, 30: the pool keeps 30; a bias of -31 makes it -1,
  # which the ReLU clips to 0.
  y = cpu_kernels.conv_relu_pool(x, ones, jnp.array([[-20.0]]))
  np.testing.assert_array_equal(y, [[[[10.0]]]])
  y = cpu_kernels.conv_relu_pool(x, ones, jnp.array([[-31.0]]))
  np.testing.assert_array_equal(y, [[[[0.0]]]])
  # Two groups on two channels, each its own kernel: group 0 reads channel
  # 0 (x) with a kernel of ones; group 1 reads channel 1 (-x) with -1s and
  # writes two outputs: the window sums again, then twice them.
  x2 = jnp.concatenate([x, -x], axis=-1)
  kernel = jnp.zeros((2, 2, 2, 1, 2))
  kernel = kernel.at[0, ..., 0, 0].set(1).at[1, ..., 0, 0].set(-1)
  kernel = kernel.at[1, ..., 0, 1].set(-2)
  y = cpu_kernels.conv_relu_pool(x2, kernel, jnp.zeros((2, 2)))
  np.testing.assert_array_equal(y[0, 0, 0], [30, 0, 30, 60])


@pytest.mark.parametrize(
  'shape,kernel_shape',
  [
    ((3, 36, 36, 1), (1, 5, 5, 1, 80)),  # The experts' first convolutions.
    ((2, 16, 16, 80), (8, 5, 5, 10, 20)),  # Their second ones.
    ((2, 9, 40, 6), (3, 2, 3, 2, 7)),  # Three blocks of 16 columns, odd Fg.
    ((1, 7, 7, 4), (1, 4, 4, 4, 12)),  # Fg a multiple of 4.
  ],
)
def test_conv_relu_pool_equals_xla(shape, kernel_shape):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], shape)
  kernel = jax.random.normal(keys[1], kernel_shape)
  bias = jax.random.normal(keys[2], (kernel_shape[0], kernel_shape[-1]))
  got = cpu_kernels.conv_relu_pool(x, kernel, bias)
  np.testing.assert_allclose(
    got, _conv_relu_pool_reference(x, kernel, bias), rtol=1e-5, atol=1e-5
  )
  # Under vmap, image by image.
  np.testing.assert_array_equal(
    jax.vmap(lambda x: cpu_kernels.conv_relu_pool(x, kernel, bias))(x[:, None]),
    got[:, None],
  )


def test_conv_relu_pool_refuses_what_does_not_fit():
  x = jnp.ones((1, 6, 6, 2))
  odd = re.escape(
    'must be float32 with H >= kh and W >= kw and even H - kh + 1'
  )
  with pytest.raises(ValueError, match=odd):  # 5 x 5 outputs.
    cpu_kernels.conv_relu_pool(x, jnp.ones((1, 2, 2, 2, 3)), jnp.ones((1, 3)))
  with pytest.raises(
    ValueError, match=r'float32 with H >= kh.*; got'
  ):  # G Cg = 4
    cpu_kernels.conv_relu_pool(x, jnp.ones((2, 3, 3, 2, 3)), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r'kernel \(G, kh, kw, Cg, Fg\)'):
    cpu_kernels.conv_relu_pool(x, jnp.ones((3, 3, 2, 3)), jnp.ones((1, 3)))


def test_fused_evaluation_with_the_kernels_computes_the_loops_function():
  """What the factory builds on the CPU: evaluation by conv_relu_pool, against
  the loop of Flax's own modules (XLA's convolution and BatchNorm)."""
  x = jax.random.uniform(jax.random.key(3), (5, 36, 36, 1))
  loop = models.MultiTaskMoE(num_tasks=2, num_experts=3, gate_kwargs={'k': 2})
  fused = loop.clone(
    bank_kwargs=flax.core.FrozenDict(
      fused_eval=True, eval_block=cpu_kernels.conv_relu_pool
    )
  )
  variables = loop.init(
    {'params': jax.random.key(0), 'gating': jax.random.key(1)}, x, train=False
  )
  # Every BatchNorm off its identity, so that the folding matters.
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
    lambda path, v: (
      v * rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
      + (0 if 'var' in jax.tree_util.keystr(path) else 0.1)
      if 'BatchNorm' in jax.tree_util.keystr(path)
      else v
    ),
    variables,
  )
  expected, _ = loop.apply(variables, x, train=False)
  logits, _ = fused.apply(variables, x, train=False)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  ffi = [
    eqn.params['target_name']
    for eqn in jax.make_jaxpr(functools.partial(fused.apply, train=False))(
      variables, x
    ).jaxpr.eqns
    if eqn.primitive.name == 'ffi_call'
  ]
  assert ffi == ['DselectConvReluPool'] * 2


def test_direct_conv_by_hand():
  # X34 (x[i, j] = 4 i + j, 3 x 4) with the 2x2 kernel [[1, 2], [3, 4]]:
  # y[i, j] = x[i, j] + 2 x[i, j+1] + 3 x[i+1, j] + 4 x[i+1, j+1] + 0.5
  #         = 10 (4 i + j) + 2 + 12 + 20 + 0.5 = 40 i + 10 j + 34.5.
  kernel = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
  y = cpu_kernels.conv2d(X34, kernel, jnp.array([0.5]))
  np.testing.assert_array_equal(
    y[0, ..., 0], [[34.5, 44.5, 54.5], [74.5, 84.5, 94.5]]
  )
  # Gradients of sum(y): dkernel[dy, dx] sums the pixels that tap meets
  # (rows dy..dy+1, columns dx..dx+2); dbias counts the 6 outputs; dx[i, j]
  # sums the taps that reach pixel (i, j).
  dx, dk, db = jax.grad(
    lambda x, k, b: jnp.sum(cpu_kernels.conv2d(x, k, b)), argnums=(0, 1, 2)
  )(X34, kernel, jnp.array([0.5]))
  np.testing.assert_array_equal(dk[..., 0, 0], [[18, 24], [42, 48]])
  np.testing.assert_array_equal(db, [6])
  np.testing.assert_array_equal(
    dx[0, ..., 0], [[1, 3, 3, 2], [4, 10, 10, 6], [3, 7, 7, 4]]
  )


def test_direct_conv_refuses_what_does_not_fit():
  with pytest.raises(ValueError, match=r'H >= kh and W >= kw; got float32'):
    cpu_kernels.conv2d(
      jnp.ones((1, 3, 3, 1)), jnp.ones((4, 1, 1, 2)), jnp.ones(2)
    )
  with pytest.raises(ValueError, match=r'kernel must be \(kh, kw, C, F\)'):
    cpu_kernels.conv2d(jnp.ones((1, 3, 3, 1)), jnp.ones((2, 2, 2)), jnp.ones(2))
  with pytest.raises(ValueError, match='features and kernel_size must be >= 1'):
    cpu.DirectConv(0)


@pytest.mark.without_kernels
def test_calibration_is_measured_once_and_kept_beside_the_kernels(
  monkeypatch, tmp_path
):
  from dselect_jax.cpu import calibrate  # pylint: disable=g-import-not-at-top

  library = tmp_path / 'cpu_kernels-key.so'
  monkeypatch.setattr(calibrate.kernels, 'load', lambda: str(library))
  monkeypatch.setattr(calibrate, '_times', None)
  calls = []

  def measure():
    calls.append(1)
    return {'direct_s': 0.05, 'toeplitz_s': 0.005}

  monkeypatch.setattr(calibrate, 'measure', measure)
  assert calibrate.direct_conv_is_faster() is False  # 50 ms > 5 ms.
  assert calibrate.direct_conv_is_faster() is False
  assert len(calls) == 1
  stored = tmp_path / 'cpu_kernels-key.so.calibration.json'
  assert json.loads(stored.read_text()) == {
    'direct_s': 0.05,
    'toeplitz_s': 0.005,
  }
  assert sorted(p.name for p in tmp_path.iterdir()) == [stored.name]
  # A new process reads the file instead of measuring.
  monkeypatch.setattr(calibrate, '_times', None)
  stored.write_text(json.dumps({'direct_s': 0.001, 'toeplitz_s': 0.004}))
  assert calibrate.direct_conv_is_faster() is True
  assert len(calls) == 1
  # A damaged file is measured again and replaced.
  monkeypatch.setattr(calibrate, '_times', None)
  stored.write_text('{"direct_s": 0.0')
  assert calibrate.direct_conv_is_faster() is False
  assert len(calls) == 2
  assert json.loads(stored.read_text())['toeplitz_s'] == 0.005


def test_calibration_times_the_same_work_both_ways():
  """The two contenders compute the same gradients (so the race is fair),
  and both are timed."""
  from dselect_jax.cpu import calibrate  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for x_shape, k_shape in calibrate.SHAPES:
    args = (
      jnp.asarray(rng.standard_normal(x_shape, np.float32)),
      jnp.asarray(rng.standard_normal(k_shape, np.float32)),
      jnp.asarray(rng.standard_normal(k_shape[-1:], np.float32)),
    )
    direct = calibrate._train_cost(cpu_kernels.conv2d)(*args)  # pylint: disable=protected-access
    toeplitz = calibrate._train_cost(calibrate._toeplitz)(*args)  # pylint: disable=protected-access
    assert_trees_close(direct, toeplitz, rtol=1e-4, atol=1e-2)
  times = calibrate.measure()
  assert set(times) == {'direct_s', 'toeplitz_s'}
  assert all(t > 0 for t in times.values())


class RoutedBlock(nn.Module):
  """BatchNorm over the masked examples (blocks.RoutedBatchNorm), ReLU,
  pooling: the XLA ops the masked kernel must match."""

  @nn.compact
  def __call__(self, x, mask):
    x = blocks.RoutedBatchNorm(use_running_average=False, name='bn')(x, mask)
    return blocks.max_pool_2x2(nn.relu(x))


@pytest.mark.parametrize('selected', [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
def test_the_masked_block_is_batchnorm_over_the_masked_examples(selected):
  """Outputs of the selected examples, the gradients of the parameters and
  of x (zero for the others), and the running averages: the XLA ops'
  (with none selected, the averages kept and no gradient)."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(5, 6, 4, 3)), jnp.float32)
  mask = np.asarray(selected, bool)
  probe = jnp.asarray(rng.normal(size=(5, 3, 2, 3)), jnp.float32)
  variables = random_variables(rng, 3)

  def loss(block, params, x):
    y, updates = block.apply(
      {**variables, 'params': params},
      x,
      jnp.asarray(mask),
      mutable=['batch_stats'],
    )
    # Only the selected examples' outputs count (as in the mixture).
    value = jnp.sum(jnp.sin(y) * probe * mask[:, None, None, None])
    return value, (y[mask], updates)

  def run(block):
    grad = jax.grad(functools.partial(loss, block), (0, 1), has_aux=True)
    return grad(variables['params'], x)

  got = run(KernelBlock(False))
  want = run(RoutedBlock())
  assert_trees_close(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got[0][1][~mask], 0.0)
  if not mask.any():
    jax.tree.map(
      np.testing.assert_array_equal,
      got[1][1]['batch_stats'],
      variables['batch_stats'],
    )
