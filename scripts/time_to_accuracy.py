"""When a run's validation-chosen checkpoint first reaches a target test
accuracy, and how long it took.

  python scripts/time_to_accuracy.py results/paddlerec_comparison/multimnist_seed* \
      [--out=results/time_to_accuracy]

For each run folder (a train.py workdir, or its copy in results/ with
``metrics.jsonl[.gz]`` and ``train.log``), after every epoch: the wall time
since the run's first log line (read from the log's timestamps, so the
validation and test passes and the checkpoints count), the test accuracy of
that epoch, and the test accuracy of the checkpoint that validation chose
so far (the best validation mean up to that epoch; the runs test every
epoch, so its test accuracy is on record). The first epoch at which that
checkpoint is above PaddleRec's 0.930460 / 0.916088 on both tasks is the
time to accuracy. With ``--out``, writes ``table.md`` and one plot (test
accuracy of the chosen checkpoint against wall time) there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

import numpy as np

from dselect_jax import metric_writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAITHFUL = os.path.join(
  REPO, 'results', 'paddlerec_comparison', 'paddlerec', 'test_metrics.json'
)
# absl's log prefix: I1203 14:18:31.295603 ... 'test at step 390 (epoch 1)'.
_LINE = re.compile(r'^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+) ')
_TEST = re.compile(r'test at step (\d+) \(epoch (\d+)\)')
_STEP = re.compile(r'\] step (\d+)/')


def _records(folder):
  """The run's metrics (metrics.jsonl or its .gz copy), as the trainer reads
  them: a record a resumed run wrote again counts once."""
  records = metric_writers.read_metrics(folder)
  if not records:
    sys.exit(f'{folder}: no metrics.jsonl or metrics.jsonl.gz')
  return records


def _timestamps(folder, pattern=_TEST):
  """{step: seconds since the first log line} of each line ``pattern``
  matches (default: each epoch's test pass), by the step it names."""
  path = os.path.join(folder, 'train.log')
  if not os.path.exists(path):
    sys.exit(f'{folder}: no train.log (the wall times come from it)')
  start, last, out = None, None, {}
  with open(path) as f:
    for line in f:
      m = _LINE.match(line)
      if not m:
        continue
      t = datetime.datetime.strptime(m.group(2), '%H:%M:%S.%f')
      if last is not None and t < last:  # Past midnight.
        t += datetime.timedelta(days=1)
      start, last = start or t, t
      found = pattern.search(line)
      if found:
        out[int(found.group(1))] = (t - start).total_seconds()
  return out


def _score(record) -> float:
  """The trainer's choice of the best checkpoint: the validation record's
  selection_score (the mean accuracy; records older than the score hold
  only accuracy_mean)."""
  return record.get('selection_score', record.get('accuracy_mean'))


def epochs(folder):
  """Per epoch: step, wall_s, test (2,), chosen_step, chosen_test (2,)."""
  records = _records(folder)
  seconds = _timestamps(folder)
  val = {r['step']: r for r in records if r['split'] == 'validation'}
  test = {r['step']: r for r in records if r['split'] == 'test_epoch'}
  rows, best = [], None
  for step in sorted(test):
    if step in val and (best is None or _score(val[step]) > _score(val[best])):
      best = step
    if best is None or step not in seconds:
      continue
    rows.append(
      {
        'step': step,
        'wall_s': seconds[step],
        'test': (test[step]['accuracy_1'], test[step]['accuracy_2']),
        'chosen_step': best,
        'chosen_test': (test[best]['accuracy_1'], test[best]['accuracy_2']),
      }
    )
  return rows


def epoch_costs(folder):
  """Per epoch after the first: (training s, evaluation s). Training runs
  from the previous epoch's test line to the log line of its last step;
  evaluation (validation, test pass, checkpoint) from there to its test
  line. Needs a log step at each epoch's end (log_every_steps divides it)."""
  steps = _timestamps(folder, _STEP)
  tests = _timestamps(folder)
  ends = sorted(tests)
  return [
    (steps[end] - tests[prev], tests[end] - steps[end])
    for prev, end in zip(ends, ends[1:])
    if end in steps
  ]


def faithful_target(path=FAITHFUL) -> tuple[float, float]:
  """The faithful run's best-validation test accuracy, per task."""
  try:
    with open(path) as f:
      best = json.load(f)['test_statistics']['best_validation']
    return best['accuracy_1'], best['accuracy_2']
  except (OSError, ValueError, KeyError) as e:
    sys.exit(
      f"error: {path}: cannot read the faithful run's best-validation "
      f'accuracy ({type(e).__name__}: {e}); give --target=A1,A2.'
    )


def first_above(rows, target):
  for i, row in enumerate(rows):
    if all(a > t for a, t in zip(row['chosen_test'], target)):
      return i, row
  return None, None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('folders', nargs='+')
  parser.add_argument('--out', help='Write table.md and time_to_accuracy.png.')
  parser.add_argument(
    '--target',
    help="Task 1 and task 2 test accuracy to reach, 'A1,A2' (default: the "
    "faithful config's best-validation figures).",
  )
  parser.add_argument(
    '--epoch_costs',
    action='store_true',
    help="Instead: each run's median training and evaluation time an epoch.",
  )
  args = parser.parse_args()
  if args.epoch_costs:
    for folder in args.folders:
      costs = np.array(epoch_costs(folder))
      if not len(costs):
        sys.exit(f'{folder}: no two epochs with test passes and step logs')
      train, evaluation = np.median(costs, axis=0)
      print(
        f'{os.path.basename(os.path.normpath(folder))}: {len(costs)} epochs; '
        f'median training {train:.1f} s, evaluation {evaluation:.1f} s '
        f'({100 * evaluation / train:.0f}% of training)'
      )
    return
  if args.target:
    try:
      target = tuple(float(x) for x in args.target.split(','))
      if len(target) != 2:
        raise ValueError
    except ValueError:
      sys.exit(
        f'error: --target={args.target}: give two accuracies, A1,A2 '
        '(e.g. 0.94,0.93).'
      )
    source = 'given with --target'
  else:
    target = faithful_target()
    source = (
      "the faithful config's best-validation checkpoint "
      '(`configs/paddlerec.py`, 100 epochs, '
      '`results/paddlerec_comparison/paddlerec`): the same statistic'
    )
  lines = [
    'Test accuracy of the checkpoint chosen on validation so far, after each '
    f'epoch, against {target[0]:.4f} / {target[1]:.4f}, {source} '
    "(Pareto MTL MultiMNIST test split). Wall time: from the run's first "
    'log line, validation, test passes and checkpoints included.',
    '',
    '| run | first epoch above both | wall time | chosen step | test accuracy '
    '| last epoch: wall time, chosen test accuracy |',
    '| --- | --- | --- | --- | --- | --- |',
  ]
  curves = {}
  for folder in args.folders:
    name = os.path.basename(os.path.normpath(folder))
    rows = epochs(folder)
    if not rows:
      sys.exit(f'{folder}: no epoch with both a test pass and a validation')
    curves[name] = rows
    i, row = first_above(rows, target)
    last = rows[-1]
    tail = (
      f'{last["wall_s"] / 60:.1f} min, {last["chosen_test"][0]:.4f} / '
      f'{last["chosen_test"][1]:.4f}'
    )
    if row is None:
      lines.append(f'| {name} | never | | | | {tail} |')
    else:
      lines.append(
        f'| {name} | {i + 1} | {row["wall_s"] / 60:.1f} min | '
        f'{row["chosen_step"]} | {row["chosen_test"][0]:.4f} / '
        f'{row["chosen_test"][1]:.4f} | {tail} |'
      )
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'table.md'), 'w') as f:
      f.write(
        f'$ python scripts/time_to_accuracy.py {" ".join(sys.argv[1:])}\n\n'
      )
      f.write(text)
    _plot(curves, target, os.path.join(args.out, 'time_to_accuracy.png'))


def _plot(curves, target, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
  for name, rows in curves.items():
    minutes = [r['wall_s'] / 60 for r in rows]
    for t, ax in enumerate(axes):
      ax.plot(
        minutes, [r['chosen_test'][t] for r in rows], marker='.', label=name
      )
  for t, ax in enumerate(axes):
    ax.axhline(target[t], color='k', ls='--', lw=1, label='target')
    ax.set_title(f'task {t + 1}: test accuracy, validation-chosen checkpoint')
    ax.set_xlabel('wall time (min, 2-core CPU)')
    ax.set_ylim(0.85, 0.96)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


if __name__ == '__main__':
  main()
