"""scripts/make_docs.py's headline: one statistic per table, each row's code."""

import importlib.util
import json
import os

from conftest import REPO

_SPEC = importlib.util.spec_from_file_location(
  'make_docs', os.path.join(REPO, 'scripts', 'make_docs.py')
)
make_docs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(make_docs)


def _run(results, name, pooled, best, commit=None):
  folder = results / 'paddlerec_comparison' / name
  folder.mkdir(parents=True)
  stats = {
    'pooled_over_epochs': {'accuracy_1': pooled[0], 'accuracy_2': pooled[1]},
    'best_validation': {'accuracy_1': best[0], 'accuracy_2': best[1]},
  }
  (folder / 'test_metrics.json').write_text(
    json.dumps({'test_statistics': stats})
  )
  if commit:
    (folder / 'run_info.json').write_text(
      json.dumps({'starts': [{'git': {'commit': commit, 'dirty': False}}]})
    )


def test_each_table_sets_a_figure_beside_one_of_its_own_statistic(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(make_docs, 'RESULTS', str(tmp_path))
  _run(tmp_path, 'paddlerec', (0.90, 0.91), (0.94, 0.93), 'a' * 40)
  _run(tmp_path, 'multimnist_seed0', (0.92, 0.90), (0.95, 0.92), 'b' * 40)
  _run(tmp_path, 'multimnist_seed1', (0.93, 0.91), (0.96, 0.94), 'c' * 40)
  lines = make_docs.headline()
  pooled = lines[lines.index('| --- | --- | --- | --- | --- | --- |') :]
  cut = next(i for i, l in enumerate(pooled) if l.startswith('**Best'))
  pooled, best = pooled[:cut], pooled[cut:]
  # Pooled: PaddleRec's figure, the faithful run's pool (0.90 - 0.930460 =
  # -3.05 points, 0.91 - 0.916088 = -0.61), the 100-epoch recipe not run.
  assert '| 0.930460 | 0.916088 |' in pooled[1]
  assert pooled[2].startswith('| ours, `configs/paddlerec.py` (faithful, 100')
  assert '| 0.9000 | 0.9100 | -3.05 / -0.61 | `aaaaaaaaaaaa` |' in pooled[2]
  assert 'stretched to 100 epochs' in pooled[3]
  assert 'not run yet' in pooled[3]
  # The 20-epoch runs' pools (0.92, 0.93) appear nowhere: 20 passes are
  # not PaddleRec's 100.
  assert not any('0.9250' in l for l in lines)
  # Best validation: no PaddleRec row; the recipe's mean (0.955, 0.93)
  # against the faithful run's (0.94, 0.93): +1.50 / +0.00 points.
  assert not any('0.930460' in l for l in best)
  faithful, recipe = best[4], best[5]
  assert '| 0.9400 | 0.9300 |  | `aaaaaaaaaaaa` |' in faithful
  # Sample std of 0.95 and 0.96: 0.01 / sqrt(2) = 0.0071.
  assert '| 0.9550 ± 0.0071 | 0.9300 ± 0.0141 | +1.50 / +0.00 |' in recipe
  assert '| `bbbbbbbbbbbb`; `cccccccccccc` |' in recipe  # Each seed's code.


def test_a_run_without_run_info_is_labelled_unrecorded(tmp_path, monkeypatch):
  monkeypatch.setattr(make_docs, 'RESULTS', str(tmp_path))
  _run(tmp_path, 'paddlerec', (0.90, 0.91), (0.94, 0.93))
  # Not in git: no commit to name either.
  assert make_docs._code('paddlerec_comparison/paddlerec') == 'unrecorded'  # pylint: disable=protected-access
  assert make_docs.provenance_table()[-1] == (
    '| `results/paddlerec_comparison/paddlerec` | unrecorded |'
  )
