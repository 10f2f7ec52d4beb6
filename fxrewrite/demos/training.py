"""What the demos share: a seeded classifier training loop and top-1 accuracy.

>>> import torch
>>> torch.manual_seed(0) is not None
True
>>> model = torch.nn.Linear(2, 2)
>>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
>>> accuracy(fit_classifier(model, x, y, epochs=30, batch_size=16, lr=0.1, seed=0), x, y) > 90
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def fit_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                   seed: int) -> nn.Module:
    """Train ``model`` on (x, y) with cross-entropy, Adam and a one-cycle schedule, in shuffled mini-batches drawn
    from a generator seeded with ``seed``; returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    """Top-1 accuracy in percent, in batches of ``batch`` rows (all at once when None); the model runs in eval mode
    and its flag is restored."""
    training = model.training
    model.eval()
    try:
        step = batch or len(y)
        hits = sum(int((model(x[i:i + step]).argmax(dim=1) == y[i:i + step]).sum()) for i in range(0, len(y), step))
        return 100.0 * hits / len(y)
    finally:
        model.train(training)
