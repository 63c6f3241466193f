"""Copies a workdir's tested checkpoint, params only, into a folder to share.

  python scripts/export_params.py --workdir=ckpts --out=shared_model

Writes OUT/params/<step> (parameters and BatchNorm statistics; no optimizer
state) and OUT/config.json, so that `python eval.py --workdir=OUT` evaluates
that checkpoint without training. Default: the best-on-validation checkpoint.
"""

import os
import sys

from absl import flags

from dselect_jax import checkpointing
from dselect_jax import cli
from dselect_jax import config_schema
from dselect_jax import datasets
from dselect_jax import evaluate
from dselect_jax import factory
from dselect_jax import files

_WORKDIR = flags.DEFINE_string('workdir', None, 'A train.py workdir.')
_OUT = flags.DEFINE_string('out', None, 'The folder to write.')
_STEP = flags.DEFINE_integer(
  'step', None, 'A periodic checkpoint instead of the best one.'
)
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  out = cli.output_folder('out', _OUT.value)  # Before any work.
  try:
    config = evaluate.load_workdir_config(_WORKDIR.value)
    ckpts = checkpointing.Checkpoints(_WORKDIR.value, create=False)
    spec = datasets.resolve(config.data).spec
    model = factory.create_model(config, spec)
    # The optimizer's structure does not matter: its state is not copied.
    abstract = factory.abstract_state(
      model, factory.create_optimizer(config, 1), spec
    )
    if _STEP.value is None:
      step = ckpts.best_step()
      state = ckpts.restore_best(abstract)
    else:
      step = _STEP.value
      state = ckpts.restore(abstract, step)
  except (
    checkpointing.CheckpointError,
    config_schema.ConfigError,
    datasets.DataError,
  ) as e:
    sys.exit(f'error: {e}')
  problem = _out_problem(out)  # Makes the folder: only now that it is due.
  if problem:
    sys.exit(f'error: --out={out}: {problem}')
  target = os.path.join(out, checkpointing.PARAMS_DIR, str(step))
  if os.path.exists(target):
    sys.exit(
      f'error: {target} already holds an export of step {step}; give '
      'another --out, or delete it first.'
    )
  checkpointing.save_params(out, step, state)
  # The run's config, with the data found as a user's machine finds it:
  # $DSELECT_DATA_DIR, else the cache, downloading when missing.
  config.data.data_dir = ''
  config.data.paddlerec_dir = ''
  config.data.download = True
  files.write_atomically(
    os.path.join(out, 'config.json'),
    config.to_json_best_effort(indent=2) + '\n',
  )
  print(f'wrote {target} and {out}/config.json')


def _out_problem(out: str):
  """Why ``out`` cannot take the export, or None: a file in its place or
  above it, or a folder that cannot be written (a full or read-only file
  system)."""
  if os.path.exists(out) and not os.path.isdir(out):
    return 'a file is there; give a folder (new or existing).'
  why = checkpointing.unwritable(out)
  if why:
    return (
      f'cannot write there ({why}); give a folder on a writable file system.'
    )
  return None


if __name__ == '__main__':
  cli.run(main)
