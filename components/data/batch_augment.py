"""The Albumentations train transform of `augment.py`, applied to whole uint8 batches with tensor operations on the
training device (the in-memory path: `components/data/in_memory.py`).

Albumentations stays the definition: each step draws its parameters per image from the same distributions as the
Albumentations step the same params build (`build_train_transform`), in the same order:

- RandomResizedCrop: 10 tries of (area fraction in [crop_scale_min, 1], log aspect ratio in [log 3/4, log 4/3]),
  rounded integer sides, the first try that fits, else Albumentations' central fallback; integer offsets drawn as
  Albumentations draws them. The crop is resized with bilinear sampling at half-pixel centres and replicated borders,
  which is what cv2's INTER_LINEAR resize computes. With crop_scale_min 1 it is the plain Resize.
- HorizontalFlip / VerticalFlip (folded into the crop's sampling grid: an exact mirror).
- Rotate: an angle in [-rotate_limit, rotate_limit] about the image centre, bilinear, zeros outside (cv2's constant
  border, fill 0).
- ColorJitter: brightness, contrast (blend with the mean of the grey image), saturation (blend with the grey image)
  and hue (kornia's adjust_hue) with Albumentations' factors (`augment._JITTER`), each clipped to [0, 255]; the four
  steps run in a random order drawn per batch (Albumentations draws it per image: each image still sees a uniformly
  random order). Grey images get brightness and contrast only, as in Albumentations.
- GaussianBlur: kernel side 3 or 5 (Albumentations' randint(3, 5) with 4 rounded up), sigma in [0.1, 1.5],
  reflect-101 borders.
- CoarseDropout: 1-3 holes of 10-25% of each side, filled with 0.
- Normalize: (x - mean·255) · 1/(std·255) in float32, as the DataModule's `normalize_batch`.

Pixels stay float32 between steps (Albumentations rounds to uint8 after each); the difference is below a grey level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.config import AugmentParams

_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range (the one augment.py uses)
_GREY = (0.299, 0.587, 0.114)  # cv2's RGB2GRAY weights


def _grid(theta: torch.Tensor, side: int) -> torch.Tensor:
    """F.affine_grid(theta, (N, C, side, side), align_corners=False) by broadcasting (the batched matrix product of
    affine_grid is several times slower on CPUs for small images)."""
    base = (torch.arange(side, device=theta.device, dtype=torch.float32) * 2 + 1) / side - 1
    bx, by = base.view(1, 1, side), base.view(1, side, 1)
    t = theta.view(-1, 6, 1, 1)
    gx = t[:, 0] * bx + t[:, 1] * by + t[:, 2]
    gy = t[:, 3] * bx + t[:, 4] * by + t[:, 5]
    return torch.stack((gx, gy), dim=-1)


def _uniform(low, high, shape, g: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, device=device)


def crop_boxes(
    n: int, height: int, width: int, scale_min: float, g: torch.Generator, device
) -> tuple[torch.Tensor, ...]:
    """(x0, y0, w, h) integer crop boxes, one per image, drawn as Albumentations' RandomResizedCrop draws them."""
    area = height * width
    tries = 10
    target = _uniform(scale_min * area, area, (n, tries), g, device)
    log_ratio = _uniform(math.log(_RATIO[0]), math.log(_RATIO[1]), (n, tries), g, device)
    ratio = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # index of the first fitting try (0 if none)
    found = fits.any(dim=1)
    w = torch.gather(w, 1, first).squeeze(1)
    h = torch.gather(h, 1, first).squeeze(1)
    # Albumentations' fallback: the central crop of the image clamped to the ratio range.
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        fw, fh = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        fw, fh = round(height * _RATIO[1]), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    starts = torch.rand((n, 2), generator=g, device=device)
    x0 = torch.floor((width - w + 1) * starts[:, 1])
    y0 = torch.floor((height - h + 1) * starts[:, 0])
    x0 = torch.where(found, x0, torch.full_like(x0, (width - fw) // 2))
    y0 = torch.where(found, y0, torch.full_like(y0, (height - fh) // 2))
    return x0, y0, w, h


def _crop_flip_resize(images: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    """uint8 (N, C, H, W) → float32 (N, C, s, s): crop (or whole image), resize, flips, as one bilinear sampling."""
    n, _, height, width = images.shape
    s, device = params.image_size, images.device
    if params.crop_scale_min < 1.0:
        x0, y0, w, h = crop_boxes(n, height, width, params.crop_scale_min, g, device)
    else:
        x0 = y0 = torch.zeros(n, device=device)
        w, h = torch.full((n,), float(width), device=device), torch.full((n,), float(height), device=device)
    sx, sy = w / width, h / height
    tx, ty = (2 * x0 + w) / width - 1, (2 * y0 + h) / height - 1
    if params.hflip_p > 0:
        sx = torch.where(torch.rand(n, generator=g, device=device) < params.hflip_p, -sx, sx)
    if params.vflip_p > 0:
        sy = torch.where(torch.rand(n, generator=g, device=device) < params.vflip_p, -sy, sy)
    theta = torch.zeros((n, 2, 3), device=device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    x = images.float()
    identity = height == s and width == s and params.crop_scale_min >= 1.0 and not params.hflip_p and not params.vflip_p
    if identity:
        return x
    grid = _grid(theta, s)
    # cv2 resizes the cropped array: samples beyond the crop's edge pixels take the edge pixels (not their neighbours)
    low = torch.stack(((2 * x0 + 1) / width - 1, (2 * y0 + 1) / height - 1), dim=-1).view(n, 1, 1, 2)
    high = torch.stack(((2 * (x0 + w) - 1) / width - 1, (2 * (y0 + h) - 1) / height - 1), dim=-1).view(n, 1, 1, 2)
    grid = torch.maximum(torch.minimum(grid, high), low)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rotate(x: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    chosen = (torch.rand(n, generator=g, device=x.device) < params.rotate_p).nonzero().squeeze(1)
    angles = _uniform(-params.rotate_limit, params.rotate_limit, (n,), g, x.device)[chosen]
    if chosen.numel() == 0:
        return x
    rad = torch.deg2rad(angles)
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.zeros((chosen.numel(), 2, 3), device=x.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    part = x[chosen]
    grid = _grid(theta, part.shape[-1])
    x[chosen] = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_GREY, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _jitter(x: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    from kornia.enhance import adjust_hue

    from components.data.augment import _JITTER

    n, channels = x.shape[0], x.shape[1]
    chosen = (torch.rand(n, generator=g, device=x.device) < params.color_jitter_p).nonzero().squeeze(1)
    factors = {
        name: _uniform(1 - _JITTER[name], 1 + _JITTER[name], (n,), g, x.device)[chosen].view(-1, 1, 1, 1)
        for name in ("brightness", "contrast", "saturation")
    }
    hue = _uniform(-_JITTER["hue"], _JITTER["hue"], (n,), g, x.device)[chosen]
    order = torch.randperm(4, generator=g, device=x.device).tolist()
    if chosen.numel() == 0:
        return x
    part = x[chosen]
    for step in order:
        if step == 0:
            part = part * factors["brightness"]
        elif step == 1:
            mean = _grey(part).mean(dim=(1, 2, 3), keepdim=True)
            part = part * factors["contrast"] + mean * (1 - factors["contrast"])
        elif step == 2 and channels == 3:
            part = part * factors["saturation"] + _grey(part) * (1 - factors["saturation"])
        elif step == 3 and channels == 3:
            part = adjust_hue(part / 255.0, hue * 2 * math.pi) * 255.0
        part = part.clamp_(0, 255)
    x[chosen] = part
    return x


def _blur(x: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    n, channels, height, width = x.shape
    chosen = (torch.rand(n, generator=g, device=x.device) < params.blur_p).nonzero().squeeze(1)
    sigma = _uniform(0.1, 1.5, (n,), g, x.device)[chosen]
    side = torch.randint(3, 6, (n,), generator=g, device=x.device)[chosen]  # 4 becomes 5, as in Albumentations
    if chosen.numel() == 0:
        return x
    taps = torch.arange(-2, 3, device=x.device, dtype=torch.float32).view(1, 5)
    kernel = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    kernel = torch.where((side == 3).view(-1, 1) & (taps.abs() > 1), torch.zeros_like(kernel), kernel)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (k·C, 5)
    part = x[chosen].reshape(1, -1, height, width)
    groups = part.shape[1]
    part = F.conv2d(F.pad(part, (2, 2, 0, 0), mode="reflect"), kernel.view(groups, 1, 1, 5), groups=groups)
    part = F.conv2d(F.pad(part, (0, 0, 2, 2), mode="reflect"), kernel.view(groups, 1, 5, 1), groups=groups)
    x[chosen] = part.view(-1, channels, height, width)
    return x


def _dropout(x: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    n, _, height, width = x.shape
    device = x.device
    chosen = torch.rand(n, generator=g, device=device) < params.coarse_dropout_p
    holes = torch.randint(1, 4, (n, 1), generator=g, device=device)
    active = (torch.arange(3, device=device).view(1, 3) < holes) & chosen.view(n, 1)
    hh = torch.floor(height * _uniform(0.1, 0.25, (n, 3), g, device))
    hw = torch.floor(width * _uniform(0.1, 0.25, (n, 3), g, device))
    y0 = torch.floor((height - hh + 1) * torch.rand((n, 3), generator=g, device=device))
    x0 = torch.floor((width - hw + 1) * torch.rand((n, 3), generator=g, device=device))
    ys = torch.arange(height, device=device).view(1, 1, height, 1)
    xs = torch.arange(width, device=device).view(1, 1, 1, width)
    inside = (
        (ys >= y0.view(n, 3, 1, 1))
        & (ys < (y0 + hh).view(n, 3, 1, 1))
        & (xs >= x0.view(n, 3, 1, 1))
        & (xs < (x0 + hw).view(n, 3, 1, 1))
        & active.view(n, 3, 1, 1)
    )
    return x.masked_fill_(inside.any(dim=1, keepdim=True), 0.0)


class BatchAugment:
    """The train transform of `params` on whole batches: `augment(images, generator)` takes uint8 (N, C, H, W)
    images at any size on any device and returns the normalised float32 (N, C, image_size, image_size) batch."""

    def __init__(self, params: AugmentParams):
        self.params = params
        self.mean = [float(m) for m in params.mean]
        self.std = [float(s) for s in params.std]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p = self.params
        x = _crop_flip_resize(images, p, generator)
        if p.rotate_p > 0 and p.rotate_limit > 0:
            x = _rotate(x, p, generator)
        if p.color_jitter_p > 0:
            x = _jitter(x, p, generator)
        if p.blur_p > 0:
            x = _blur(x, p, generator)
        if p.coarse_dropout_p > 0:
            x = _dropout(x, p, generator)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """float32 pixels in [0, 255] → (x - mean·255) · 1/(std·255), the float32 arithmetic of `normalize_batch`."""
        import numpy as np

        mean, std = (np.asarray(v, dtype=np.float32) for v in (self.mean, self.std))
        shift = torch.from_numpy(mean * np.float32(255.0)).to(x.device).view(1, -1, 1, 1)
        scale = torch.from_numpy(np.reciprocal(std * np.float32(255.0))).to(x.device).view(1, -1, 1, 1)
        return x.sub_(shift).mul_(scale).contiguous()
