"""Albumentations 2.0 pipelines: the random train transform, the deterministic eval transform,
their JSON serialization, a plain description of the eval preprocessing for other runtimes,
and a preview grid of augmented samples.

Images arrive as HxWxC uint8 numpy arrays (C = 1 or 3; a 2-D HxW array is treated as C = 1).
With `normalize=True` a transform returns a float32 CxHxW torch tensor.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from components.config import AugmentParams, PipelineParams

# Albumentations' default ColorJitter ranges (hue +-0.5) are far too strong for classification
# data; these are the moderate ranges commonly used with torchvision's ColorJitter.
_JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05}

# cv2.INTER_LINEAR is albumentations' default for Resize / RandomResizedCrop / Rotate.
_INTERPOLATION = cv2.INTER_LINEAR


def _normalize_steps(params: AugmentParams) -> list[A.BasicTransform]:
    return [
        A.Normalize(mean=tuple(params.mean), std=tuple(params.std), max_pixel_value=255.0),
        ToTensorV2(),
    ]


def build_train_transform(params: AugmentParams, normalize: bool = True, seed: int | None = None) -> A.Compose:
    """Build the random training transform.

    Takes the augmentation parameters; `normalize` appends Normalize(mean, std, /255) and
    ToTensorV2 (leave it False for previews); `seed` seeds the Compose's own random generators
    (albumentations 2.0 does not use numpy's/Python's global state). A seeded Compose copied
    into several DataLoader workers repeats the same sequence in each, so reseed it per worker
    (`transform.set_random_seed(base + worker_id)`) when using workers.

    Steps, each left out when its probability is 0: RandomResizedCrop to image_size (a plain
    Resize when crop_scale_min is 1.0), HorizontalFlip, VerticalFlip, Rotate (constant 0
    border), ColorJitter, GaussianBlur, CoarseDropout (1-3 holes of 10-25% of each side). On 1-channel
    images albumentations' ColorJitter applies only brightness and contrast (saturation and hue are
    no-ops on grayscale), so it is safe there.

    Returns an A.Compose; its output "image" is a float32 CxHxW tensor when normalize is True,
    otherwise an HxWxC uint8 array.
    """
    s = params.image_size
    steps: list[A.BasicTransform] = []
    if params.crop_scale_min < 1.0:
        steps.append(A.RandomResizedCrop(size=(s, s), scale=(params.crop_scale_min, 1.0), interpolation=_INTERPOLATION))
    else:
        steps.append(A.Resize(height=s, width=s, interpolation=_INTERPOLATION))
    if params.hflip_p > 0:
        steps.append(A.HorizontalFlip(p=params.hflip_p))
    if params.vflip_p > 0:
        steps.append(A.VerticalFlip(p=params.vflip_p))
    if params.rotate_p > 0 and params.rotate_limit > 0:
        steps.append(
            A.Rotate(
                limit=params.rotate_limit,
                interpolation=_INTERPOLATION,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=params.rotate_p,
            )
        )
    if params.color_jitter_p > 0:
        steps.append(A.ColorJitter(**_JITTER, p=params.color_jitter_p))
    if params.blur_p > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 1.5), p=params.blur_p))
    if params.coarse_dropout_p > 0:
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, 3),
                hole_height_range=(0.1, 0.25),
                hole_width_range=(0.1, 0.25),
                fill=0,
                p=params.coarse_dropout_p,
            )
        )
    if normalize:
        steps.extend(_normalize_steps(params))
    return A.Compose(steps, seed=seed)


def _eval_sizes(params: AugmentParams) -> tuple[int, int]:
    """(resize side, crop side) of the eval transform."""
    s = params.image_size
    return round(s * params.eval_resize_ratio), s


def eval_resize_side(params: AugmentParams) -> int:
    """The square side the eval transform resizes to first (round(image_size * eval_resize_ratio)).

    The decoded-image cache stores images at this side, so the eval transform's Resize is a no-op on them."""
    return _eval_sizes(params)[0]


def build_resize(side: int, width: int | None = None) -> A.Resize:
    """The Resize (bilinear, albumentations' default) the eval transform and the image cache share: to side×side, or
    to side (height) × width when a width is given."""
    return A.Resize(height=side, width=side if width is None else width, interpolation=_INTERPOLATION)


def build_eval_transform(params: AugmentParams, normalize: bool = True) -> A.Compose:
    """Build the deterministic eval transform.

    Takes the augmentation parameters: Resize to round(image_size * eval_resize_ratio) square,
    then CenterCrop image_size (only the Resize when the ratio gives image_size itself), then
    with `normalize` Normalize(mean, std, /255) and ToTensorV2.

    Returns an A.Compose; its output "image" is a float32 CxHxW tensor when normalize is True,
    otherwise an HxWxC uint8 array.
    """
    resize, crop = _eval_sizes(params)
    steps: list[A.BasicTransform] = [build_resize(resize)]
    if resize != crop:
        steps.append(A.CenterCrop(height=crop, width=crop))
    if normalize:
        steps.extend(_normalize_steps(params))
    return A.Compose(steps)


