"""Runs a grid of gates x data sets x seeds and tabulates it, like the paper.

  python -m experiments.grid --out=results/grid \
      --gates=softmax,top_k,dselect_k,dselect_k_per_example \
      --datasets=multi_mnist,multi_fashion,multi_fashion_mnist --seeds=0,1,2

Each cell trains the --config recipe (default configs/multimnist_entropy.py)
with the gate and data set swapped in, in its own workdir under
OUT/workdirs/, and records OUT/cells/<cell>.json: test accuracies, experts
used per task, the step at which DSelect-k's selectors saturated, wall time.
Finished cells are skipped and half-trained ones resume from their
checkpoints, so the command can be re-run after a stop. --shard=i/n runs
every n-th cell starting at i, so n machines (or GPUs) can split a grid and
write to a shared OUT. --table_only rebuilds the tables and plots from the
cells present: OUT/table.md, OUT/table.json, OUT/accuracy.png (or
OUT/test_metrics.png where a task's metric is not accuracy) and, per
DSelect-k cell, OUT/expert_weights_<cell>.png (the gates' expert weights over
training, at every log step; per-example gates: their mean over the
validation examples, at every validation).
"""

import copy
import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags
import numpy as np

from dselect_jax import cli
from dselect_jax import datasets
from dselect_jax import evaluate
from dselect_jax import factory
from dselect_jax import metric_writers
from dselect_jax import tasks
from dselect_jax import trainer

