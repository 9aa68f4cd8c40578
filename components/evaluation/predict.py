"""Run a network over a DataLoader and collect its logits."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate `model` (put in eval mode) on every batch of `loader`.

    Returns (logits of shape (N, C) as float32 on the CPU, targets of shape (N,)).
    """
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(targets)
