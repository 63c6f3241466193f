"""Regenerates the results tables of README.md and docs/results.md from results/.

  python scripts/make_docs.py

Reads only committed files (test_metrics.json, metrics.jsonl[.gz]); a run
that has not finished shows as "not run yet". Every number in the tables
comes from one of those files.
"""

import glob
import json
import os
import re
import subprocess

import numpy as np

from dselect_jax import metric_writers
from dselect_jax import provenance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'results')
PADDLEREC = (0.930460, 0.916088)
START, END = '<!-- results:start -->', '<!-- results:end -->'
ML_START, ML_END = '<!-- movielens:start -->', '<!-- movielens:end -->'
COMPARISON = 'paddlerec_comparison'
ABLATION_EPOCH = 15


def _json(path):
  with open(path) as f:
    return json.load(f)


def _test(run):
  path = os.path.join(RESULTS, run, 'test_metrics.json')
  return _json(path) if os.path.exists(path) else None


def _runs(pattern: str) -> list[str]:
  """The finished runs (with test_metrics.json) matching ``pattern`` under
  results/, as paths relative to it."""
  return [
    os.path.relpath(r, RESULTS)
    for r in sorted(glob.glob(os.path.join(RESULTS, pattern)))
    if os.path.exists(os.path.join(r, 'test_metrics.json'))
  ]


def _seeds(pattern):
  return [_test(r) for r in _runs(pattern)]


def _wall_minutes(run_dir):
  """Minutes between the first and the last line of a run's train.log
  (absl's 'IMMDD HH:MM:SS' prefix; one day), or None."""
  path = os.path.join(run_dir, 'train.log')
  if not os.path.exists(path):
    return None
  stamps = []
  with open(path) as f:
    for line in f:
      match = re.match(r'[IWE]\d{4} (\d\d):(\d\d):(\d\d)', line)
      if match:
        h, m, sec = map(int, match.groups())
        stamps.append(3600 * h + 60 * m + sec)
  if len(stamps) < 2:
    return None
  return ((stamps[-1] - stamps[0]) % 86400) / 60


def _mean_std(values):
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f'{values[0]:.4f}'
  return f'{values.mean():.4f} ± {values.std(ddof=1):.4f}'


def _row(*cells):
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def _vs(values, reference):
  """Points (percent) of the mean above ``reference``, to 2 decimals; a
  difference that rounds to 0 is +0.00, never -0.00."""
  points = round(100 * (float(np.mean(values)) - reference), 2)
  return f'{points + 0.0:+.2f}'


