"""scripts/time_to_accuracy.py on a run folder written by hand."""

import gzip
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
  'time_to_accuracy', os.path.join(REPO, 'scripts', 'time_to_accuracy.py')
)
time_to_accuracy = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(time_to_accuracy)


def _run_folder(folder, val, test, times, log_start='23:58:00.000000'):
  """val / test: {step: (acc_1, acc_2)}; times: {step: 'HH:MM:SS.ffffff'}."""
  records = []
  for step in sorted(test):
    if step in val:
      a, b = val[step]
      records.append(
        {
          'step': step,
          'split': 'validation',
          'accuracy_1': a,
          'accuracy_2': b,
          'accuracy_mean': (a + b) / 2,
        }
      )
    a, b = test[step]
    records.append(
      {'step': step, 'split': 'test_epoch', 'accuracy_1': a, 'accuracy_2': b}
    )
  with gzip.open(os.path.join(folder, 'metrics.jsonl.gz'), 'wt') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in records))
  lines = [f'I1203 {log_start} 1 train.py:74] JAX on 1 local devices']
  for step, t in sorted(times.items()):
    lines.append(
      f'I1203 {t} 1 trainer.py:151] test at step {step} (epoch {step // 10}): '
      'accuracy 0.1 / 0.2'
    )
  with open(os.path.join(folder, 'train.log'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def test_the_checkpoint_validation_chose_decides_and_time_crosses_midnight(
  tmp_path,
):
  # Epoch 2's test pass is above PaddleRec on both tasks, but validation
  # prefers epoch 1, so epoch 2 does not count; at epoch 3 validation picks
  # epoch 3, whose test accuracy is above on both: the answer is epoch 3.
  _run_folder(
    tmp_path,
    val={10: (0.95, 0.95), 20: (0.90, 0.90), 30: (0.96, 0.96)},
    test={10: (0.92, 0.95), 20: (0.94, 0.93), 30: (0.931, 0.917)},
    times={10: '23:59:00.000000', 20: '00:01:00.000000', 30: '00:02:30.000000'},
  )
  rows = time_to_accuracy.epochs(str(tmp_path))
  assert [r['chosen_step'] for r in rows] == [10, 10, 30]
  assert [r['wall_s'] for r in rows] == [60.0, 180.0, 270.0]  # Midnight.
  i, row = time_to_accuracy.first_above(rows, (0.930460, 0.916088))
  assert (i, row['step'], row['chosen_test']) == (2, 30, (0.931, 0.917))


def test_a_run_that_never_gets_there(tmp_path):
  _run_folder(
    tmp_path,
    val={10: (0.9, 0.9)},
    test={10: (0.9305, 0.91)},  # Task 1 above, task 2 below.
    times={10: '23:59:00.000000'},
  )
  assert time_to_accuracy.first_above(
    time_to_accuracy.epochs(str(tmp_path)), (0.930460, 0.916088)
  ) == (
    None,
    None,
  )


def test_epoch_costs_split_training_from_evaluation(tmp_path):
  # Epoch 1 ends at step 10 (log 00:00:10, test line 00:00:14); epoch 2's
  # last step is logged at 00:00:44 and its test at 00:00:50: training
  # 44 - 14 = 30 s, evaluation 50 - 44 = 6 s.
  log = [
    'I1203 00:00:00.000000 1 train.py:74] JAX on 1 local devices',
    'I1203 00:00:10.000000 1 trainer.py:367] step 10/20  loss 1.0',
    'I1203 00:00:14.000000 1 trainer.py:151] test at step 10 (epoch 1): x',
    'I1203 00:00:44.000000 1 trainer.py:367] step 20/20  loss 1.0',
    'I1203 00:00:50.000000 1 trainer.py:151] test at step 20 (epoch 2): x',
  ]
  (tmp_path / 'train.log').write_text('\n'.join(log) + '\n')
  assert time_to_accuracy.epoch_costs(str(tmp_path)) == [(30.0, 6.0)]


def test_the_default_target_is_the_faithful_runs_best_validation(tmp_path):
  path = tmp_path / 'test_metrics.json'
  path.write_text(
    json.dumps(
      {
        'test_statistics': {
          'pooled_over_epochs': {'accuracy_1': 0.90, 'accuracy_2': 0.91},
          'best_validation': {'accuracy_1': 0.9394, 'accuracy_2': 0.928},
        }
      }
    )
  )
  assert time_to_accuracy.faithful_target(str(path)) == (0.9394, 0.928)
  with pytest.raises(SystemExit, match='give --target=A1,A2'):
    time_to_accuracy.faithful_target(str(tmp_path / 'missing.json'))
