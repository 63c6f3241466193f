"""Regenerates the results section of README.md from the files in results/.

  python scripts/make_readme_results.py

Everything between the markers <!-- results:start --> and
<!-- results:end --> is replaced; nothing in it is typed by hand, so it cannot
drift from the committed runs.
"""

import glob
import json
import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'results')
START, END = '<!-- results:start -->', '<!-- results:end -->'
SEED_FIGURES = {1: 0.930460, 2: 0.916088}  # PaddleRec, 100 epochs.


def _read(path):
  with open(path) as f:
    return f.read()


def fast_recipe() -> list[str]:
  """The 5-epoch runs of configs/multimnist_fast.py (results/multimnist_fast/)."""
  folder = os.path.join(RESULTS, 'multimnist_fast')
  runs = sorted(glob.glob(os.path.join(folder, 'test_metrics_seed*.json')))
  if not runs:
    return ['No 5-epoch run has finished yet.']
  metrics = [json.loads(_read(p)) for p in runs]
  walls = {}
  wall_file = os.path.join(folder, 'wall_time.txt')
  if os.path.exists(wall_file):
    for line in _read(wall_file).splitlines():
      m = re.match(r'seed (\d+) wall_seconds (\d+)', line)
      if m:
        walls[int(m.group(1))] = int(m.group(2))
  lines = [
      f'`configs/multimnist_fast.py` (the reference recipe in 5 epochs with '
      f'warmup + cosine; one DSelect-k gate per task, k = 2), `comet` '
      f'MultiMNIST (100,000 / 20,000 / 20,000), {len(runs)} seed(s), test '
      'accuracy of the best-on-validation checkpoint, on the 2-core CPU '
      '(`bash results/multimnist_fast/run.sh`):', '',
      '| | task 1 accuracy | task 2 accuracy | experts used (task 1, task 2) '
      '| wall time per run |', '| --- | --- | --- | --- | --- |']
  for path, m in zip(runs, metrics):
    seed = int(re.search(r'seed(\d+)', path).group(1))
    wall = f'{walls[seed] / 60:.1f} min' if seed in walls else 'n/a'
    lines.append(f'| seed {seed} | {m["accuracy_1"]:.4f} | '
                 f'{m["accuracy_2"]:.4f} | {m["selected_experts"]} | {wall} |')
  acc = {t: np.array([m[f'accuracy_{t}'] for m in metrics]) for t in (1, 2)}
  lines.append(f'| **mean ± std** | **{_mean_std(acc[1])}** | '
               f'**{_mean_std(acc[2])}** | | |')
  lines.append(f'| PaddleRec (the seed, 100 epochs, shared gate) | '
               f'{SEED_FIGURES[1]:.6f} | {SEED_FIGURES[2]:.6f} | | |')
  verdict = all(acc[t].mean() >= SEED_FIGURES[t] for t in (1, 2))
  lines += ['', ('Both task means are above the seed\'s figures.' if verdict
                 else 'The means do not reach the seed\'s figures on both '
                 'tasks.')]
  notes = os.path.join(folder, 'NOTES.md')
  if os.path.exists(notes):
    lines += ['', _read(notes).strip()]
  lines += ['', 'Logs, metrics, plots and configs: '
            '`results/multimnist_fast/`.']
  return lines


