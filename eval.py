"""Evaluates a train.py workdir's checkpoint on the test split.

  python eval.py --workdir=ckpts            # best-on-validation checkpoint
  python eval.py --workdir=ckpts --step=3900
  python eval.py --workdir=ckpts --best
  python eval.py --workdir=ckpts --data_dir=/data  # trained where data lived elsewhere

Reads the workdir's config.json; needs no other flag (but --data_dir when the
data are not where training read them) and runs on a CPU for a checkpoint
made on any device. Prints the results, writes them to
workdir/eval/test_<checkpoint>_<step>.json (or to --out_dir=DIR), and PNGs
beside them: each task's expert weights and, when the workdir has metrics,
training curves. The output folder is checked before anything is evaluated.
"""

import json
import os
import sys

from absl import app
from absl import flags

from dselect_jax import checkpointing
from dselect_jax import cli
from dselect_jax import config_schema
from dselect_jax import evaluate
from dselect_jax import files
from dselect_jax import metric_writers
from dselect_jax import plots
from dselect_jax.datasets import sources

_WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of train.py.')
_STEP = flags.DEFINE_integer('step', None, 'Evaluate this periodic checkpoint.')
_BEST = flags.DEFINE_bool(
  'best',
  False,
  'Evaluate the best-on-validation checkpoint (the '
  'default when --step is not given and one exists).',
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir',
  None,
  'Read the data from this folder instead of the one in '
  "the workdir's config.json (data.data_dir, or data.paddlerec_dir for "
  "PaddleRec's pickles): for a workdir trained on another machine.",
)
_OUT_DIR = flags.DEFINE_string(
  'out_dir',
  None,
  'Where the results and figures go (default: WORKDIR/eval); for a '
  'workdir that cannot be written.',
)
flags.mark_flag_as_required('workdir')


def main(argv):
  cli.setup_host_memory()  # First: before JAX starts its threads.
  cli.quiet_orbax()
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; use --flag=value.')
  if _STEP.value is not None and _BEST.value:
    sys.exit('error: give --step=N or --best, not both.')
  workdir = _WORKDIR.value
  out_dir = _OUT_DIR.value or os.path.join(workdir, 'eval')
  # Checked before evaluating; a missing workdir is evaluate's to report.
  why = (
    checkpointing.unwritable(out_dir)
    if _OUT_DIR.value or os.path.isdir(workdir)
    else None
  )
  if why:
    sys.exit(
      f'error: cannot write the output folder {out_dir}: {why}; give '
      '--out_dir=DIR on a writable file system.'
    )
  try:
    result = evaluate.evaluate_workdir(
      workdir, _STEP.value, _BEST.value, _DATA_DIR.value
    )
  except sources.DataError as e:
    sys.exit(
      f'error: {e} (eval.py reads the data folder named in '
      f'{workdir}/config.json; --data_dir=DIR reads DIR instead.)'
    )
  except (checkpointing.CheckpointError, config_schema.ConfigError) as e:
    sys.exit(f'error: {e}')
  print('\n'.join(evaluate.report(result)))
  stem = os.path.join(out_dir, f'test_{result["checkpoint"]}_{result["step"]}')
  try:
    os.makedirs(out_dir, exist_ok=True)
    files.write_atomically(stem + '.json', json.dumps(result, indent=2))
    figures = [
      plots.expert_weights(
        result['expert_weights'], stem + '_expert_weights.png'
      )
    ]
    if metric_writers.read_metrics(workdir):
      figures.append(
        plots.training_curves(
          os.path.join(workdir, metric_writers.METRICS_FILE),
          os.path.join(out_dir, 'training_curves.png'),
        )
      )
  except OSError as e:
    sys.exit(
      f'error: could not save the results above to {out_dir}: '
      f'{e.strerror or e}.'
    )
  print(f'wrote {stem}.json and {", ".join(figures)}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
