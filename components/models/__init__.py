"""Model registry: `build_model(ModelSpec)`."""

from components.models.registry import MODELS, ModelSpec, build_model

__all__ = ["MODELS", "ModelSpec", "build_model"]
