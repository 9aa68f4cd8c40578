"""Multi-task networks. Both return the tasks' logits concatenated along dim 1, primary task first,
so they export and serve like any single-output classifier; `split_logits` cuts them apart.

- SharedBackbone (hard sharing): one backbone, one linear head per task.
- CrossStitchNet (soft sharing): one network per task; after each stage, learned cross-stitch
  units mix the tasks' features (Misra et al., 2016).
"""

from __future__ import annotations

import torch
from torch import nn


def split_logits(logits: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Cut concatenated (N, sum(sizes)) logits into one (N, size) tensor per task."""
    return list(torch.split(logits, sizes, dim=1))


def detach_head(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the classifier (the last nn.Linear) of a single-task network by Identity.

    Returns (the network, now producing features, and the feature width).
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("the network has no nn.Linear classifier to share")
    parent_name, _, child_name = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    features = getattr(parent, child_name).in_features
    setattr(parent, child_name, nn.Identity())
    return model, features


class SharedBackbone(nn.Module):
    """One backbone shared by every task, one head per task (hard parameter sharing)."""

    def __init__(self, backbone: nn.Module, features: int, sizes: list[int]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(features, size) for size in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.backbone(x)
        return torch.cat([head(shared) for head in self.heads], dim=1)


class CrossStitch(nn.Module):
    """Learned T×T mixing of T same-shaped feature maps; starts close to identity."""

    def __init__(self, tasks: int, keep: float = 0.9):
        super().__init__()
        off = (1.0 - keep) / max(1, tasks - 1)
        self.alpha = nn.Parameter(torch.full((tasks, tasks), off).fill_diagonal_(keep))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        stacked = torch.stack(features)  # T, N, ...
        mixed = torch.einsum("ij,j...->i...", self.alpha, stacked)
        return list(mixed.unbind(0))


class CrossStitchNet(nn.Module):
    """One sequence of stages per task (same architecture), cross-stitched after every stage but the
    head; `stages[t]` is a list of modules, the last one task t's classifier head."""

    def __init__(self, stages: list[list[nn.Module]]):
        super().__init__()
        self.columns = nn.ModuleList(nn.ModuleList(column) for column in stages)
        depth = len(stages[0])
        self.stitches = nn.ModuleList(CrossStitch(len(stages)) for _ in range(depth - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x] * len(self.columns)
        for level, stitch in enumerate(self.stitches):
            features = stitch([column[level](f) for column, f in zip(self.columns, features, strict=False)])
        return torch.cat([column[-1](f) for column, f in zip(self.columns, features, strict=False)], dim=1)
