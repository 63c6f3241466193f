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

Ctrl-C (or SIGTERM) stops it at once with one line and exit status 130 (143
for SIGTERM); the outputs are written with both signals held back, so none
is ever left half written.
"""

import os
import signal
import sys


def _stop(signum, frame):
  """Installed before anything else is imported, so a signal that lands
  while JAX loads ends the same way as one during the evaluation."""
  del frame
  sys.stderr.write(
    f'stopped: {signal.Signals(signum).name}; eval.py wrote nothing.\n'
  )
  os._exit(128 + signum)  # No teardown: nothing is left to save.


signal.signal(signal.SIGINT, _stop)
signal.signal(signal.SIGTERM, _stop)

import json  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from dselect_jax import checkpointing  # noqa: E402
from dselect_jax import cli  # noqa: E402
from dselect_jax import config_schema  # noqa: E402
from dselect_jax import evaluate  # noqa: E402
from dselect_jax import files  # noqa: E402
from dselect_jax import metric_writers  # noqa: E402
from dselect_jax import plots  # noqa: E402
from dselect_jax.datasets import sources  # noqa: E402

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
    checkpointing.unwritable(out_dir, keep=False)  # Made when writing.
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
  # From here on a signal waits until the files are complete and the process
  # exits: whatever it wrote is whole.
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
  try:
    os.makedirs(out_dir, exist_ok=True)
    files.write_atomically(stem + '.json', json.dumps(result, indent=2))
    figures = [
      plots.expert_weights(
        result['expert_weights'], stem + '_expert_weights.png'
      )
    ]
    records = metric_writers.read_metrics(workdir)
    metrics_file = os.path.join(workdir, metric_writers.METRICS_FILE)
    if records:
      figures.append(
        plots.training_curves(
          metrics_file, os.path.join(out_dir, 'training_curves.png')
        )
      )
    if any('expert_weights' in r for r in records if r['split'] == 'train'):
      figures.append(  # Static gates: their weights at each log step.
        plots.expert_weights_over_training(
          metrics_file,
          os.path.join(out_dir, 'expert_weights_over_training.png'),
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
