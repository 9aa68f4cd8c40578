"""The batched train transform (in-memory path) draws from the same distributions as the Albumentations one: crop
areas, flips, rotation angles and pixel statistics of augmented batches from both paths, compared on the same
source images (tolerances measured at 2,000 samples; a wrong range, probability or sampling rule misses them), and
on images smaller than the input size (the 8×8 digits brought up to 32) pixel by pixel: the batch without random
steps is the eval transform's output, and each output pixel's mean and spread match Albumentations'."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from components.config import AugmentParams
from components.data.augment import build_eval_transform, build_train_transform
from components.data.batch_augment import BatchAugment

pytestmark = pytest.mark.filterwarnings("error::UserWarning")

H, W, S, N = 40, 48, 32, 4000


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors gain nothing from threads, and on a loaded machine OpenMP's waiting threads slow them tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


QUIET = dict(image_size=S, crop_scale_min=1.0, rotate_p=0.0, hflip_p=0.0, vflip_p=0.0)


def _coordinates() -> np.ndarray:
    """An asymmetric H×W RGB image whose red channel encodes x and green channel y (0..255), blue constant."""
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = np.round(np.arange(W) * 255 / (W - 1))[None, :]
    image[..., 1] = np.round(np.arange(H) * 255 / (H - 1))[:, None]
    image[..., 2] = 128
    return image


def _natural(channels: int) -> np.ndarray:
    """A smooth random colour (or grey) image with pixel values in 20..235."""
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    image = cv2.normalize(cv2.GaussianBlur(noise, (7, 7), 3), None, 20, 235, cv2.NORM_MINMAX)
    return image if channels == 3 else image[..., :1].copy()


def _both(params: AugmentParams, image: np.ndarray, n: int = N, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """n augmented copies of `image` (float32 N×S×S×C pixel values) by Albumentations, one image at a time, and by
    BatchAugment in training-sized batches."""
    transform = build_train_transform(params, normalize=False, seed=3)
    albumentations = np.stack([transform(image=image)["image"].reshape(S, S, -1) for _ in range(n)])
    channels = image.shape[2]
    identity = params.model_copy(update={"mean": [0.0] * channels, "std": [1 / 255] * channels})
    augment, generator = BatchAugment(identity), torch.Generator().manual_seed(3)
    source = torch.from_numpy(image).permute(2, 0, 1)[None]
    ours = [augment(source.expand(batch, -1, -1, -1).contiguous(), generator) for _ in range(n // batch + 1)]
    return albumentations.astype(np.float32), torch.cat(ours)[:n].permute(0, 2, 3, 1).numpy()


def _side(span: np.ndarray) -> np.ndarray:
    """A crop's integer side from the source distance between the first and last output pixel centres: side·(S-1)/S
    for a crop at least S wide, side - 1 for a smaller one (resizing up, the outer centres take the edge pixels).
    Rounded: Albumentations rounds pixels to uint8, and its areas would otherwise be jittered copies of the same
    discrete values."""
    return np.round(np.where(span < S - 1, span + 1, span * S / (S - 1)))


def _crop_area_and_flips(out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: the crop's area fraction (from the coordinate channels' span) and whether it is flipped
    horizontally / vertically (coordinates decreasing)."""
    dx = out[:, :, -1, 0].mean(1) - out[:, :, 0, 0].mean(1)
    dy = out[:, -1, :, 1].mean(1) - out[:, 0, :, 1].mean(1)
    width, height = _side(np.abs(dx) / 255 * (W - 1)), _side(np.abs(dy) / 255 * (H - 1))
    return width * height / (W * H), dx < 0, dy < 0


def _angles(out: np.ndarray) -> np.ndarray:
    """Per image: the rotation (degrees) of the x-coordinate gradient in the central 16×16 (never filled)."""
    centre = out[:, 8:24, 8:24, 0]
    u = np.arange(16) - 7.5
    gx = (centre * u[None, None, :]).sum((1, 2))
    gy = (centre * u[None, :, None]).sum((1, 2))
    return np.degrees(np.arctan2(gy, gx))


def test_crop_areas_and_flips_follow_albumentations():
    params = AugmentParams(**{**QUIET, "crop_scale_min": 0.3, "hflip_p": 0.5, "vflip_p": 0.25})
    (area_a, h_a, v_a), (area_b, h_b, v_b) = (_crop_area_and_flips(o) for o in _both(params, _coordinates()))
    assert abs(h_a.mean() - h_b.mean()) < 0.04 and abs(h_b.mean() - 0.5) < 0.04
    assert abs(v_a.mean() - v_b.mean()) < 0.04 and abs(v_b.mean() - 0.25) < 0.04
    assert abs(area_a.mean() - area_b.mean()) < 0.015 and abs(area_a.std() - area_b.std()) < 0.015
    assert ks_2samp(area_a, area_b).statistic < 0.05
    assert area_b.min() > 0.3 * 0.95 and area_b.max() <= 1.0 + 1e-3


