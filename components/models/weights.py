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
    """Where torchvision keeps downloaded weights: torch.hub's folder and its rule, $TORCH_HOME/hub/checkpoints,
    else $XDG_CACHE_HOME/torch/hub/checkpoints, else ~/.cache/torch/hub/checkpoints (read without importing torch)."""
    home = os.getenv("TORCH_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def cached_weights(name: str) -> Path | None:
    """The cached weight file of architecture `name`, or None when it is not in the cache (an empty or missing
    cache folder answers without importing torchvision)."""
    folder = checkpoints_dir()
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    path = folder / weights_meta(name).file_name
    return path if path.is_file() and os.path.getsize(path) > 0 else None


def _download(meta: WeightsMeta) -> Path:
    """Fetch torchvision's weight file into the cache (torch.hub); raises WeightsError naming the file offline."""
    import torch

    target = checkpoints_dir() / meta.file_name
    try:
        torch.hub.load_state_dict_from_url(meta.url, progress=False, map_location="cpu", weights_only=True)
    except Exception as err:  # URLError, HTTPError, timeouts, SSL: all mean "not here and not reachable"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise WeightsError(
            f"pretrained weights for {meta.name} are not cached and could not be downloaded ({reason}): "
            f"place {meta.file_name} (from {meta.url}) at {target}"
        ) from None
    return target


def weights_file(name: str, pretrained: bool, weights: str | None) -> Path | None:
    """The file to load for a model: `weights` when given, torchvision's cached (or downloaded) file when
    `pretrained`, else None. Raises WeightsError for a missing local file or unreachable pretrained weights."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"model.weights: {path} is not a file")
        return path
    if not pretrained:
        return None
    return cached_weights(name) or _download(weights_meta(name))


def read_state_dict(path: Path) -> dict:
    """A state dict from a weights file (weights_only=True): a plain state dict, or one under "state_dict" /
    "model" (a Lightning or training checkpoint; a "model." prefix is dropped). Raises WeightsError."""
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise WeightsError(f"model.weights: {path} is not a weights file torch can load safely ({reason})") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"model.weights: {path} holds no state dict (name -> tensor)")
    if loaded and all(k.startswith("model.") for k in loaded):
        loaded = {k[len("model.") :]: v for k, v in loaded.items()}
    return loaded


def head_prefixes(model) -> list[str]:
    """Module names of a network's classifier head(s): what fine-tuning replaces and trains from the start."""
    from torch import nn

    for name in ("heads", "fc", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return [name]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1:]


def is_head(name: str, prefixes: list[str]) -> bool:
    """Whether parameter/buffer `name` belongs to one of the head modules."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _target_key(key: str, target: dict) -> str | None:
    if key in target:
        return key
    matches = [t for t in target if t.endswith("." + key)]  # e.g. a multi-task wrapper's "backbone." prefix
    return matches[0] if len(matches) == 1 else None


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def load_backbone(model, name: str, state: dict, source: str) -> dict[str, int]:
    """Copy `state` (a torchvision `name` state dict) into `model`'s backbone; the head keeps its new weights.

    A first conv built for 1 channel gets the RGB filters averaged. Raises WeightsError (one line, naming the
    layers) when the file is for another architecture. Returns {"loaded": n, "skipped_head": m}."""
    import torch

    reference = _reference_model(name)
    ref_state = reference.state_dict()
    ref_heads = head_prefixes(reference)
    problems = _mismatches(state, ref_state, ref_heads)
    if problems:
        raise WeightsError(f"{source} does not fit {name}: {problems}")
    target = model.state_dict()
    heads = head_prefixes(model)
    loaded = skipped = 0
    with torch.no_grad():
        for key, value in state.items():
            where = _target_key(key, target)
            if is_head(key, ref_heads) or where is None or is_head(where, heads):
                skipped += 1
                continue
            tensor = target[where]
            if value.shape != tensor.shape and value.dim() == 4 and tensor.shape[1] == 1:
                value = value.mean(dim=1, keepdim=True)  # RGB filters averaged for a grey first conv
            if value.shape != tensor.shape:
                raise WeightsError(
                    f"{source} does not fit {name}: {key} is {_shape(value)}, the model has {_shape(tensor)}"
                )
            tensor.copy_(value)
            loaded += 1
    return {"loaded": loaded, "skipped_head": skipped}


def _reference_model(name: str):
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def _mismatches(state: dict, reference: dict, heads: list[str]) -> str:
    """'' when `state` has the reference's layers and shapes (the head may have any number of classes), else a
    short description naming the first layers that differ."""
    missing = [k for k in reference if k not in state and not is_head(k, heads)]
    unexpected = [k for k in state if k not in reference]
    wrong = [
        f"{k} is {_shape(state[k])} in the file but {_shape(reference[k])} in the model"
        for k in reference
        if k in state and state[k].shape != reference[k].shape and not is_head(k, heads)
    ]
    parts = wrong[:2]
    if missing:
        parts.append(f"{len(missing)} layer(s) missing from the file (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} layer(s) the model does not have (e.g. {unexpected[0]})")
    return "; ".join(parts)


def apply_weights(model, name: str, pretrained: bool, weights: str | None) -> None:
    """Load the weights `pretrained` / `weights` ask for into a built model's backbone (no-op when neither)."""
    path = weights_file(name, pretrained, weights)
    if path is None:
        return
    from components.config import TORCHVISION_MODELS

    if name not in TORCHVISION_MODELS:
        raise WeightsError(
            f"model.weights: {name} is not a torchvision model; use one of {', '.join(TORCHVISION_MODELS)}"
        )
    counts = load_backbone(model, name, read_state_dict(path), str(path))
    print(
        f"[visionflow] weights: {counts['loaded']} tensors from {path} ({counts['skipped_head']} head tensors left new)"
    )


def check_weights(name: str, pretrained: bool, weights: str | None) -> Path | None:
    """Before training: the weights file the params ask for exists (downloaded into the cache when missing and
    online) and fits architecture `name`. Returns its path (None when no weights are asked for); raises
    WeightsError (one line) otherwise."""
    path = weights_file(name, pretrained, weights)
    if path is None:
        return None
    from components.config import TORCHVISION_MODELS

    if name not in TORCHVISION_MODELS:
        raise WeightsError(
            f"model.weights: {name} is not a torchvision model; use one of {', '.join(TORCHVISION_MODELS)}"
        )
    reference = _reference_model(name)
    problems = _mismatches(read_state_dict(path), reference.state_dict(), head_prefixes(reference))
    if problems:
        raise WeightsError(f"{path} does not fit {name}: {problems}")
    return path


def param_groups(model, lr: float, backbone_lr_mult: float = 1.0) -> list[dict]:
    """Optimizer parameter groups: the backbone at lr x backbone_lr_mult, the head at lr (one group at 1.0)."""
    params = list(model.named_parameters())
    if backbone_lr_mult == 1.0:
        return [{"params": [p for _, p in params], "lr": lr}]
    heads = head_prefixes(model)
    head = [p for n, p in params if is_head(n, heads)]
    backbone = [p for n, p in params if not is_head(n, heads)]
    return [g for g in ({"params": backbone, "lr": lr * backbone_lr_mult}, {"params": head, "lr": lr}) if g["params"]]
