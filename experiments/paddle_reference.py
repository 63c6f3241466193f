"""PaddleRec's DSelect-k network rebuilt in PaddlePaddle: an independent
check of ``configs/paddlerec.py``.

  pip install paddlepaddle                     # beside the package; CPU build
  python -m experiments.paddle_reference --check
  python -m experiments.paddle_reference --epochs=2 --init=paddle

``--check`` copies our freshly initialized parameters into the Paddle network
and compares, on one training batch of the faithful data (BatchNorm on batch
statistics), the two per-task losses and every gradient: the same function
in both frameworks, or a named difference. Training (``--epochs``) runs
PaddleRec's recipe in Paddle on the same data as ``configs/paddlerec.py``
(the 100,000 train composites in stored order, batch 256, the last partial
batch dropped, Adam 1e-3), from Paddle's initializers (``--init=paddle``,
what PaddleRec ran) or from our initial parameters (``--init=ours``), and
prints after each epoch the test accuracy of each task and, per task, the
classes it never predicts. PaddleRec's statistic pools these passes.

The network, as PaddleRec's ``models/multitask/dselect_k/net.py`` builds it
(NCHW): per expert conv5x5(1->10)-BN-ReLU-pool2-conv5x5(10->20)-BN-ReLU-
pool2-flatten-Linear(720, 50)-ReLU-Linear(50, 50), then ReLU; one static
DSelect-k gate (k = 2, gamma = 1) shared by both tasks; per task a tower
Linear(50, 50)-ReLU-Linear(50, 50)-ReLU-Linear(50, 10), softmax, clip to
[1e-15, 1 - 1e-15], and ``F.cross_entropy``, which applies a second softmax.
"""

from __future__ import annotations

import json
import math
import time

from absl import flags
import numpy as np

from dselect_jax import cli

