"""Trains the multi-task MoE. Thin: flags in, trainer.train_and_evaluate out.

  python train.py --config=configs/multimnist.py --workdir=ckpts
  python train.py --config=configs/multimnist.py --workdir=ckpts \
      --config.model.gate.k=4 --config.optimizer.learning_rate=3e-4

Re-running with the same workdir resumes from its newest checkpoint.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dselect_jax import checkpointing
from dselect_jax import cli
from dselect_jax import sources
from dselect_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/multimnist.py.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Where checkpoints, config.json and metrics go.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False,
    'Call jax.distributed.initialize() first (coordinator, process count and '
    'id from the environment, as on Cloud TPU or SLURM).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  cli.quiet_orbax()
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; use --flag=value.')
  if _MULTIHOST.value:
    jax.distributed.initialize()
  if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
    sys.exit(f'error: --workdir={_WORKDIR.value} is a file; give a '
             'directory (it is created when missing).')
  logging.info('JAX %s on %d local devices (%s)', jax.__version__,
               jax.local_device_count(), jax.devices()[0].platform)
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (trainer.ConfigError, sources.DataError, checkpointing.CheckpointError,
          trainer.TrainingError) as e:
    sys.exit(f'error: {e}')
  except trainer.Interrupted as e:
    sys.exit(f'stopped: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
