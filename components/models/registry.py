"""One factory for every architecture: `build_model(spec)`.

A ModelSpec is everything needed to rebuild the network and feed it: architecture, its options,
classes, input size, channels and normalization. It is stored in checkpoints and bundles as JSON.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from components.config import TORCHVISION_MODELS, ModelName, RnnParams, VitParams
from components.errors import VisionflowError
from components.models.cnn import small_cnn, small_cnn_stages
from components.models.multitask import CrossStitchNet, SharedBackbone, detach_head
from components.models.rnn import SequenceClassifier
from components.models.vit import SmallViT
from components.models.weights import apply_weights


class ModelSpec(BaseModel):
    """What a trained network is: enough to rebuild it and preprocess its inputs."""

    model_config = ConfigDict(extra="forbid")

    name: str
    num_classes: int
    in_channels: int = 3
    image_size: int = 32
    dropout: float = 0.0
    width: float = 1.0
    pretrained: bool = False
    weights: str | None = None  # a local weights file for a torchvision architecture (components/models/weights.py)
    mean: list[float] = [0.5, 0.5, 0.5]
    std: list[float] = [0.5, 0.5, 0.5]
    rnn: RnnParams = Field(default_factory=RnnParams)
    vit: VitParams = Field(default_factory=VitParams)
    multitask_mode: str = "off"
    extra_tasks: dict[str, int] = Field(default_factory=dict)

    def task_sizes(self) -> list[int]:
        """Output width of each task, primary first (logits are concatenated in this order)."""
        return [self.num_classes, *self.extra_tasks.values()]


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of `conv` taking `in_channels`; pretrained RGB filters are averaged for 1 channel."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _replace_last_linear(head: nn.Sequential, num_classes: int) -> None:
    """Swap the last nn.Linear of a torchvision classifier head for one with `num_classes` outputs."""
    index = max(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
    head[index] = nn.Linear(head[index].in_features, num_classes)


def _torchvision_weights(spec: ModelSpec):
    """None: pretrained and local weights are loaded into the built model by build_model (components.models.weights:
    from $TORCH_HOME's cache, offline-ready, shapes checked by layer name)."""
    return None


def _resnet(spec: ModelSpec) -> nn.Module:
    model = torchvision.models.get_model(spec.name, weights=_torchvision_weights(spec))
    model.conv1 = _adapt_first_conv(model.conv1, spec.in_channels)
    model.fc = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(model.fc.in_features, spec.num_classes))
    return model


def _mobilenet(spec: ModelSpec) -> nn.Module:
    """MobileNet and EfficientNet: the builder takes the dropout of their classifier head."""
    model = torchvision.models.get_model(spec.name, weights=_torchvision_weights(spec), dropout=spec.dropout)
    model.features[0][0] = _adapt_first_conv(model.features[0][0], spec.in_channels)
    _replace_last_linear(model.classifier, spec.num_classes)
    return model


def _convnext(spec: ModelSpec) -> nn.Module:
    model = torchvision.models.get_model(spec.name, weights=_torchvision_weights(spec))
    model.features[0][0] = _adapt_first_conv(model.features[0][0], spec.in_channels)
    model.classifier.insert(len(model.classifier) - 1, nn.Dropout(spec.dropout))
    _replace_last_linear(model.classifier, spec.num_classes)
    return model


def _no_pretrained(spec: ModelSpec) -> None:
    if spec.pretrained:
        raise VisionflowError(
            f"model.pretrained: {spec.name} has no pretrained weights; use one of {', '.join(TORCHVISION_MODELS)}"
        )


def _cnn(spec: ModelSpec) -> nn.Module:
    _no_pretrained(spec)
    if spec.image_size % 4:
        raise VisionflowError(f"augment.image_size must be a multiple of 4 for the cnn (got {spec.image_size})")
    return small_cnn(spec.in_channels, spec.num_classes, spec.image_size, spec.dropout, spec.width)


def _rnn(spec: ModelSpec) -> nn.Module:
    _no_pretrained(spec)
    return SequenceClassifier(
        spec.in_channels, spec.num_classes, spec.image_size, dropout=spec.dropout, **spec.rnn.model_dump()
    )


def _vit(spec: ModelSpec) -> nn.Module:
    _no_pretrained(spec)
    return SmallViT(spec.in_channels, spec.num_classes, spec.image_size, dropout=spec.dropout, **spec.vit.model_dump())


# model.name -> builder: exactly the names config's ModelName allows (a test checks they agree).
MODELS: dict[ModelName, Callable[[ModelSpec], nn.Module]] = {
    "cnn": _cnn,
    "rnn": _rnn,
    "vit": _vit,
    "resnet18": _resnet,
    "resnet34": _resnet,
    "resnet50": _resnet,
    "mobilenet_v3_small": _mobilenet,
    "mobilenet_v3_large": _mobilenet,
    "efficientnet_b0": _mobilenet,
    "convnext_tiny": _convnext,
}


def _build(spec: ModelSpec) -> nn.Module:
    sizes = spec.task_sizes()
    if spec.multitask_mode == "shared_weights":
        backbone, features = detach_head(MODELS[spec.name](spec))
        return SharedBackbone(backbone, features, sizes)
    if spec.multitask_mode == "shared_features":
        if spec.name != "cnn":
            raise VisionflowError("multitask.mode shared_features (cross-stitch) is built for model.name cnn")
        _no_pretrained(spec)
        return CrossStitchNet(
            [small_cnn_stages(spec.in_channels, size, spec.image_size, spec.dropout, spec.width) for size in sizes]
        )
    return MODELS[spec.name](spec)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the network described by `spec`; returns an nn.Module producing (N, sum of task sizes)
    logits: (N, num_classes) for one task, the tasks' logits concatenated (primary first) otherwise.

    Raises VisionflowError for an unknown name or when pretrained weights cannot be downloaded.
    """
    if spec.name not in MODELS:
        raise VisionflowError(f"unknown model {spec.name!r}; choose one of {', '.join(MODELS)}")
    try:
        model = _build(spec)
        apply_weights(model, spec.name, spec.pretrained, spec.weights)  # after the model is built: head stays new
        return model
    except (OSError, RuntimeError) as err:
        if not spec.pretrained:
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise VisionflowError(
            f"could not download pretrained weights for {spec.name}: {reason} "
            "(offline? set model.pretrained: false, or put the weights file in $TORCH_HOME/hub/checkpoints)"
        ) from None
