"""The MultiMNIST network in PyTorch, the one both speed benchmarks compare
against (train_speed.py, expert_formulations.py). torch is an optional,
benchmark-only dependency: pip install torch==2.13.0."""

import torch
from torch import nn


def multimnist_expert() -> nn.Module:
  """experts.MultiMNISTExpert in PyTorch (NCHW): (B, 1, 36, 36) -> (B, 50)."""
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


class DSelectK(nn.Module):
  """Static DSelect-k gate (the paper's equations): () -> weights (E,)."""

  def __init__(self, num_experts: int, k: int, gamma: float = 1.0):
    super().__init__()
    m = (num_experts - 1).bit_length()
    self.gamma = gamma
    self.z = nn.Parameter(torch.empty(k, m).uniform_(-gamma / 100, gamma / 100))
    self.w = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))
    codes = [
      [(i >> (m - 1 - j)) & 1 for j in range(m)] for i in range(num_experts)
    ]
    self.register_buffer('codes', torch.tensor(codes, dtype=torch.bool))

  def forward(self) -> torch.Tensor:
    g, t = self.gamma, self.z
    s = torch.where(
      t <= -g / 2,
      torch.zeros_like(t),
      torch.where(
        t >= g / 2, torch.ones_like(t), -2 / g**3 * t**3 + 3 / (2 * g) * t + 0.5
      ),
    )[:, None, :]  # (K, 1, M)
    r = torch.where(self.codes[None], s, 1 - s).prod(-1)  # (K, E)
    return (torch.softmax(self.w, 0)[:, None] * r).sum(0)  # (E,)


class MultiMNISTMoE(nn.Module):
  """8 experts, one static DSelect-k gate (k = 2) and one tower per task:
  images (B, 1, 36, 36) -> logits of each task, [(B, 10)] * 2."""

  def __init__(self, num_experts: int = 8, k: int = 2, num_tasks: int = 2):
    super().__init__()
    self.experts = nn.ModuleList(
      multimnist_expert() for _ in range(num_experts)
    )
    self.gates = nn.ModuleList(
      DSelectK(num_experts, k) for _ in range(num_tasks)
    )
    self.towers = nn.ModuleList(
      nn.Sequential(
        nn.Linear(50, 50),
        nn.ReLU(),
        nn.Linear(50, 50),
        nn.ReLU(),
        nn.Linear(50, 10),
      )
      for _ in range(num_tasks)
    )

  def forward(self, x):
    f = torch.stack([e(x) for e in self.experts])  # (E, B, H)
    return [
      tower(torch.einsum('e,ebh->bh', gate(), f))
      for gate, tower in zip(self.gates, self.towers)
    ]