_CHECK = flags.DEFINE_bool('check', False, 'Compare losses and gradients.')
_EPOCHS = flags.DEFINE_integer(
  'epochs', 0, 'Epochs to train in Paddle.', lower_bound=0
)
_INIT = flags.DEFINE_enum(
  'init', 'paddle', ['paddle', 'ours'], 'Initial parameters of the training.'
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initialization.')
_OUT = flags.DEFINE_string('out', None, 'Also write the epochs as JSON lines.')

NUM_EXPERTS, K, GAMMA, HIDDEN, NUM_CLASSES = 8, 2, 1.0, 50, 10


def _config():
  from configs import paddlerec  # pylint: disable=g-import-not-at-top

  config = paddlerec.get_config()
  with config.unlocked():
    config.model.conv = 'xla'  # The plain formulation: nn.Conv, nn.BatchNorm.
    config.model.norm = 'xla'
    config.seed = _SEED.value
  return config


# ---------------------------------------------------------------------------
# The Paddle network.
# ---------------------------------------------------------------------------


def build_paddle_net():
  import paddle  # pylint: disable=g-import-not-at-top
  from paddle import nn  # pylint: disable=g-import-not-at-top
  import paddle.nn.functional as F  # pylint: disable=g-import-not-at-top

  init = paddle.nn.initializer

  def linear(fan_in, fan_out, std):
    return nn.Linear(
      fan_in,
      fan_out,
      weight_attr=paddle.ParamAttr(initializer=init.TruncatedNormal(std=std)),
    )

  class Expert(nn.Layer):
    def __init__(self):
      super().__init__()
      xavier = paddle.ParamAttr(initializer=init.XavierNormal())
      self.conv1 = nn.Conv2D(1, 10, 5, weight_attr=xavier)
      self.bn1 = nn.BatchNorm2D(10)
      self.conv2 = nn.Conv2D(10, 20, 5, weight_attr=xavier)
      self.bn2 = nn.BatchNorm2D(20)
      self.linear1 = linear(720, HIDDEN, 1 / math.sqrt(720))
      self.linear2 = linear(HIDDEN, HIDDEN, 1 / math.sqrt(HIDDEN))

    def forward(self, x):  # (B, 1, 36, 36)
      x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (B, 10, 16, 16)
      x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # (B, 20, 6, 6)
      x = F.relu(self.linear1(paddle.flatten(x, 1)))  # (B, 50)
      return F.relu(self.linear2(x))

  class Tower(nn.Layer):
    def __init__(self):
      super().__init__()
      std = 1 / math.sqrt(HIDDEN)  # PaddleRec: 1/sqrt(input_size) for all 3.
      self.layers = nn.LayerList(
        [
          linear(HIDDEN, HIDDEN, std),
          linear(HIDDEN, HIDDEN, std),
          linear(HIDDEN, NUM_CLASSES, std),
        ]
      )

    def forward(self, x):
      x = F.relu(self.layers[0](x))
      x = F.relu(self.layers[1](x))
      return self.layers[2](x)

  m = math.ceil(math.log2(NUM_EXPERTS))
  codes = (
    (np.arange(NUM_EXPERTS)[:, None] >> np.arange(m - 1, -1, -1)) & 1
  ) > 0

  class Net(nn.Layer):
    def __init__(self):
      super().__init__()
      self.experts = nn.LayerList([Expert() for _ in range(NUM_EXPERTS)])
      self.z = self.create_parameter(
        [K, m], default_initializer=init.Uniform(-GAMMA / 100, GAMMA / 100)
      )
      self.w = self.create_parameter([K], default_initializer=init.Uniform())
      self.towers = nn.LayerList([Tower(), Tower()])
      self.codes = paddle.to_tensor(codes[None])  # (1, E, M)

    def expert_weights(self):
      t = self.z[:, None, :]  # (K, 1, M)
      s = paddle.where(
        t <= -GAMMA / 2,
        paddle.zeros_like(t),
        paddle.where(
          t >= GAMMA / 2,
          paddle.ones_like(t),
          -2 / GAMMA**3 * t**3 + 3 / (2 * GAMMA) * t + 0.5,
        ),
      )
      r = paddle.prod(paddle.where(self.codes, s, 1 - s), axis=2)  # (K, E)
      return paddle.sum(F.softmax(self.w)[:, None] * r, axis=0)  # (E,)

    def forward(self, x):
      experts = paddle.stack([e(x) for e in self.experts])  # (E, B, H)
      mixed = paddle.sum(self.expert_weights()[:, None, None] * experts, 0)
      return [
        paddle.clip(F.softmax(t(mixed)), 1e-15, 1 - 1e-15) for t in self.towers
      ]  # each (B, C), probabilities

  return Net()


def paddle_losses(probs, labels):
  import paddle  # pylint: disable=g-import-not-at-top
  import paddle.nn.functional as F  # pylint: disable=g-import-not-at-top

  return [
    F.cross_entropy(p, paddle.to_tensor(labels[:, t : t + 1].astype('int64')))
    for t, p in enumerate(probs)
  ]


def load_ours_into(net, params):
  """Our Flax parameters -> the Paddle network (NHWC -> NCHW)."""
  import paddle  # pylint: disable=g-import-not-at-top

  def put(param, value):
    value = np.asarray(value, np.float32)
    assert tuple(param.shape) == value.shape, (
      param.name,
      param.shape,
      value.shape,
    )
    param.set_value(paddle.to_tensor(value))

  # Our flatten order is (h, w, c), Paddle's (c, h, w).
  h, w, c = np.meshgrid(
    np.arange(6), np.arange(6), np.arange(20), indexing='ij'
  )
  ours_row = (h * 120 + w * 20 + c).transpose(2, 0, 1).reshape(-1)
  for e, expert in enumerate(net.experts):
    p = params['experts'][f'expert_{e}']
    put(expert.conv1.weight, np.transpose(p['Conv_0']['kernel'], (3, 2, 0, 1)))
    put(expert.conv1.bias, p['Conv_0']['bias'])
    put(expert.conv2.weight, np.transpose(p['Conv_1']['kernel'], (3, 2, 0, 1)))
    put(expert.conv2.bias, p['Conv_1']['bias'])
    for bn, name in ((expert.bn1, 'BatchNorm_0'), (expert.bn2, 'BatchNorm_1')):
      put(bn.weight, p[name]['scale'])
      put(bn.bias, p[name]['bias'])
    put(expert.linear1.weight, np.asarray(p['Dense_0']['kernel'])[ours_row])
    put(expert.linear1.bias, p['Dense_0']['bias'])
    put(expert.linear2.weight, p['Dense_1']['kernel'])
    put(expert.linear2.bias, p['Dense_1']['bias'])
  put(net.z, params['gate_0']['z_logits'])
  put(net.w, params['gate_0']['w_logits'])
  for t, tower in enumerate(net.towers):
    for i, layer in enumerate(tower.layers):
      put(layer.weight, params[f'tower_{t}'][f'Dense_{i}']['kernel'])
      put(layer.bias, params[f'tower_{t}'][f'Dense_{i}']['bias'])
  return ours_row


def _data(config):
  from dselect_jax import datasets  # pylint: disable=g-import-not-at-top

  dataset = datasets.resolve(config.data)
  return dataset.train, dataset.test


def _images(images_uint8):
  """uint8 (B, 36, 36) -> float32 (B, 1, 36, 36) in [0, 1], as PaddleRec."""
  return (images_uint8.astype(np.float32) / 255.0)[:, None]


def _initial_params(config):
  import jax  # pylint: disable=g-import-not-at-top

  from dselect_jax import datasets  # pylint: disable=g-import-not-at-top
  from dselect_jax import factory  # pylint: disable=g-import-not-at-top

  spec = datasets.resolve(config.data).spec
  model = factory.create_model(config, spec)
  tx = factory.create_optimizer(config, 1)
  state = factory.initial_state(model, tx, jax.random.key(config.seed), spec)
  return model, state


def check(config):
  """Same weights, same batch: our losses and gradients against Paddle's."""
  import jax  # pylint: disable=g-import-not-at-top
  import paddle  # pylint: disable=g-import-not-at-top

  from dselect_jax import steps  # pylint: disable=g-import-not-at-top
  from dselect_jax.datasets import multimnist  # pylint: disable=g-import-not-at-top

  train, _ = _data(config)
  images, labels = train.images[:256], train.labels[:256]
  model, state = _initial_params(config)

  def loss_fn(params):
    (logits, _), _ = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      multimnist.to_model_input(images),
      train=True,
      mutable=['batch_stats'],
      rngs={'gating': jax.random.key(0)},
    )
    losses = steps.task_losses(logits, labels, config.loss)  # (T,)
    return losses.sum(), losses

  (_, ours), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  net = build_paddle_net()
  net.train()
  ours_row = load_ours_into(net, jax.device_get(state.params))
  theirs = paddle_losses(net(paddle.to_tensor(_images(images))), labels)
  paddle.add_n(theirs).backward()

  grads = jax.device_get(grads)
  pairs = [('gate z', grads['gate_0']['z_logits'], net.z.grad)]
  pairs.append(('gate w', grads['gate_0']['w_logits'], net.w.grad))
  for e, expert in enumerate(net.experts):
    g = grads['experts'][f'expert_{e}']
    pairs += [
      (
        f'expert {e} conv1',
        np.transpose(g['Conv_0']['kernel'], (3, 2, 0, 1)),
        expert.conv1.weight.grad,
      ),
      (
        f'expert {e} conv2',
        np.transpose(g['Conv_1']['kernel'], (3, 2, 0, 1)),
        expert.conv2.weight.grad,
      ),
      (
        f'expert {e} bn1 scale',
        g['BatchNorm_0']['scale'],
        expert.bn1.weight.grad,
      ),
      (
        f'expert {e} linear1',
        np.asarray(g['Dense_0']['kernel'])[ours_row],
        expert.linear1.weight.grad,
      ),
      (
        f'expert {e} linear2',
        g['Dense_1']['kernel'],
        expert.linear2.weight.grad,
      ),
    ]
  for t, tower in enumerate(net.towers):
    for i, layer in enumerate(tower.layers):
      pairs.append(
        (
          f'tower {t} layer {i}',
          grads[f'tower_{t}'][f'Dense_{i}']['kernel'],
          layer.weight.grad,
        )
      )
  print(f'losses, ours:   {np.asarray(ours).round(6).tolist()}')
  print(f'losses, Paddle: {[round(float(x), 6) for x in theirs]}')
  worst = 0.0
  for name, a, b in pairs:
    a, b = np.asarray(a), b.numpy()
    rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    worst = max(worst, rel)
    if rel > 1e-3:
      print(f'{name}: max |ours - Paddle| / max |Paddle| = {rel:.2e}')
  loss_diff = max(abs(float(a) - float(b)) for a, b in zip(ours, theirs))
  print(
    f'{len(pairs)} gradients compared: worst relative difference '
    f'{worst:.2e}; losses differ by at most {loss_diff:.2e}'
  )
  return worst < 1e-3 and loss_diff < 1e-5


