"""Model registry: `build_model(ModelSpec)`.

The registry (torch, torchvision) is imported on first use of these names, so the package's light modules
(`components.models.weights`) import without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.models.registry import MODELS, ModelSpec, build_model

__all__ = ["MODELS", "ModelSpec", "build_model"]


def __getattr__(name: str):
    if name in __all__:
        from components.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
