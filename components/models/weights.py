"""Pretrained weights: torchvision's files in the TORCH_HOME cache, or a local file; loaded safely, checked by name.

`model.pretrained: true` reads torchvision's weight file for the architecture from $TORCH_HOME/hub/checkpoints
(torchvision downloads it there once when online). Offline without that file, one line names the file to place
there. `model.weights: PATH` loads a local state dict or torchvision weight file with `weights_only=True`.
Either way the backbone gets the weights, the classifier head stays new (sized for the data's classes), and a
shape that does not match is reported by layer name.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel

from components.errors import VisionflowError


class WeightsError(VisionflowError):
    """Weights that cannot be used: missing offline, unreadable, or for another architecture (one line)."""


class WeightsMeta(BaseModel):
    """What torchvision's weights say about their inputs."""

    name: str
    file_name: str
    url: str
    crop_size: int
    resize_size: int
    mean: list[float]
    std: list[float]


def weights_meta(name: str) -> WeightsMeta:
    """torchvision's DEFAULT weights of architecture `name`: file name, url, input size and normalization."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    transforms = weights.transforms()
    return WeightsMeta(
        name=name,
        file_name=Path(urlparse(weights.url).path).name,
        url=weights.url,
        crop_size=int(transforms.crop_size[0]),
        resize_size=int(transforms.resize_size[0]),
        mean=[float(v) for v in transforms.mean],
        std=[float(v) for v in transforms.std],
    )


def checkpoints_dir() -> Path:
    """Where torchvision keeps downloaded weights: $TORCH_HOME/hub/checkpoints (torch.hub's rule)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights(name: str) -> Path | None:
    """The cached weight file of architecture `name`, or None when it is not in the cache."""
    path = checkpoints_dir() / weights_meta(name).file_name
    return path if path.is_file() and os.path.getsize(path) > 0 else None