def _code(run: str) -> str:
  """The commit(s) a run's code was at: from its run_info.json, or, for a
  run from before run_info.json, 'unrecorded' and the last commit that
  changed its test_metrics.json (else its folder): the code was at that
  commit or an earlier one."""
  folder = os.path.join(RESULTS, run)
  try:
    starts = provenance.read(folder)
  except ValueError:
    starts = []
  if starts:
    return ', '.join(f'`{c}`' for c in provenance.commits(starts))
  # A run's test metrics change only when it is run again; other files of
  # its folder may be touched up later.
  metrics = os.path.join(folder, 'test_metrics.json')
  path = metrics if os.path.exists(metrics) else folder
  try:
    last = subprocess.run(
      ['git', '-C', REPO, 'log', '-1', '--format=%h', '--', path],
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    last = ''
  return f'unrecorded (committed in `{last}`)' if last else 'unrecorded'


def provenance_table() -> list[str]:
  """Every folder of results/ that holds files, with the code it ran on."""
  rows = []
  for folder, _, files in sorted(os.walk(RESULTS)):
    if not files or folder == RESULTS:
      continue
    run = os.path.relpath(folder, RESULTS)
    rows.append(_row(f'`results/{run}`', _code(run)))
  return [
    'The commit of the code behind each folder of `results/`: from its '
    '`run_info.json` (written by train.py since it records one), else '
    '"unrecorded" with the last commit that changed its `test_metrics.json` '
    '(else any of its files): its code was at that commit or an earlier '
    'one.',
    '',
    _row('folder', 'code'),
    _row('---', '---'),
  ] + rows


def _codes(runs: list[str]) -> str:
  return '; '.join(dict.fromkeys(_code(r) for r in runs))


def _statistic(runs: list[str], key: str) -> list[list[float]]:
  """Per task, each run's test accuracy under ``key`` of test_statistics
  ('pooled_over_epochs', 'best_validation')."""
  stats = [_test(r)['test_statistics'][key] for r in runs]
  return [[s[f'accuracy_{t}'] for s in stats] for t in (1, 2)]


def _label(runs, what):
  n = len(runs)
  return f'{what}, {n} seed{"s" if n > 1 else ""}' + (
    ', mean ± std' if n > 1 else ''
  )


def _statistic_rows(entries, key: str, reference=None) -> list[str]:
  """A table row per ``(pattern, what)`` entry, for the runs matching
  ``pattern`` under results/paddlerec_comparison/: their test accuracy
  under ``key`` of test_statistics (mean ± std over seeds), its points
  against ``reference`` (per task; None: the first entry that has runs,
  whose own cell stays empty), their commits and files."""
  rows = []
  for pattern, what in entries:
    runs = _runs(f'{COMPARISON}/{pattern}')
    files = f'`results/{COMPARISON}/{pattern}`'
    if not runs:
      rows.append(_row(what, 'not run yet', '', '', '', ''))
      continue
    acc = _statistic(runs, key)
    if reference is None:
      reference, points = [float(np.mean(a)) for a in acc], ''
    else:
      points = f'{_vs(acc[0], reference[0])} / {_vs(acc[1], reference[1])}'
    rows.append(
      _row(
        _label(runs, what),
        _mean_std(acc[0]),
        _mean_std(acc[1]),
        points,
        _codes(runs),
        files,
      )
    )
  return rows


def headline() -> list[str]:
  """The comparison on PaddleRec's data (results/paddlerec_comparison/):
  one table per statistic, so that a figure is only set beside one of the
  same statistic."""
  faithful = (
    'paddlerec',
    'ours, `configs/paddlerec.py` (faithful, 100 epochs)',
  )
  recipe_100 = (
    'multimnist_100epochs_seed*',
    'ours, `configs/multimnist.py` stretched to 100 epochs (recipe)',
  )
  lines = [
    "Test accuracy on the Pareto MTL MultiMNIST (PaddleRec's data: "
    '100,000 train / 20,000 validation / 20,000 test; `paretomtl` recipe), '
    'one table per statistic. "Code" is the commit each run trained on '
    '(its `run_info.json`; older runs recorded none).',
    '',
    "**Pooled over the 100 per-epoch test passes** (PaddleRec's statistic: "
    'correct answers over the test passes after each of 100 epochs; it '
    'averages in the weak early epochs, so it is lower than any one '
    "model's accuracy). Points: accuracy minus PaddleRec's.",
    '',
    _row('run', 'task 1', 'task 2', 'points vs PaddleRec', 'code', 'files'),
    _row(*['---'] * 6),
    _row(
      'PaddleRec, reported (8 experts, shared gate, 100 epochs)',
      f'{PADDLEREC[0]:.6f}',
      f'{PADDLEREC[1]:.6f}',
      '',
      '',
      "PaddleRec's readme",
    ),
  ]
  lines += _statistic_rows(
    [faithful, recipe_100], 'pooled_over_epochs', PADDLEREC
  )
  lines += [
    '',
    '**Best-validation checkpoint** (the checkpoint chosen on the '
    'validation split, tested once: the fair estimate of one model; '
    'PaddleRec reports none). Points: accuracy minus the faithful '
    "config's.",
    '',
    _row('run', 'task 1', 'task 2', 'points vs faithful', 'code', 'files'),
    _row(*['---'] * 6),
  ]
  walls = [
    _wall_minutes(os.path.join(RESULTS, r))
    for r in _runs(f'{COMPARISON}/multimnist_seed*')
  ]
  walls = [w for w in walls if w is not None]
  wall = (
    f'; {min(walls):.0f}-{max(walls):.0f} min each on a 2-core CPU shared '
    'with other work'
    if walls
    else ''
  )
  recipe_20 = (
    'multimnist_seed*',
    f'ours, `configs/multimnist.py` (recipe, 20 epochs{wall})',
  )
  lines += _statistic_rows([faithful, recipe_20, recipe_100], 'best_validation')
  return lines


def _faithful_details() -> list[str]:
  """Once the 100-epoch faithful run is in: its four test statistics, and
  the run folder's NOTE.md (how it was run) if it has one."""
  faithful = _test(f'{COMPARISON}/paddlerec')
  if faithful is None:
    return []
  stats = faithful['test_statistics']
  lines = [
    '',
    f"The faithful run's four test figures ({stats['num_passes']} test "
    f'passes, one after each epoch; `results/{COMPARISON}/paddlerec/'
    "test_metrics.json`). Points against PaddleRec's figure only on the "
    'row of its statistic:',
    '',
    _row('statistic', 'task 1', 'task 2', 'points vs PaddleRec'),
    _row(*['---'] * 4),
  ]
  for name, key in (
    ("pooled over all epochs (PaddleRec's statistic)", 'pooled_over_epochs'),
    ('best-validation checkpoint (fair)', 'best_validation'),
    ('after the last epoch', 'last_epoch'),
    ('maximum over epochs (chosen on test: not fair)', 'max_over_epochs'),
  ):
    acc = [stats[key]['accuracy_1'], stats[key]['accuracy_2']]
    lines.append(
      _row(
        name,
        f'{acc[0]:.4f}',
        f'{acc[1]:.4f}',
        f'{_vs([acc[0]], PADDLEREC[0])} / {_vs([acc[1]], PADDLEREC[1])}'
        if key == 'pooled_over_epochs'
        else '',
      )
    )
  note = os.path.join(RESULTS, COMPARISON, 'paddlerec', 'NOTE.md')
  if os.path.exists(note):
    with open(note) as f:
      lines += ['', f.read().strip()]
  return lines


def _epoch_pass(run, epoch):
  """The test pass after ``epoch`` and the pool of passes 1..epoch."""
  records = metric_writers.read_metrics(os.path.join(RESULTS, run))
  passes = {}
  for r in records:
    if r['split'] == 'test_epoch':
      passes[r['step']] = r
  passes = [passes[s] for s in sorted(passes)][:epoch]
  if len(passes) < epoch:
    return None
  return (
    [passes[-1][f'accuracy_{t}'] for t in (1, 2)],
    [float(np.mean([p[f'accuracy_{t}'] for p in passes])) for t in (1, 2)],
  )


def ablations() -> list[str]:
  runs = [
    ('`configs/paddlerec.py` (faithful), the 100-epoch run', 'paddlerec'),
    (
      '`configs/paddlerec.py` (faithful), 15 epochs alone',
      'paddlerec_15epochs',
    ),
    ('older data recipe (`paretomtl_axes`)', 'ablation_paretomtl_axes'),
    (
      'plain cross-entropy instead of the double softmax',
      'ablation_cross_entropy',
    ),
    ("Flax's initializers instead of PaddleRec's", 'ablation_flax_init'),
  ]
  lines = [
    f'One factor of `configs/paddlerec.py` changed at a time (seed 0), test '
    f'accuracy after epoch {ABLATION_EPOCH} and pooled over epochs '
    f'1..{ABLATION_EPOCH}; the first two rows are the faithful config '
    'itself, its 100-epoch run and a run of its first '
    f'{ABLATION_EPOCH} epochs alone (the same steps, summed in another '
    'order by other code of this repository: when task 1 leaves its '
    '0.82-0.84 plateau moves with such float differences, from epoch 15 in '
    'one run to epoch 21 in the other).',
    '',
    _row(
      'run',
      f'task 1, epoch {ABLATION_EPOCH}',
      f'task 2, epoch {ABLATION_EPOCH}',
      'task 1, pooled',
      'task 2, pooled',
    ),
    _row(*['---'] * 5),
  ]
  for name, run in runs:
    got = _epoch_pass(f'{COMPARISON}/{run}', ABLATION_EPOCH)
    if got is None:
      lines.append(_row(name, 'not run yet', '', '', ''))
    else:
      (a1, a2), (p1, p2) = got
      lines.append(
        _row(name, f'{a1:.4f}', f'{a2:.4f}', f'{p1:.4f}', f'{p2:.4f}')
      )
  per_class = os.path.join(RESULTS, COMPARISON, 'per_class', 'output.txt')
  if os.path.exists(per_class):
    lines += [
      '',
      'Accuracy per class and how often each class is predicted, for some of '
      'these checkpoints (`scripts/per_class.py`): '
      f'`results/{COMPARISON}/per_class/output.txt`.',
    ]
  return lines


def paddle_reference() -> list[str]:
  """PaddleRec's recipe run in Paddle itself (experiments/paddle_reference.py)."""
  folder = os.path.join(RESULTS, 'paddle_reference')
  check = os.path.join(folder, 'check.txt')
  epochs = os.path.join(folder, 'train_paddle_init.jsonl')
  if not (os.path.exists(check) and os.path.exists(epochs)):
    return []
  with open(check) as f:
    summary = f.read().strip().splitlines()[-1]
  with open(epochs) as f:
    records = [json.loads(line) for line in f if line.strip()]
  lines = [
    '',
    "### PaddleRec's recipe in Paddle itself",
    '',
    "`experiments/paddle_reference.py` rebuilds PaddleRec's network in "
    'PaddlePaddle. With our initial parameters copied in, on one training '
    f'batch of the same data: {summary[0].lower() + summary[1:]} (BatchNorm '
    'on batch statistics; `results/paddle_reference/check.txt`): '
    '`configs/paddlerec.py` computes the function PaddleRec trains. Trained '
    "in Paddle from Paddle's own initializers on the same data and order, "
    'test accuracy after each epoch '
    '(`results/paddle_reference/train_paddle_init.jsonl`), beside '
    "`configs/paddlerec.py`'s own (seed 0, "
    '`results/paddlerec_comparison/paddlerec_15epochs`):',
    '',
    _row(
      'epoch',
      'Paddle, task 1',
      'Paddle, task 2',
      'classes Paddle never predicts (task 1; task 2)',
      'ours, task 1',
      'ours, task 2',
    ),
    _row(*['---'] * 6),
  ]
  ours = {}
  for r in metric_writers.read_metrics(
    os.path.join(RESULTS, COMPARISON, 'paddlerec_15epochs')
  ):
    if r['split'] == 'test_epoch':
      ours[r['step']] = (r['accuracy_1'], r['accuracy_2'])
  ours = [ours[step] for step in sorted(ours)]
  for r in records:
    never = '; '.join(
      ', '.join(map(str, c)) or 'none' for c in r['classes_never_predicted']
    )
    a1, a2 = r['test_accuracy']
    o1, o2 = (
      (f'{x:.4f}' for x in ours[r['epoch'] - 1])
      if r['epoch'] <= len(ours)
      else ('', '')
    )
    lines.append(_row(r['epoch'], f'{a1:.4f}', f'{a2:.4f}', never, o1, o2))
  return lines


def comet() -> list[str]:
  """The easier `comet` variant: 100-epoch and 5-epoch runs."""
  lines = [
    'On the `comet` MultiMNIST (fixed, far-apart digits; an easier task '
    "than PaddleRec's data, so not comparable with its figures): test "
    'accuracy of the best-validation checkpoint, mean ± std over seeds.',
    '',
    _row('config', 'seeds', 'task 1', 'task 2', 'files'),
    _row(*['---'] * 5),
  ]
  for config, folder in (
    ('`configs/multimnist_comet.py` (100 epochs)', 'multimnist_comet'),
    ('`configs/multimnist_fast.py` (5 epochs)', 'multimnist_fast'),
  ):
    seeds = _seeds(f'{folder}/seed*')
    lines.append(
      _row(
        config,
        len(seeds),
        _mean_std([r['accuracy_1'] for r in seeds]),
        _mean_std([r['accuracy_2'] for r in seeds]),
        f'`results/{folder}`',
      )
    )
  return lines


def movielens() -> list[str]:
  """The gate comparison on MovieLens-100K (results/movielens/table.json)."""
  path = os.path.join(RESULTS, 'movielens', 'table.json')
  if not os.path.exists(path):
    return ['MovieLens-100K: not run yet (`results/movielens/run.sh`).']
  cells = _json(path)['cells']
  gates = ['softmax', 'top_k', 'dselect_k', 'dselect_k_per_example']
  lines = [
    'Test metrics on MovieLens-100K (`configs/movielens.py`: watch, '
    'binary, AUC; rating, regression, RMSE over the rated pairs; '
    '160,000 / 20,000 / 20,000 examples, one unrated movie per rating), '
    'checkpoint chosen on the validation loss, mean ± std over seeds '
    "(`results/movielens/run.sh`). Experts per task: each seed's count "
    'of experts with non-zero weight, task 1/task 2 (per-example gates: '
    'the mean over test examples, to one decimal).',
    '',
    _row('gate', 'seeds', 'watch AUC', 'rating RMSE', 'experts per task'),
    _row(*['---'] * 5),
  ]
  for gate in gates:
    group = [c for c in cells if c['gate'] == gate]
    if not group:
      continue
    used = sorted({tuple(c['num_nonzero']) for c in group})
    lines.append(
      _row(
        f'`{gate}`',
        len(group),
        _mean_std([c['auc_1'] for c in group]),
        _mean_std([c['rmse_2'] for c in group]),
        ', '.join('/'.join(f'{round(n, 1):g}' for n in u) for u in used),
      )
    )
  return lines


def dispatch_comparison(folder: str, heading: str, recipe: str, columns):
  """Dense against dispatched per-example gates, one row each
  (results/<folder>/table.json): ``columns`` (header, cell key) pairs of
  test metrics; empty when the run is not committed."""
  path = os.path.join(RESULTS, folder, 'table.json')
  if not os.path.exists(path):
    return []
  cells = _json(path)['cells']
  lines = [
    '',
    f'### {heading}',
    '',
    f'{recipe}, with `model.sparse_dispatch` off and on, the runs one '
    'after another on the same otherwise idle 2-core CPU '
    f'(`results/{folder}/run.sh`): test metrics of the checkpoint chosen '
    'on the validation set (mean ± std over seeds where there are '
    'several), and the wall time of each run (training, validation after '
    'every epoch, the test pass); code at '
    f'{_code(folder)}.',
    '',
    _row(
      'model.sparse_dispatch',
      'seeds',
      *(header for header, _ in columns),
      'minutes per run',
    ),
    _row(*['---'] * (len(columns) + 3)),
  ]
  for gate, dispatched in (
    ('dselect_k_per_example', 'off'),
    ('dselect_k_per_example_dispatch', 'on'),
  ):
    group = sorted(
      (c for c in cells if c['gate'] == gate), key=lambda c: c['seed']
    )
    if group:
      lines.append(
        _row(
          dispatched,
          len(group),
          *(_mean_std([c[key] for c in group]) for _, key in columns),
          ', '.join(f'{c["wall_seconds"] / 60:.1f}' for c in group),
        )
      )
  return lines


def results_page() -> str:
  parts = [
    '# Results',
    '',
    '<!-- Generated by scripts/make_docs.py from results/; do not edit. -->',
    '',
    "Every run's folder under `results/` holds its command "
    '(`command.txt`), resolved config, metrics and test metrics.',
    '',
    "## PaddleRec's data",
    '',
  ] + headline()
  parts += _faithful_details()
  parts += ['', '### What explains the gap: one-factor ablations', '']
  parts += ablations()
  parts += paddle_reference()
  axes = _test('paddlerec_axes_parity')
  if axes:
    parts += [
      '',
      '### An earlier parity run on the older data recipe',
      '',
      'The shared-gate setup with our loss and initializers, shuffled '
      'batches, on `paretomtl_axes` (each axis shifted apart, 625 '
      'placements; 110,000 / 10,000 / 20,000), 100 epochs: test '
      f'accuracy of the best-validation checkpoint (step '
      f'{axes["step"]}) {axes["accuracy_1"]:.4f} / '
      f'{axes["accuracy_2"]:.4f} (`results/paddlerec_axes_parity`).',
    ]
  parts += ['', '## The `comet` variant (easier)', ''] + comet()
  grid = os.path.join(RESULTS, 'grid', 'table.md')
  if os.path.exists(grid):
    with open(grid) as f:
      table = f.read().strip()
    parts += [
      '',
      '## Gates compared (5 epochs with the entropy term)',
      '',
      'Test accuracy, best-validation checkpoint, `comet` data sets, '
      'base recipe `configs/multimnist_entropy.py` '
      '(`results/grid/command.txt`):',
      '',
      table,
      '',
      '![accuracy per gate](../results/grid/accuracy.png)',
    ]
  parts += dispatch_comparison(
    'multimnist_experts16',
    'Per-example gates over 16 experts, dense and dispatched',
    '`configs/multimnist_experts16.py` (`configs/multimnist_entropy.py` '
    'with E = 16 experts and per-example DSelect-k gates, k = 2, on the '
    '`comet` MultiMNIST)',
    [('task 1 accuracy', 'accuracy_1'), ('task 2 accuracy', 'accuracy_2')],
  )
  parts += ['', '## Recommendation: MovieLens-100K', ''] + movielens()
  parts += dispatch_comparison(
    'movielens_experts64',
    'Per-example gates over 64 experts, dense and dispatched',
    '`configs/movielens_experts64.py` (the recipe above with E = 64 '
    'experts and per-example DSelect-k gates, k = 2)',
    [('watch AUC', 'auc_1'), ('rating RMSE', 'rmse_2')],
  )
  plots = sorted(
    glob.glob(
      os.path.join(RESULTS, 'movielens', 'expert_weights_*dselect_k*-seed0.png')
    )
  )
  if plots:
    parts += [
      '',
      "Each task's DSelect-k gate weights over training, static and "
      'per-example (the mean over the validation examples), seed 0; the '
      'other seeds beside them in `results/movielens/`:',
    ]
    for plot in plots:
      parts += [
        '',
        f'![gate weights](../results/movielens/{os.path.basename(plot)})',
      ]
  entropy = _test('entropy_sample')
  if entropy:
    parts += [
      '',
      '## The entropy schedule on the shipped sample',
      '',
      '`results/entropy_sample/command.txt`: test accuracy '
      f'{entropy["accuracy_1"]:.3f} / {entropy["accuracy_2"]:.3f}, '
      f'experts used per task {entropy["selected_experts"]}.',
    ]
  parts += ['', '## The code behind each result', ''] + provenance_table()
  return '\n'.join(parts) + '\n'


# The run whose gates README.md shows converging.
WEIGHTS_RUN = os.path.join(COMPARISON, 'multimnist_100epochs_seed0')


def gate_weights_plot() -> str:
  """WEIGHTS_RUN's gate weights over training, next to its metrics."""
  from dselect_jax import plots  # pylint: disable=g-import-not-at-top

  folder = os.path.join(RESULTS, WEIGHTS_RUN)
  return plots.expert_weights_over_training(
    os.path.join(folder, 'metrics.jsonl.gz'),
    os.path.join(folder, 'expert_weights.png'),
    title="configs/multimnist.py for 100 epochs, seed 0: each task's "
    'DSelect-k gate (k = 2) over 8 experts',
  )


def main():
  gate_weights_plot()
  block = '\n'.join([START] + headline() + ['', END])
  readme_path = os.path.join(REPO, 'README.md')
  with open(readme_path) as f:
    readme = f.read()
  ml_block = '\n'.join([ML_START] + movielens() + ['', ML_END])
  for start, end, text in ((START, END, block), (ML_START, ML_END, ml_block)):
    readme = re.sub(
      re.escape(start) + '.*?' + re.escape(end),
      lambda _, text=text: text,
      readme,
      flags=re.S,
    )
  with open(readme_path, 'w') as f:
    f.write(readme)
  os.makedirs(os.path.join(REPO, 'docs'), exist_ok=True)
  with open(os.path.join(REPO, 'docs', 'results.md'), 'w') as f:
    f.write(results_page())
  print(block)


if __name__ == '__main__':
  main()