def test_rotation_angles_follow_albumentations():
    params = AugmentParams(**{**QUIET, "rotate_p": 0.6, "rotate_limit": 30.0})
    a, b = (_angles(o) for o in _both(params, _coordinates()))
    rotated_a, rotated_b = np.abs(a) > 0.5, np.abs(b) > 0.5
    assert abs(rotated_a.mean() - rotated_b.mean()) < 0.04 and abs(rotated_b.mean() - 0.6) < 0.04
    assert abs(a[rotated_a].std() - b[rotated_b].std()) < 1.0  # uniform on ±30°: 17.3°
    assert np.abs(b).max() < 31.0 and ks_2samp(a, b).statistic < 0.05


@pytest.mark.parametrize(
    ("channels", "steps"),
    [
        (3, {"color_jitter_p": 0.8}),
        (1, {"color_jitter_p": 0.8}),
        (3, {"blur_p": 0.7}),
        (3, {"coarse_dropout_p": 0.7}),
        (3, {"crop_scale_min": 0.5, "rotate_p": 0.5, "hflip_p": 0.5, "color_jitter_p": 0.5, "blur_p": 0.3,
             "coarse_dropout_p": 0.3}),
    ],
)  # fmt: skip
def test_pixel_statistics_follow_albumentations(channels, steps):
    """Per channel: the mean and spread of the images' mean pixel values, of their standard deviations and of their
    sharpness (mean absolute difference of neighbouring pixels)."""
    params = AugmentParams(**{**QUIET, **steps, "mean": [0.5] * channels, "std": [0.5] * channels})
    a, b = _both(params, _natural(channels), n=2000)
    means_a, means_b = a.mean((1, 2)), b.mean((1, 2))
    stds_a, stds_b = a.std((1, 2)), b.std((1, 2))
    assert np.abs(means_a.mean(0) - means_b.mean(0)).max() < 1.5  # grey levels (Albumentations rounds each step)
    assert np.abs(stds_a.mean(0) - stds_b.mean(0)).max() < 0.03 * stds_a.mean()
    assert np.abs(means_a.std(0) - means_b.std(0)).max() < 0.08 * means_a.std(0).max() + 0.2
    assert np.abs(stds_a.std(0) - stds_b.std(0)).max() < 0.08 * stds_a.std(0).max() + 0.2
    edges_a, edges_b = (np.abs(np.diff(o, axis=2)).mean((1, 2)) for o in (a, b))  # sharpness: blur, resampling
    assert np.abs(edges_a.mean(0) - edges_b.mean(0)).max() < 0.03 * edges_a.mean()
    assert np.abs(edges_a.std(0) - edges_b.std(0)).max() < 0.08 * edges_a.std(0).max() + 0.05


def test_output_is_normalised_float_batch_on_the_input_device():
    params = AugmentParams(image_size=16, mean=[0.5], std=[0.25], rotate_p=0.0, crop_scale_min=1.0)
    images = torch.full((4, 1, 16, 16), 255, dtype=torch.uint8)
    out = BatchAugment(params)(images, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (4, 1, 16, 16)
    assert torch.allclose(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25


def _digits(n: int) -> np.ndarray:
    """The first n of scikit-learn's 8×8 digits as the bundled data set stores them: N×8×8×1 uint8."""
    from sklearn.datasets import load_digits

    return np.rint(load_digits().images[:n] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]


def test_small_images_without_random_steps_are_the_eval_transform_pixels():
    """8×8 images brought up to 32 (the default job): with every random step off, the batch is the eval transform's
    output (what validation and test see) within one grey level (cv2 rounds to uint8, the batch stays float)."""
    params = AugmentParams(**{**QUIET, "mean": [0.5], "std": [0.5]})
    images = _digits(64)
    eval_transform = build_eval_transform(params)
    expected = torch.stack([eval_transform(image=image)["image"] for image in images])
    source = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    out = BatchAugment(params)(source, torch.Generator().manual_seed(0))
    assert out.shape == expected.shape == (64, 1, S, S)
    assert (out - expected).abs().max().item() <= 1 / 127.5  # one grey level after (x / 255 - 0.5) / 0.5


def test_small_images_are_cropped_and_rotated_as_albumentations_does_pixel_by_pixel():
    """The default job's augmentation (crop scale 0.85-1, rotation ±10° half the time) of one 8×8 digit brought up to
    32: the mean and the spread of every output pixel over 4,000 samples match Albumentations'. A crop box, resize
    grid or rotation centre off by a fraction of a source pixel moves the strokes by a few output pixels: tens of
    grey levels; sampling noise is below 8."""
    params = AugmentParams(**{**QUIET, "crop_scale_min": 0.85, "rotate_p": 0.5, "rotate_limit": 10.0})
    a, b = _both(params, _digits(1)[0])
    assert np.abs(a.mean(0) - b.mean(0)).max() < 8 and np.abs(a.mean(0) - b.mean(0)).mean() < 1.5
    assert np.abs(a.std(0) - b.std(0)).max() < 8 and np.abs(a.std(0) - b.std(0)).mean() < 1.5