_OUT = flags.DEFINE_string('out', 'results/grid', 'Output folder.')
_CONFIG = config_flags.DEFINE_config_file(
  'config',
  'configs/multimnist_entropy.py',
  'Base recipe (a config file); --config.FIELD=VALUE overrides apply to '
  'every cell, as for train.py.',
  lock_config=True,
)
_GATES = flags.DEFINE_list(
  'gates',
  ['softmax', 'top_k', 'dselect_k', 'dselect_k_per_example'],
  'Gate variants (keys of GATE_VARIANTS).',
)
_DATASETS = flags.DEFINE_list('datasets', ['multi_mnist'], 'Data sets.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
_SHARD = flags.DEFINE_string('shard', '0/1', 'i/n: run cells i, i+n, ...')
_TABLE_ONLY = flags.DEFINE_bool(
  'table_only', False, 'Only rebuild tables and plots.'
)

# Gate variant -> config overrides. Sparse training only applies to static
# DSelect-k gates; the others train densely whatever the base recipe says.
GATE_VARIANTS = {
  'softmax': {'model.gate.name': 'softmax', 'model.sparse_train': False},
  'top_k': {
    'model.gate.name': 'top_k',
    'loss.importance_weight': 0.01,
    'loss.load_weight': 0.01,
    'model.sparse_train': False,
  },
  'dselect_k': {'model.gate.name': 'dselect_k'},
  'dselect_k_per_example': {
    'model.gate.name': 'dselect_k',
    'model.gate.per_example': True,
    'model.sparse_train': False,
    'model.sparse_dispatch': False,
  },
  # The same, each batch dispatched to the experts its examples use.
  'dselect_k_per_example_dispatch': {
    'model.gate.name': 'dselect_k',
    'model.gate.per_example': True,
    'model.sparse_train': False,
    'model.sparse_dispatch': True,
  },
}


def set_field(config, dotted, value):
  """A cell's own field (its gate, data set or seed), type-checked by the
  locked ConfigDict."""
  *path, last = dotted.split('.')
  section = config
  for name in path:
    section = section[name]
  section[last] = value


def saturation_step(records, k):
  """First logged train step at which every task used at most k experts."""
  for r in records:
    if r['split'] != 'train':
      continue
    used = [r[key] for key in r if key.startswith('num_nonzero_')]
    if used and max(used) <= k:
      return r['step']
  return None


def train_speeds(records, step):
  """Median train images/s of the log windows before and after ``step``
  (None for an empty side). Medians, because a window that holds a
  validation pass or a checkpoint write is slow."""
  rates = [
    (r['step'], r['images_per_second'])
    for r in records
    if r['split'] == 'train' and 'images_per_second' in r
  ]
  before = [v for s, v in rates if step is None or s <= step]
  after = [v for s, v in rates if step is not None and s > step]
  median = lambda v: float(np.median(v)) if v else None
  return median(before), median(after)


def run_cell(gate, dataset, seed, out):
  name = _cell_name({'dataset': dataset, 'gate': gate, 'seed': seed})
  cell_file = os.path.join(out, 'cells', f'{name}.json')
  if os.path.exists(cell_file):
    print(f'{name}: done already')
    return
  config = copy.deepcopy(_CONFIG.value)
  for key, value in GATE_VARIANTS[gate].items():
    set_field(config, key, value)
  set_field(config, 'data.name', dataset)
  set_field(config, 'seed', int(seed))
  workdir = os.path.join(out, 'workdirs', name)
  start = time.time()
  result = trainer.train_and_evaluate(config, workdir)
  records = metric_writers.read_metrics(workdir)
  cell = {
    'gate': gate,
    'dataset': dataset,
    'seed': int(seed),
    # Each task's test metric: accuracy_1, ... or auc_1, rmse_2.
    **{
      f'{name}_{t}': value
      for t, (name, value) in enumerate(metric_writers.task_metrics(result), 1)
    },
    'num_nonzero': result['num_nonzero'],
    'selected_experts': result['selected_experts'],
    'best_step': result['step'],
    'saturation_step': (
      saturation_step(records, config.model.gate.k)
      if config.model.gate.name == 'dselect_k'
      else None
    ),
    'wall_seconds': time.time() - start,
    # What 'auto' meant on this machine ('mlp': a feature data set's experts).
    'conv': (
      factory.conv_impl(config)
      if datasets.resolve(config.data).spec.is_image
      else 'mlp'
    ),
    'config': json.loads(config.to_json_best_effort()),
  }
  os.makedirs(os.path.dirname(cell_file), exist_ok=True)
  with open(cell_file, 'w') as f:
    json.dump(cell, f, indent=2)
  print(f'{name}: {evaluate.headline(cell)}')


def _cell_name(cell):
  return f'{cell["dataset"]}-{cell["gate"]}-seed{cell["seed"]}'


def _speed(values):
  return ', '.join('-' if v is None else f'{v:.0f}' for v in values)


def tabulate(out):
  cells_dir = os.path.join(out, 'cells')
  cells = []
  if os.path.isdir(cells_dir):
    for name in sorted(os.listdir(cells_dir)):
      with open(os.path.join(cells_dir, name)) as f:
        cells.append(json.load(f))
  groups = {}
  for c in cells:
    groups.setdefault((c['dataset'], c['gate']), []).append(c)
  rows = []
  for (dataset, gate), group in sorted(groups.items()):
    row = {'dataset': dataset, 'gate': gate, 'seeds': len(group)}
    # Each task's metric (accuracy, auc, rmse) and its key in the cells.
    row['metric_names'] = [
      name for name, _ in metric_writers.task_metrics(group[0])
    ]
    row['metrics'] = [
      f'{name}_{t}' for t, name in enumerate(row['metric_names'], 1)
    ]
    for key in row['metrics']:
      values = np.array([c[key] for c in group])
      row[f'{key}_mean'] = float(values.mean())
      row[f'{key}_std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    row['experts_used'] = [c['num_nonzero'] for c in group]
    sat = [c['saturation_step'] for c in group]
    row['saturation_steps'] = sat
    speeds = [
      train_speeds(
        metric_writers.read_metrics(
          os.path.join(out, 'workdirs', _cell_name(c))
        ),
        c['saturation_step'],
      )
      for c in group
    ]
    row['train_images_per_s_before_saturation'] = [b for b, _ in speeds]
    row['train_images_per_s_after_saturation'] = [a for _, a in speeds]
    row['wall_minutes_mean'] = float(
      np.mean([c['wall_seconds'] for c in group]) / 60
    )
    row['wall_minutes'] = [c['wall_seconds'] / 60 for c in group]
    # Cells from before the Toeplitz convolution existed used XLA's.
    row['convs'] = [c.get('conv', 'xla') for c in group]
    rows.append(row)
  with open(os.path.join(out, 'table.json'), 'w') as f:
    json.dump({'rows': rows, 'cells': cells}, f, indent=2)
  lines = [
    '| data set | gate | seeds | task 1 test metric | task 2 test metric | '
    'experts used per task | saturation step | minutes per run '
    '(expert convolution) | '
    'train examples/s before / after saturation |',
    '|' + ' --- |' * 9,
  ]
  for r in rows:
    metrics = ' | '.join(
      f'{name} {r[f"{key}_mean"]:.4f} ± {r[f"{key}_std"]:.4f}'
      for name, key in zip(r['metric_names'], r['metrics'])
    )
    lines.append(
      f'| {r["dataset"]} | {r["gate"]} | {r["seeds"]} | {metrics} | '
      f'{r["experts_used"]} | {r["saturation_steps"]} | '
      + ', '.join(
        f'{m:.1f} ({conv})' for m, conv in zip(r['wall_minutes'], r['convs'])
      )
      + ' | '
      f'{_speed(r["train_images_per_s_before_saturation"])} / '
      f'{_speed(r["train_images_per_s_after_saturation"])} |'
    )
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  _plots(out, rows, cells)
  return rows


def _plots(out, rows, cells):
  from dselect_jax import plots  # pylint: disable=g-import-not-at-top

  if not rows:
    return
  plt = plots.plt
  # One panel per data set and metric, a bar per gate and task.
  panels = []
  for dataset in sorted({r['dataset'] for r in rows}):
    sub = [r for r in rows if r['dataset'] == dataset]
    names = sub[0]['metric_names']
    for metric in dict.fromkeys(names):
      tasks_of = [t for t, name in enumerate(names) if name == metric]
      panels.append((dataset, metric, sub, tasks_of))
  fig, axes = plt.subplots(
    1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False
  )
  for ax, (dataset, metric, sub, tasks_of) in zip(axes[0], panels):
    x = np.arange(len(sub))
    keys = [sub[0]['metrics'][t] for t in tasks_of]
    width = 0.8 / len(keys)
    for i, (t, key) in enumerate(zip(tasks_of, keys)):
      ax.bar(
        x + (i - (len(keys) - 1) / 2) * width,
        [r[f'{key}_mean'] for r in sub],
        width,
        yerr=[r[f'{key}_std'] for r in sub],
        label=f'task {t + 1}',
        capsize=3,
      )
    ax.set_xticks(x)
    ax.set_xticklabels([r['gate'] for r in sub], rotation=20)
    values = [r[f'{key}_mean'] for r in sub for key in keys]
    if tasks.HIGHER_IS_BETTER[metric]:
      ax.set_ylim(max(0, min(values) - 0.05), 1)
    else:
      ax.set_ylim(0.95 * min(values), 1.05 * max(values))
    ax.set_ylabel(f'test {metric}')
    ax.set_title(dataset)
    ax.legend()
  fig.tight_layout()
  metrics = {metric for _, metric, _, _ in panels}
  name = 'accuracy.png' if metrics == {'accuracy'} else 'test_metrics.png'
  fig.savefig(os.path.join(out, name), dpi=100)
  plt.close(fig)
  for c in cells:
    if not c['gate'].startswith('dselect_k'):
      continue
    per_example = c['gate'] == 'dselect_k_per_example'
    name = _cell_name(c)
    records = metric_writers.read_metrics(os.path.join(out, 'workdirs', name))
    # Train records hold static weights at every log step (newer runs);
    # validation records once per epoch (per-example gates: the mean over
    # the validation examples).
    logged = [
      r for r in records if r['split'] == 'train' and 'expert_weights' in r
    ]
    logged = logged or [r for r in records if r['split'] == 'validation']
    if not logged:
      continue
    steps = [r['step'] for r in logged]
    weights = np.array([r['expert_weights'] for r in logged])  # (S, T, E)
    fig, axes = plt.subplots(
      1, weights.shape[1], figsize=(10, 3.5), squeeze=False
    )
    for t, ax in enumerate(axes[0]):
      for e in range(weights.shape[2]):
        ax.plot(steps, weights[:, t, e], label=f'expert {e}')
      ax.set_title(f'{name}: task {t + 1}')
      ax.set_xlabel('step')
      ax.set_ylabel(
        'mean gate weight (validation)' if per_example else 'gate weight'
      )
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f'expert_weights_{name}.png'), dpi=100)
    plt.close(fig)


