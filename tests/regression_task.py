"""A user's own task, as `--task regression_task:make_task` names it (tests put this folder
on sys.path): a small MLP's data set that is neither CIFAR nor MNIST, synthetic regression
scored by mean squared error (lower is better)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepzip import MeanSquaredError, Task


class RegressionMLP(nn.Module):
    def __init__(self, inputs: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, 64), nn.Tanh(), nn.Linear(64, 64),
                                  nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.linspace(-1, 1, 16)
    y = torch.sin(x @ w).unsqueeze(1) + 0.5 * x[:, :1] ** 2
    return TensorDataset(x, y)


def make_task(subset: int | None = None) -> Task:
    n = subset or 2048
    g = torch.Generator().manual_seed(0)
    return Task.from_loaders(
        DataLoader(data(n, 1), batch_size=64, shuffle=True, generator=g),
        DataLoader(data(512, 2), batch_size=256),
        name="synthetic-regression", metric=MeanSquaredError())
