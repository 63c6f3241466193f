"""Does any XLA:CPU option speed up the expert bank? Each option in a child.

  python benchmarks/xla_cpu_flags.py [--batch=256] [--conv=toeplitz] [--out=FILE]

Times forward + backward of the 8-expert MultiMNIST bank (as
benchmarks/expert_formulations.py, impl 'loop', with the experts' --conv
convolutions) once per XLA_FLAGS setting,
each in its own subprocess, and prints images/s and the ratio to the default
flags (the baseline, run in the same command). The settings are the
library offloads this jaxlib knows (oneDNN, XNNPACK, YNNPACK) and splitting
the CPU into several XLA devices with the batch sharded over them, which is
what the trainer does with --xla_force_host_platform_device_count=N.
"""

import json
import os
import subprocess
import sys
import time

from absl import flags

from dselect_jax import cli

_BATCH = flags.DEFINE_integer(
  'batch', 256, 'Images per step (all devices).', lower_bound=1
)
_REPEATS = flags.DEFINE_integer(
  'repeats', 8, 'Timed steps; best is kept.', lower_bound=1
)
_CHILD = flags.DEFINE_bool('child', False, 'Internal: time one setting.')
_OUT = flags.DEFINE_string('out', None, 'Also write the table here.')
_CONV = flags.DEFINE_enum(
  'conv',
  'toeplitz',
  ['xla', 'toeplitz'],
  "The experts' convolutions (config_schema.CONV_IMPLS).",
)

SETTINGS = (
  ('default', ''),
  ('oneDNN', '--xla_cpu_use_onednn=true'),
  (
    'oneDNN conv+dot',
    '--xla_cpu_experimental_onednn_fusion_type='
    'individual_convolution,individual_dot',
  ),
  (
    'XNNPACK conv+dot',
    '--xla_cpu_experimental_xnn_fusion_type='
    'individual_convolution,individual_dot',
  ),
  (
    'YNNPACK conv+dot',
    '--xla_cpu_experimental_ynn_fusion_type='
    'individual_convolution,individual_dot',
  ),
  ('no YNNPACK', '--xla_cpu_experimental_ynn_fusion_type='),
  ('XNNPACK dot', '--xla_cpu_experimental_xnn_fusion_type=individual_dot'),
  ('oneDNN dot', '--xla_cpu_experimental_onednn_fusion_type=individual_dot'),
  ('2 CPU devices', '--xla_force_host_platform_device_count=2'),
  ('4 CPU devices', '--xla_force_host_platform_device_count=4'),
)


def child(batch, repeats, conv):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dselect_jax import experts
  from dselect_jax import factory  # pylint: disable=g-import-not-at-top

  n = jax.local_device_count()
  bank = experts.ExpertBank(
    8,
    expert_kwargs={
      'bn_axis_name': 'batch',
      **factory.expert_modules(conv, 'xla'),
    },
  )
  x = jax.random.uniform(jax.random.key(0), (n, batch // n, 36, 36, 1))
  variables = jax.jit(bank.init, static_argnames='train')(
    jax.random.key(1), x[0], train=False
  )

  def step(params, batch_stats, x):
    def loss(p):
      out, upd = bank.apply(
        {'params': p, 'batch_stats': batch_stats},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      return jnp.sum(out**2), upd

    grads, upd = jax.grad(loss, has_aux=True)(params)
    return jax.lax.pmean(grads, 'batch'), upd

  step = jax.pmap(step, axis_name='batch', in_axes=(None, None, 0))
  args = variables['params'], variables['batch_stats'], x
  jax.block_until_ready(step(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - start)
  return batch / min(times)


def main(argv):
  del argv
  if _CHILD.value:
    print(
      json.dumps({'rate': child(_BATCH.value, _REPEATS.value, _CONV.value)})
    )
    return
  cli.output_file('out', _OUT.value)
  lines = [
    f'$ python {" ".join(sys.argv)}',
    f'# forward+backward of the 8-expert bank ({_CONV.value} '
    f'convolutions), batch {_BATCH.value}, {os.cpu_count()} CPUs',
  ]
  print('\n'.join(lines), flush=True)
  base = None
  for name, xla_flags in SETTINGS:
    env = dict(os.environ, XLA_FLAGS=xla_flags)
    out = subprocess.run(
      [
        sys.executable,
        __file__,
        '--child',
        f'--batch={_BATCH.value}',
        f'--repeats={_REPEATS.value}',
        f'--conv={_CONV.value}',
      ],
      capture_output=True,
      text=True,
      env=env,
      check=False,
    )
    if out.returncode:
      lines.append(f'{name:18s} error: {out.stderr.strip().splitlines()[-1]}')
    else:
      rate = json.loads(out.stdout.strip().splitlines()[-1])['rate']
      base = base or rate
      lines.append(
        f'{name:18s} {rate:6.0f} images/s  x{rate / base:4.2f}  '
        f'XLA_FLAGS={xla_flags!r}'
      )
    print(lines[-1], flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  cli.run(main)