def full_recipe() -> list[str]:
  """The 100-epoch runs: a table of the finished ones (results/headline/runs/
  <run>/test_metrics.json), then the status from results/headline/NOTES.md."""
  lines = []
  rows, acc = [], {'multimnist': {1: [], 2: []}, 'paddlerec': {1: [], 2: []}}
  for path in sorted(glob.glob(os.path.join(
      RESULTS, 'headline', 'runs', '*_seed*', 'test_metrics.json'))):
    name = os.path.basename(os.path.dirname(path))  # e.g. multimnist_seed0
    m = json.loads(_read(path))
    recipe = name.split('_seed')[0]
    for t in (1, 2):
      acc[recipe][t].append(m[f'accuracy_{t}'])
    rows.append(f'| `configs/{recipe}.py`, seed {name.split("_seed")[1]} | '
                f'{m["accuracy_1"]:.4f} | {m["accuracy_2"]:.4f} | '
                f'{m["selected_experts"]} | {m["step"]} |')
  if not rows:
    lines.append('No 100-epoch run has finished yet.')
  else:
    lines += ['`configs/multimnist.py` (the seed\'s recipe: 100 epochs, Adam '
              '1e-3, batch 256, 8 CNN experts; one DSelect-k gate per task, '
              'k = 2) on the `comet` MultiMNIST (100,000 / 20,000 / 20,000), '
              'and `configs/paddlerec.py` (PaddleRec\'s setup: one shared '
              'gate, `paretomtl` data); test accuracy of the '
              'best-on-validation checkpoint (`results/headline/run_cpu.sh` '
              'or `run_gpu.sh`; files in `results/headline/runs/`):', '',
              '| run | task 1 accuracy | task 2 accuracy | experts used '
              '(task 1, task 2) | best step |', '| --- | --- | --- | --- | --- |']
    lines += rows
    for recipe in acc:
      if len(acc[recipe][1]) > 1:  # No spread to show for a single seed.
        lines.append(f'| **`configs/{recipe}.py`, mean ± std of '
                     f'{len(acc[recipe][1])} seeds** | '
                     f'**{_mean_std(acc[recipe][1])}** | '
                     f'**{_mean_std(acc[recipe][2])}** | | |')
    lines.append(f'| PaddleRec (the seed, 100 epochs, shared gate) | '
                 f'{SEED_FIGURES[1]:.6f} | {SEED_FIGURES[2]:.6f} | | |')
    lines.append('')
    for recipe in acc:
      if acc[recipe][1]:
        verdicts = [f'task {t} ' + ('above' if np.mean(acc[recipe][t]) >=
                                     SEED_FIGURES[t] else 'below')
                    for t in (1, 2)]
        n = len(acc[recipe][1])
        lines += [f'`configs/{recipe}.py` against the seed\'s figures ('
                  + (f'mean of {n} seeds' if n > 1 else 'one seed') + '): '
                  + ', '.join(verdicts) + '.', '']
    lines.pop()
  notes = os.path.join(RESULTS, 'headline', 'NOTES.md')
  if not os.path.exists(notes):
    return lines
  # The title and the first paragraph under it.
  title, first = _read(notes).strip().split('\n\n')[:2]
  return lines + ['', f'**{title.lstrip("# ")}:** ' + ' '.join(first.split())
                  + ' Scripts and what was tried: `results/headline/NOTES.md`.']


def _mean_std(values):
  values = np.asarray(values)
  std = values.std(ddof=1) if len(values) > 1 else 0.0
  return f'{values.mean():.4f} ± {std:.4f}'


def entropy_runs() -> list[str]:
  """The grid's DSelect-k cells on MultiMNIST: the entropy recipe."""
  paths = sorted(glob.glob(os.path.join(
      RESULTS, 'grid', 'cells', 'multi_mnist-dselect_k-seed*.json')))
  if not paths:
    return []
  cells = [json.loads(_read(p)) for p in paths]
  lines = [
      '', '### DSelect-k with the entropy regularizer: exactly k experts', '',
      '`configs/multimnist_entropy.py` (`multimnist_fast` plus the entropy '
      'term, weight ramped 0 -> 1 over 100 steps, and sparse training), '
      '`comet` MultiMNIST, test accuracy of the best-on-validation '
      'checkpoint; these are the grid\'s `dselect_k` cells '
      '(`bash results/grid/run.sh`, files in `results/grid/`):', '',
      '| | task 1 accuracy | task 2 accuracy | experts used (task 1, task 2) '
      '| selectors saturated at step | wall time per run |',
      '| --- | --- | --- | --- | --- | --- |']
  for c in cells:
    lines.append(f'| seed {c["seed"]} | {c["accuracy_1"]:.4f} | '
                 f'{c["accuracy_2"]:.4f} | {c["selected_experts"]} | '
                 f'{c["saturation_step"]} | {c["wall_seconds"] / 60:.1f} min |')
  lines.append(f'| **mean ± std** | '
               f'**{_mean_std([c["accuracy_1"] for c in cells])}** | '
               f'**{_mean_std([c["accuracy_2"] for c in cells])}** | | | |')
  lines.append(f'| PaddleRec (the seed, 100 epochs, shared gate) | '
               f'{SEED_FIGURES[1]:.6f} | {SEED_FIGURES[2]:.6f} | | | |')
  # The plot of a run that logged the weights at every log step (runs from
  # before that logged them once per epoch).
  for c in cells:
    name = f'multi_mnist-dselect_k-seed{c["seed"]}'
    png = f'grid/expert_weights_{name}.png'
    metrics = os.path.join(RESULTS, 'grid', 'workdirs', name, 'metrics.jsonl')
    if os.path.exists(os.path.join(RESULTS, png)) and any(
        r['split'] == 'train' and 'expert_weights' in r
        for r in map(json.loads, _read(metrics).splitlines())):
      lines += ['', f'Each task\'s gate weights over training (seed '
                f'{c["seed"]}, the weights at every log step):', '',
                f'![expert weights, seed {c["seed"]}](results/{png})']
      break
  return lines