def main(argv):
  del argv
  cli.setup_host_memory()  # As train.py does: before JAX starts.
  cli.quiet_orbax()
  out = cli.output_folder('out', _OUT.value)
  seeds = cli.positive_ints('seeds', _SEEDS.value, minimum=0)
  shard = _SHARD.value.split('/')
  if not (
    len(shard) == 2
    and all(p.isdigit() for p in shard)
    and int(shard[0]) < int(shard[1])
  ):
    raise cli.UsageError(
      f'--shard={_SHARD.value}: give i/n with 0 <= i < n, e.g. 0/2.'
    )
  unknown = sorted(set(_GATES.value) - set(GATE_VARIANTS))
  if unknown:
    sys.exit(
      f'error: unknown gate variants {unknown}; choose from '
      f'{sorted(GATE_VARIANTS)}.'
    )
  if not _TABLE_ONLY.value:
    index, count = map(int, shard)
    cells = [
      (g, d, s) for d in _DATASETS.value for g in _GATES.value for s in seeds
    ]
    for i, (gate, dataset, seed) in enumerate(cells):
      if i % count == index:
        try:
          run_cell(gate, dataset, seed, out)
        except trainer.Interrupted as e:  # SIGTERM/SIGINT: checkpoint saved.
          sys.exit(f'stopped: {e}')
  for row in tabulate(out):
    print(
      row['dataset'],
      row['gate'],
      *(f'{key} {row[f"{key}_mean"]:.4f}' for key in row['metrics']),
    )


if __name__ == '__main__':
  cli.run(main)
