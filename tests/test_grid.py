"""The experiment grid's helpers (the grid itself is run by hand)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'experiments'))

import grid  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import multimnist_fast  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_saturation_step_by_hand():
  records = [
      {'split': 'train', 'step': 10, 'num_nonzero_1': 8.0,
       'num_nonzero_2': 3.0},
      {'split': 'validation', 'step': 10, 'num_nonzero': [2, 2]},
      {'split': 'train', 'step': 20, 'num_nonzero_1': 2.0,
       'num_nonzero_2': 2.5},
      {'split': 'train', 'step': 30, 'num_nonzero_1': 2.0,
       'num_nonzero_2': 1.0},
  ]
  assert grid.saturation_step(records, 2) == 30
  assert grid.saturation_step(records, 3) == 20
  assert grid.saturation_step(records, 1) is None


def test_set_field_keeps_types():
  config = multimnist_fast.get_config()
  grid.set_field(config, 'model.gate.per_example', 'True')
  grid.set_field(config, 'optimizer.learning_rate', '3e-4')
  grid.set_field(config, 'num_epochs', '2')
  assert config.model.gate.per_example is True
  assert config.optimizer.learning_rate == pytest.approx(3e-4)
  assert config.num_epochs == 2 and isinstance(config.num_epochs, int)
  with pytest.raises(KeyError):
    grid.set_field(config, 'model.gate.kk', '3')