def parity_run() -> list[str]:
  folder = os.path.join(RESULTS, 'paddlerec_parity')
  path = os.path.join(folder, 'test_metrics_seed0.json')
  if not os.path.exists(path):
    return []
  m = json.loads(_read(path))
  wall = re.search(r'wall_seconds (\d+)', _read(os.path.join(
      folder, 'wall_time.txt')))
  lines = [
      '', '### PaddleRec\'s setup (shared gate, paretomtl data)', '',
      '`configs/paddlerec.py`, seed 0, test accuracy of the '
      'best-on-validation checkpoint: 5 epochs (`--config.num_epochs=5`, '
      '`bash results/paddlerec_parity/run.sh`) and the full 100 '
      '(`results/headline/run_cpu.sh`):', '',
      '| | task 1 accuracy | task 2 accuracy | experts used | wall time |',
      '| --- | --- | --- | --- | --- |',
      f'| ours, 5 epochs | {m["accuracy_1"]:.4f} | {m["accuracy_2"]:.4f} | '
      f'{m["selected_experts"][0]} | '
      f'{int(wall.group(1)) / 60:.1f} min |' if wall else '']
  full = os.path.join(RESULTS, 'headline', 'runs', 'paddlerec_seed0')
  if os.path.exists(os.path.join(full, 'test_metrics.json')):
    m = json.loads(_read(os.path.join(full, 'test_metrics.json')))
    parts = [int(x) for x in re.findall(
        r'^paddlerec_seed0 exit \d+ wall_seconds (\d+)',
        _read(os.path.join(RESULTS, 'headline', 'runs', 'wall_time.txt')),
        re.M)]
    lines.append(
        f'| ours, 100 epochs (`results/headline/runs/paddlerec_seed0`) | '
        f'{m["accuracy_1"]:.4f} | {m["accuracy_2"]:.4f} | '
        f'{m["selected_experts"][0]} | {sum(parts) / 3600:.1f} h in '
        f'{len(parts)} parts |')
  lines.append(f'| PaddleRec (the seed), 100 epochs | {SEED_FIGURES[1]:.6f} | '
               f'{SEED_FIGURES[2]:.6f} | | |')
  notes = os.path.join(folder, 'NOTES.md')
  if os.path.exists(notes):
    lines += ['', _read(notes).strip()]
  return lines


def grid_section() -> list[str]:
  lines = section('Gate comparison grid', 'grid/table.md')
  if not lines:
    return []
  notes = os.path.join(RESULTS, 'grid', 'NOTES.md')
  if os.path.exists(notes):
    lines += ['', _read(notes).strip()]
  if os.path.exists(os.path.join(RESULTS, 'grid', 'accuracy.png')):
    lines += ['', '![accuracy per gate](results/grid/accuracy.png)']
  return lines


def section(title, path, fence=False) -> list[str]:
  full = os.path.join(RESULTS, path)
  if not os.path.exists(full):
    return []
  text = _read(full).strip()
  if fence:
    body = ['```', text, '```']
  else:  # Commands as code, the file's own headings as bold lines.
    body = [f'`{l}`' if l.startswith('$ ') else
            re.sub(r'^#+ (.*)', r'**\1**', l) for l in text.splitlines()]
  return ['', f'### {title}', '', f'From `results/{path}`:', ''] + body


def main():
  lines = [START, '', '### MultiMNIST against the seed: 100 epochs', '']
  lines += full_recipe()
  lines += ['', '### The same recipe in 5 epochs', ''] + fast_recipe()
  lines += entropy_runs()
  lines += parity_run()
  lines += grid_section()
  lines += section('The training step as the trainer maps it (CPU)',
                   'train_speed_mapping.md')
  lines += section('The BatchNorm kernels (CPU)', 'train_speed_kernel.md')
  lines += section('One BatchNorm-ReLU-pool block: kernels against XLA (CPU)',
                   'bn_relu_pool.txt')
  lines += section('Training speed against PyTorch (CPU), before the kernels',
                   'train_speed.md')
  lines += section('The same, rerun on a slower machine', 'train_speed_rerun.md')
  lines += section('Splitting the CPU into several XLA devices',
                   'train_speed_cpu_devices.md')
  lines += section('XLA:CPU options (CPU), Toeplitz convolutions',
                   'xla_cpu_flags_toeplitz.txt', fence=True)
  lines += section('XLA:CPU options (CPU), XLA convolutions',
                   'xla_cpu_flags.txt', fence=True)
  lines += section('Expert formulations (CPU)', 'expert_formulations.txt',
                   fence=True)
  lines += section('Expert formulations with the CPU kernels (CPU)',
                   'expert_formulations_kernel.txt', fence=True)
  lines += section('Sparse evaluation once a gate has converged',
                   'sparse_eval.txt', fence=True)
  lines += section('Choosing the entropy schedule (shipped sample)',
                   'entropy_sample/README.md')
  lines += section('Building the data', 'build_data.txt', fence=True)
  lines += ['', END]
  readme = _read(os.path.join(REPO, 'README.md'))
  block = '\n'.join(lines)
  if START in readme:
    readme = re.sub(re.escape(START) + '.*?' + re.escape(END),
                    lambda _: block, readme, flags=re.S)
  else:
    readme = readme.replace('\n## Data\n', f'\n## Results\n\n{block}\n\n'
                            '## Data\n', 1)
  with open(os.path.join(REPO, 'README.md'), 'w') as f:
    f.write(readme)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