def train(config):
  import paddle  # pylint: disable=g-import-not-at-top

  paddle.seed(config.seed)
  train_split, test_split = _data(config)
  net = build_paddle_net()
  if _INIT.value == 'ours':
    import jax  # pylint: disable=g-import-not-at-top

    _, state = _initial_params(config)
    load_ours_into(net, jax.device_get(state.params))
  opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=net.parameters())
  batch = config.batch_size
  steps_per_epoch = len(train_split) // batch  # drop_last
  records, correct_all, count_all = [], np.zeros(2), 0
  out = open(_OUT.value, 'w') if _OUT.value else None
  start = time.perf_counter()
  for epoch in range(1, _EPOCHS.value + 1):
    net.train()
    for i in range(steps_per_epoch):
      rows = slice(i * batch, (i + 1) * batch)
      probs = net(paddle.to_tensor(_images(train_split.images[rows])))
      loss = paddle.add_n(paddle_losses(probs, train_split.labels[rows]))
      loss.backward()
      opt.step()
      opt.clear_grad()
      if (i + 1) % 50 == 0:
        print(
          f'epoch {epoch} step {i + 1}/{steps_per_epoch}: loss '
          f'{float(loss):.4f}, {time.perf_counter() - start:.0f} s',
          flush=True,
        )
    net.eval()
    predictions = []
    with paddle.no_grad():
      for i in range(0, len(test_split), 1000):
        probs = net(paddle.to_tensor(_images(test_split.images[i : i + 1000])))
        predictions.append(np.stack([p.numpy().argmax(-1) for p in probs], 1))
    predicted = np.concatenate(predictions)  # (N, T)
    hit = predicted == test_split.labels
    correct_all += hit.sum(0)
    count_all += len(hit)
    never = [
      sorted(set(range(NUM_CLASSES)) - set(predicted[:, t].tolist()))
      for t in range(2)
    ]
    record = {
      'epoch': epoch,
      'test_accuracy': hit.mean(0).round(5).tolist(),
      'pooled_so_far': (correct_all / count_all).round(5).tolist(),
      'classes_never_predicted': never,
      'train_loss_last_batch': round(float(loss), 5),
      'expert_weights': net.expert_weights().numpy().round(3).tolist(),
      'seconds': round(time.perf_counter() - start, 1),
    }
    print(json.dumps(record), flush=True)
    records.append(record)
    if out:
      out.write(json.dumps(record) + '\n')
      out.flush()
  if out:
    out.close()
  return records


def main(argv):
  del argv
  cli.output_file('out', _OUT.value)
  try:
    import paddle  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise cli.UsageError(
      'this experiment runs PaddlePaddle: pip install paddlepaddle (CPU).'
    ) from None

  paddle.set_device('cpu')
  config = _config()
  print(f'paddle {paddle.__version__}')
  ok = True
  if _CHECK.value:
    ok = check(config)
  if _EPOCHS.value:
    train(config)
  if not ok:
    raise SystemExit('the two frameworks compute different functions')


if __name__ == '__main__':
  cli.run(main)
