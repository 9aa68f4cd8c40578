"""One factory for every architecture: `build_model(spec)`.

A ModelSpec is everything needed to rebuild the network and feed it: architecture, classes,
input size, channels and normalization. It is stored in checkpoints and bundles as plain JSON.
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision
from pydantic import BaseModel, ConfigDict
from torch import nn

from components.errors import VisionflowError
from components.models.cnn import small_cnn


class ModelSpec(BaseModel):
    """What a trained network is: enough to rebuild it and preprocess its inputs."""

    model_config = ConfigDict(extra="forbid")

    name: str
    num_classes: int
    in_channels: int = 3
    image_size: int = 32
    dropout: float = 0.0
    pretrained: bool = False
    mean: list[float] = [0.5, 0.5, 0.5]
    std: list[float] = [0.5, 0.5, 0.5]


def _torchvision_weights(name: str, pretrained: bool):
    if not pretrained:
        return None
    return torchvision.models.get_model_weights(name).DEFAULT


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of `conv` taking `in_channels`; pretrained RGB filters are summed for 1 channel."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True).expand_as(new.weight) / in_channels)
    return new


def _resnet18(spec: ModelSpec) -> nn.Module:
    model = torchvision.models.resnet18(weights=_torchvision_weights("resnet18", spec.pretrained))
    model.conv1 = _adapt_first_conv(model.conv1, spec.in_channels)
    model.fc = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(model.fc.in_features, spec.num_classes))
    return model


def _mobilenet_v3_small(spec: ModelSpec) -> nn.Module:
    model = torchvision.models.mobilenet_v3_small(
        weights=_torchvision_weights("mobilenet_v3_small", spec.pretrained), dropout=spec.dropout
    )
    model.features[0][0] = _adapt_first_conv(model.features[0][0], spec.in_channels)
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, spec.num_classes)
    return model


def _cnn(spec: ModelSpec) -> nn.Module:
    if spec.pretrained:
        raise VisionflowError("model.pretrained: the small cnn has no pretrained weights; use resnet18 or mobilenet_v3_small")
    if spec.image_size % 4:
        raise VisionflowError(f"augment.image_size must be a multiple of 4 for the cnn (got {spec.image_size})")
    return small_cnn(spec.in_channels, spec.num_classes, spec.image_size, spec.dropout)


MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "cnn": _cnn,
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet_v3_small,
}


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the network described by `spec`; returns an nn.Module producing (N, num_classes) logits.

    Raises VisionflowError for an unknown name or when pretrained weights cannot be downloaded.
    """
    if spec.name not in MODELS:
        raise VisionflowError(f"unknown model {spec.name!r}; choose one of {', '.join(MODELS)}")
    try:
        return MODELS[spec.name](spec)
    except (OSError, RuntimeError) as err:
        if not spec.pretrained:
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise VisionflowError(
            f"could not download pretrained weights for {spec.name}: {reason} "
            "(offline? set model.pretrained: false, or put the weights file in $TORCH_HOME/hub/checkpoints)"
        ) from None
