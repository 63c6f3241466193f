"""The MultiMNIST expert in PyTorch, the one network both speed benchmarks
compare against (train_speed.py, expert_formulations.py). torch is an
optional, benchmark-only dependency: pip install torch==2.13.0."""

from torch import nn


def multimnist_expert() -> nn.Module:
  """models.MultiMNISTExpert in PyTorch (NCHW): (B, 1, 36, 36) -> (B, 50)."""
  return nn.Sequential(
    nn.Conv2d(1, 10, 5),
    nn.BatchNorm2d(10),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(10, 20, 5),
    nn.BatchNorm2d(20),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(720, 50),
    nn.ReLU(),
    nn.Linear(50, 50),
    nn.ReLU(),
  )
