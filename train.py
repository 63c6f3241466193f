"""Trains the multi-task MoE. Thin: flags in, trainer.train_and_evaluate out.

  python train.py --config=configs/multimnist.py --workdir=ckpts
  python train.py --config=configs/multimnist.py --workdir=ckpts \
      --config.model.gate.k=4 --config.optimizer.learning_rate=3e-4

Re-running with the same workdir resumes from its newest checkpoint.

On several hosts (or several processes of one), run the same command on each,
with the same workdir on a shared file system:

  python train.py --config=configs/multimnist.py --workdir=/shared/ckpts \
      --multihost --coordinator_address=host0:1234 --num_processes=2 \
      --process_id=0   # 1 on the other host

(on Cloud TPU or under SLURM, --multihost alone: JAX finds the rest).
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
from dselect_jax import config_schema
from dselect_jax import trainer
from dselect_jax.datasets import sources

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/multimnist.py.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Where checkpoints, config.json and metrics go.'
)
_MULTIHOST = flags.DEFINE_bool(
  'multihost',
  False,
  'Call jax.distributed.initialize() first. The coordinator, process count '
  'and process id come from the three flags below, else from the cluster '
  '(Cloud TPU, SLURM, ...).',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'With --multihost: host:port of process 0, the same for every process.',
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes',
  None,
  'With --multihost: how many processes in all.',
  lower_bound=1,
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id',
  None,
  'With --multihost: this process, 0 to --num_processes - 1.',
  lower_bound=0,
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  cli.setup_host_memory()  # First: before JAX starts its threads.
  cli.quiet_orbax()
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; use --flag=value.')
  cluster = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(x is not None for x in cluster) and not _MULTIHOST.value:
    sys.exit(
      'error: --coordinator_address, --num_processes and --process_id '
      'are for --multihost; add it, or leave them out.'
    )
  if _MULTIHOST.value:
    try:
      jax.distributed.initialize(*cluster)
    except (RuntimeError, ValueError) as e:
      sys.exit(
        f'error: --multihost: {str(e).rstrip(".")}; give '
        '--coordinator_address, --num_processes and --process_id '
        'when no cluster is detected.'
      )
  if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
    sys.exit(
      f'error: --workdir={_WORKDIR.value} is a file; give a '
      'directory (it is created when missing).'
    )
  logging.info(
    'JAX %s on %d local devices (%s)',
    jax.__version__,
    jax.local_device_count(),
    jax.devices()[0].platform,
  )
  try:
    config = _CONFIG.value
    config.keys()  # A config that failed to load raises on first use.
  except Exception as e:  # pylint: disable=broad-except
    # config_flags loads the file lazily: a file that failed to load.
    sys.exit(cli.config_load_error(flags.FLAGS['config'].serialize()[9:], e))
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except (
    config_schema.ConfigError,
    sources.DataError,
    checkpointing.CheckpointError,
    trainer.TrainingError,
  ) as e:
    sys.exit(f'error: {e}')
  except trainer.Interrupted as e:
    sys.exit(f'stopped: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
