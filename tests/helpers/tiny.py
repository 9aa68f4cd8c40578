"""Tiny generated classification data and a quickly trained small CNN for the compression tests."""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import torch
from torch import nn

from components.models import ModelSpec, build_model

CLASSES = ["a", "b", "c"]
SPEC = ModelSpec(name="cnn", num_classes=3, in_channels=1, image_size=16, mean=[0.5], std=[0.5])


def tiny_data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 16, 16) float32 images and their classes (0..2): a bright blob in a class-dependent
    quadrant on noise, so a small CNN separates them in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
    for i, label in enumerate(y.tolist()):
        r, c = [(2, 2), (2, 9), (9, 5)][label]
        x[i, 0, r : r + 5, c : c + 5] += 2.0
    return x, y


def trained_cnn() -> nn.Module:
    """A fresh copy of SPEC's small CNN trained on tiny_data (trained once per test session), in eval mode."""
    return copy.deepcopy(_trained_cnn())


@functools.lru_cache(maxsize=1)
def trained_cnn_onnx() -> Path:
    """trained_cnn() exported to fp32 ONNX once per test session (treat the file as read-only)."""
    from components.packaging.export import export_onnx

    return export_onnx(trained_cnn(), SPEC, Path(tempfile.mkdtemp(prefix="visionflow-tiny-")) / "model.onnx")


def fit_tiny(model: nn.Module, steps: int, lr: float) -> nn.Module:
    """`model` trained `steps` Adam steps of 32 tiny_data images with cross-entropy, returned in eval mode."""
    x, y = tiny_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        batch = slice((step * 32) % len(x), (step * 32) % len(x) + 32)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@functools.lru_cache(maxsize=1)
def _trained_cnn(steps: int = 60, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fit_tiny(build_model(SPEC), steps, lr=3e-3)
