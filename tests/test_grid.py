"""The experiment grid's helpers (the grid itself is run by hand)."""

import json
import os

from conftest import assert_png
import pytest

from configs import multimnist_fast
from experiments import grid


def test_saturation_step_by_hand():
  records = [
    {'split': 'train', 'step': 10, 'num_nonzero_1': 8.0, 'num_nonzero_2': 3.0},
    {'split': 'validation', 'step': 10, 'num_nonzero': [2, 2]},
    {'split': 'train', 'step': 20, 'num_nonzero_1': 2.0, 'num_nonzero_2': 2.5},
    {'split': 'train', 'step': 30, 'num_nonzero_1': 2.0, 'num_nonzero_2': 1.0},
  ]
  assert grid.saturation_step(records, 2) == 30
  assert grid.saturation_step(records, 3) == 20
  assert grid.saturation_step(records, 1) is None


def test_a_cells_fields_are_type_checked():
  config = multimnist_fast.get_config()
  grid.set_field(config, 'model.gate.per_example', True)
  grid.set_field(config, 'seed', 2)
  assert config.model.gate.per_example is True and config.seed == 2
  with pytest.raises(KeyError):
    grid.set_field(config, 'model.gate.kk', 3)
  with pytest.raises(TypeError):
    grid.set_field(config, 'seed', 'two')


def test_train_speeds_are_medians_on_each_side_of_saturation():
  rates = [
    (10, 100.0),
    (20, 300.0),
    (30, 200.0),
    (40, 900.0),
    (50, 50.0),
    (60, 1000.0),
  ]
  records = [
    {'split': 'train', 'step': s, 'images_per_second': v} for s, v in rates
  ]
  records.insert(2, {'split': 'validation', 'step': 20})
  assert grid.train_speeds(records, 30) == (200.0, 900.0)
  assert grid.train_speeds(records, None) == (250.0, None)
  assert grid.train_speeds(records, 50) == (200.0, 1000.0)
  assert grid.train_speeds(records, 60) == (250.0, None)


def test_tabulate_means_and_sample_stds(tmp_path):
  os.makedirs(tmp_path / 'cells')
  for seed, (a1, a2) in enumerate(((0.90, 0.80), (0.94, 0.84))):
    cell = {
      'gate': 'softmax',
      'dataset': 'multi_mnist',
      'seed': seed,
      'accuracy_1': a1,
      'accuracy_2': a2,
      'num_nonzero': [8, 8],
      'saturation_step': None,
      'wall_seconds': 60.0 * (seed + 1),
    }
    if seed:
      cell['conv'] = 'toeplitz'
    with open(
      tmp_path / 'cells' / f'multi_mnist-softmax-seed{seed}.json', 'w'
    ) as f:
      json.dump(cell, f)
  rows = grid.tabulate(str(tmp_path))
  assert len(rows) == 1
  row = rows[0]
  # Mean of 0.90 and 0.94; sample std of two values a, b is |a - b| / sqrt(2).
  assert row['accuracy_1_mean'] == pytest.approx(0.92)
  assert row['accuracy_1_std'] == pytest.approx(0.04 / 2**0.5)
  assert row['accuracy_2_mean'] == pytest.approx(0.82)
  assert row['wall_minutes_mean'] == pytest.approx(1.5)
  table = (tmp_path / 'table.md').read_text()
  assert '0.9200 ± 0.0283' in table
  # Per-run minutes with the convolution each run used (xla when unrecorded).
  assert '1.0 (xla), 2.0 (toeplitz)' in table
  # One panel (multi_mnist accuracy): figsize (5, 3.5) inches at 100 dpi.
  assert_png(tmp_path / 'accuracy.png', 500, 350)