def save_transforms(train: A.Compose, eval: A.Compose, path: Path) -> None:  # noqa: A002 (name from the contract)
    """Write both transforms as JSON {"train": A.to_dict(train), "eval": A.to_dict(eval)} to `path`.

    Takes the two Compose pipelines and the output file (parent folders are created).
    Returns None. Compose seeds are not part of albumentations' serialization.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": A.to_dict(train), "eval": A.to_dict(eval)}, indent=2))


def load_transform(path: Path, which: str) -> A.Compose:
    """Read one transform ("train" or "eval") back from a file written by save_transforms.

    Returns the A.Compose rebuilt with A.from_dict; raises ValueError for another `which`
    or a file that lacks it.
    """
    if which not in ("train", "eval"):
        raise ValueError(f"which must be 'train' or 'eval', not {which!r}")
    data = json.loads(Path(path).read_text())
    if which not in data:
        raise ValueError(f"{path} holds no {which!r} transform")
    transform = A.from_dict(data[which])
    if not isinstance(transform, A.Compose):
        raise ValueError(f"{path}: {which!r} is not an albumentations Compose")
    return transform


def eval_preprocess_spec(params: AugmentParams, channels: int) -> dict[str, Any]:
    """Describe the eval transform as a plain dict for other runtimes (ONNX bundle, server).

    Takes the augmentation parameters and the number of channels (1 or 3). Returns
    {"image_size", "resize": [h, w], "crop": [h, w], "interpolation": "bilinear", "mean", "std",
    "channels", "layout": "NCHW", "dtype": "float32", "max_pixel_value": 255}: resize the
    HxWxC uint8 image to `resize` (bilinear), center-crop `crop` (a no-op when equal to
    `resize`), then x = (pixel / max_pixel_value - mean) / std per channel, laid out CxHxW.
    Raises ValueError when mean/std do not have one value per channel.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    for name in ("mean", "std"):
        if len(getattr(params, name)) != channels:
            raise ValueError(f"augment.{name} has {len(getattr(params, name))} values but channels is {channels}")
    resize, crop = _eval_sizes(params)
    return {
        "image_size": params.image_size,
        "resize": [resize, resize],
        "crop": [crop, crop],
        "interpolation": "bilinear",
        "mean": [float(m) for m in params.mean],
        "std": [float(v) for v in params.std],
        "channels": channels,
        "layout": "NCHW",
        "dtype": "float32",
        "max_pixel_value": 255,
    }


def _displayable(image: Any) -> np.ndarray:
    """An HxW or HxWx3 array in [0, 1] for imshow, from a transform's output."""
    if hasattr(image, "detach"):  # a CxHxW tensor from a normalizing transform
        image = image.detach().cpu().numpy().transpose(1, 2, 0)
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    else:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return np.clip(arr, 0.0, 1.0)


def preview_grid(
    images: list[np.ndarray],
    transform: A.Compose,
    out_path: Path,
    columns: int = 4,
    seed: int = 0,
) -> Path:
    """Draw a PNG grid: one row per source image, the original (resized to the transform's
    output size) in the first column and `columns - 1` augmented samples after it.

    Takes HxWxC uint8 images, a transform (best built with normalize=False; a normalizing one
    is min-max rescaled for display), the PNG path, the number of columns (>= 2) and a seed.
    The transform is deep-copied and the copy seeded, so the grid is the same for the same
    seed and the caller's transform is left untouched. Returns out_path.
    """
    from matplotlib.figure import Figure  # Agg rendering through Figure.savefig; no pyplot state

    if not images:
        raise ValueError("preview_grid needs at least one image")
    if columns < 2:
        raise ValueError("columns must be at least 2 (the original and one augmented sample)")
    seeded = copy.deepcopy(transform)
    seeded.set_random_seed(seed)

    rows: list[list[np.ndarray]] = []
    for image in images:
        samples = [_displayable(seeded(image=image)["image"]) for _ in range(columns - 1)]
        h, w = samples[0].shape[:2]
        original = A.Resize(height=h, width=w, interpolation=_INTERPOLATION)(image=image)["image"]
        rows.append([_displayable(original), *samples])

    cell = 1.6
    fig = Figure(figsize=(cell * columns, cell * len(rows) + 0.3), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, row in enumerate(rows):
        for c, arr in enumerate(row):
            ax = axes[r][c]
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=100)
    return out_path


def write_preview(params: PipelineParams, manifest_path: str, out_dir: str) -> list[str]:
    """The augment stage's files in `out_dir`: transforms.json (the train and eval transforms, Albumentations
    to_dict) and, with augment.preview_images, augmentation_preview.png: an even sample of the clean manifest's
    train split, each image beside augmented copies (seeded with train.seed). Returns the paths, the JSON first."""
    from components.data.images import load_image
    from components.data.ingest import read_manifest
    from components.data.manifest import rows_of_split

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transforms_path = out / "transforms.json"
    save_transforms(build_train_transform(params.augment), build_eval_transform(params.augment), transforms_path)
    paths = [str(transforms_path)]
    count = params.augment.preview_images
    if count:
        rows = rows_of_split(read_manifest(manifest_path), "train")
        sample = rows[:: max(1, len(rows) // count)][: count // 4 or 1]
        images = [load_image(row["path"], params.data.channels, params.data.max_pixels) for row in sample]
        transform = build_train_transform(params.augment, normalize=False)
        paths.append(str(preview_grid(images, transform, out / "augmentation_preview.png", seed=params.train.seed)))
    return paths
