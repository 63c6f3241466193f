"""scripts/run_summary.py on a metrics file written by hand."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'run_summary.py')


def _run(*args):
  return subprocess.run(
    [sys.executable, SCRIPT, *args], capture_output=True, text=True, check=False
  )


def test_summary_of_a_resumed_run(tmp_path):
  def train(step, images_per_second, rss):
    return {
      'step': step,
      'split': 'train',
      'loss': 0.1,
      'images_per_second': images_per_second,
      'peak_rss_mb': rss,
    }

  def validation(step, acc_1, acc_2, weights, num_nonzero):
    return {
      'step': step,
      'split': 'validation',
      'accuracy_1': acc_1,
      'accuracy_2': acc_2,
      'accuracy_mean': (acc_1 + acc_2) / 2,
      'expert_weights': weights,
      'num_nonzero': num_nonzero,
    }

  records = [
    train(50, 100, 1000),
    train(100, 300, 1200),
    validation(100, 0.90, 0.80, [[0.5, 0.5], [0.25, 0.75]], [2, 2]),
    train(150, 500, 1100),
    # Killed here; the resumed run logs step 150 again, and these two
    # records no longer count (the 0.99s would otherwise be the best).
    validation(150, 0.99, 0.99, [[0.5, 0.5], [0.5, 0.5]], [2, 2]),
    train(150, 700, 1300),
    validation(150, 0.95, 0.85, [[0.1, 0.9], [0.0, 1.0]], [2, 1]),
    {
      'step': 150,
      'split': 'test',
      'accuracy_1': 0.94,
      'accuracy_2': 0.84,
      'checkpoint': 'best',
    },
  ]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)

  result = _run(str(tmp_path), '--after=50')
  assert result.returncode == 0, result.stderr
  # By hand: the windows after step 50 are 300 and 700 images/s (the 500 of
  # the killed run is superseded): median 500, and numpy's linear percentiles
  # 300 + 0.1 * 400 = 340 and 300 + 0.9 * 400 = 660.
  assert result.stdout.splitlines() == [
    'validation: 2 records, last at step 150; best at step 150: '
    '0.9500 / 0.8500',
    'validation after step 50: task 1 0.9000-0.9500, task 2 0.8000-0.8500',
    'train log windows after step 50: 2, median 500 images/s '
    '(10th-90th percentile 340-660)',
    'peak resident memory: 1300 MB',
    'task 1 expert weights at step 150: 0.100-0.900, 2 experts in use',
    'task 2 expert weights at step 150: 0.000-1.000, 1 experts in use',
    'test (best checkpoint, step 150): 0.94000 / 0.84000',
  ]


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path):
  result = _run(str(tmp_path))
  assert result.returncode != 0
  assert result.stderr.strip() == (
    f'no metrics.jsonl in {tmp_path}: give a train.py workdir.'
  )


def test_summary_of_a_recommender_run_names_its_metrics(tmp_path):
  def validation(step, auc, rmse, loss):
    return {
      'step': step,
      'split': 'validation',
      'auc_1': auc,
      'rmse_2': rmse,
      'selection_score': -loss,
      'expert_weights': [[0.0, 1.0], [1.0, 0.0]],
      'num_nonzero': [1, 1],
    }

  # The best record is the one of lowest loss, step 20, though step 30 has
  # the higher AUC.
  records = [
    validation(10, 0.80, 1.00, 1.6),
    validation(20, 0.85, 0.92, 1.3),
    validation(30, 0.87, 0.99, 1.4),
  ]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  result = _run(str(tmp_path))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == (
    'validation: 3 records, last at step 30; best at step 20: '
    'auc 0.8500 / rmse 0.9200'
  )
  assert lines[1] == (
    'validation after step 0: task 1 auc 0.8000-0.8700, '
    'task 2 rmse 0.9200-1.0000'
  )
