"""Albumentations train/eval transforms, their serialization, the preprocess spec and the preview."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from components.config import AugmentParams
from components.data.augment import (
    build_eval_transform,
    build_train_transform,
    eval_preprocess_spec,
    load_transform,
    preview_grid,
    save_transforms,
)

# albumentations attributes its "argument not valid" UserWarning to the caller's module (stacklevel),
# so a module filter on albumentations.* does not catch it: make every UserWarning an error here.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

# Every random step off: what is left is a plain resize.
QUIET = dict(crop_scale_min=1.0, hflip_p=0.0, vflip_p=0.0, rotate_p=0.0, color_jitter_p=0.0)


def _image(h=32, w=32, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _names(compose):
    return [type(t).__name__ for t in compose.transforms]


def test_train_steps_follow_params():
    params = AugmentParams(crop_scale_min=0.5, hflip_p=0.5, vflip_p=0.0, rotate_p=0.3, color_jitter_p=0.2)
    assert _names(build_train_transform(params)) == [
        "RandomResizedCrop",
        "HorizontalFlip",
        "Rotate",
        "ColorJitter",
        "Normalize",
        "ToTensorV2",
    ]
    assert _names(build_train_transform(AugmentParams(**QUIET), normalize=False)) == ["Resize"]


def test_rotate_arguments_are_the_2_0_ones():
    rotate = build_train_transform(
        AugmentParams(**{**QUIET, "rotate_p": 1.0, "rotate_limit": 15}), normalize=False
    ).transforms[1]
    assert rotate.limit == (-15, 15)
    assert rotate.border_mode == cv2.BORDER_CONSTANT
    assert rotate.fill == 0


def test_hflip_gives_the_mirrored_image():
    img = _image()
    params = AugmentParams(**{**QUIET, "hflip_p": 1.0}, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    out = build_train_transform(params, normalize=False, seed=1)(image=img)["image"]
    np.testing.assert_array_equal(out, img[:, ::-1])
    tensor = build_train_transform(params, seed=1)(image=img)["image"]
    expected = torch.from_numpy((img[:, ::-1].astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(tensor, expected)


def test_vflip_gives_the_flipped_image():
    img = _image()
    params = AugmentParams(**{**QUIET, "vflip_p": 1.0}, image_size=32)
    out = build_train_transform(params, normalize=False)(image=img)["image"]
    np.testing.assert_array_equal(out, img[::-1])


def test_rotation_changes_the_image_and_fills_with_zero():
    img = np.full((32, 32, 3), 200, dtype=np.uint8)
    params = AugmentParams(**{**QUIET, "rotate_p": 1.0, "rotate_limit": 45.0}, image_size=32)
    transform = build_train_transform(params, normalize=False, seed=3)
    outs = [transform(image=img)["image"] for _ in range(5)]
    assert any(not np.array_equal(o, img) for o in outs)
    assert any((o == 0).any() for o in outs)  # corners filled with the constant 0


def test_random_resized_crop_changes_the_image():
    img = _image(48, 48)
    params = AugmentParams(**{**QUIET, "crop_scale_min": 0.3}, image_size=32)
    plain = build_train_transform(AugmentParams(**QUIET, image_size=32), normalize=False)(image=img)["image"]
    transform = build_train_transform(params, normalize=False, seed=0)
    outs = [transform(image=img)["image"] for _ in range(5)]
    assert all(o.shape == (32, 32, 3) for o in outs)
    assert any(not np.array_equal(o, plain) for o in outs)


def test_seeded_train_transform_is_reproducible():
    img = _image()
    params = AugmentParams(hflip_p=0.5, rotate_p=1.0, color_jitter_p=0.5)
    a = build_train_transform(params, seed=5)
    b = build_train_transform(params, seed=5)
    for _ in range(3):
        assert torch.equal(a(image=img)["image"], b(image=img)["image"])


@pytest.mark.parametrize("shape", [(40, 30, 1), (40, 30), (40, 30, 3)])
@pytest.mark.parametrize("ratio", [1.0, 1.15])
def test_output_shapes_and_dtypes(shape, ratio):
    channels = shape[2] if len(shape) == 3 else 1
    img = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    params = AugmentParams(
        image_size=24,
        eval_resize_ratio=ratio,
        hflip_p=0.5,
        vflip_p=0.5,
        rotate_p=1.0,
        color_jitter_p=1.0,
        mean=[0.5] * channels,
        std=[0.25] * channels,
    )
    for transform in (build_train_transform(params, seed=0), build_eval_transform(params)):
        out = transform(image=img)["image"]
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.float32
        assert tuple(out.shape) == (channels, 24, 24)
        assert torch.isfinite(out).all()


def test_color_jitter_on_grayscale_keeps_one_channel():
    img = _image(c=1)
    params = AugmentParams(**{**QUIET, "color_jitter_p": 1.0}, image_size=32)
    out = build_train_transform(params, normalize=False, seed=0)(image=img)["image"]
    assert out.shape == (32, 32, 1) and out.dtype == np.uint8


def test_eval_transform_resizes_then_center_crops():
    params = AugmentParams(image_size=20, eval_resize_ratio=1.2)
    transform = build_eval_transform(params, normalize=False)
    assert _names(transform) == ["Resize", "CenterCrop"]
    assert (transform.transforms[0].height, transform.transforms[1].height) == (24, 20)
    assert _names(build_eval_transform(AugmentParams(image_size=20))) == ["Resize", "Normalize", "ToTensorV2"]


def test_eval_is_deterministic_and_matches_its_reloaded_copy(tmp_path):
    params = AugmentParams(image_size=24, eval_resize_ratio=1.25, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
    train, evaluation = build_train_transform(params), build_eval_transform(params)
    path = tmp_path / "sub" / "transforms.json"
    save_transforms(train, evaluation, path)
    reloaded = load_transform(path, "eval")
    img = _image(37, 41)
    first = evaluation(image=img)["image"]
    assert torch.equal(first, evaluation(image=img)["image"])
    assert torch.equal(first, reloaded(image=img)["image"])
    assert _names(load_transform(path, "train")) == _names(train)
    with pytest.raises(ValueError):
        load_transform(path, "test")


def test_preprocess_spec_reproduces_the_eval_transform():
    params = AugmentParams(image_size=20, eval_resize_ratio=1.3, mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1])
    spec = eval_preprocess_spec(params, channels=3)
    assert spec == {
        "image_size": 20,
        "resize": [26, 26],
        "crop": [20, 20],
        "interpolation": "bilinear",
        "mean": [0.1, 0.2, 0.3],
        "std": [0.3, 0.2, 0.1],
        "channels": 3,
        "layout": "NCHW",
        "dtype": "float32",
        "max_pixel_value": 255,
    }
    img = _image(50, 45)
    # Another runtime following the spec with plain OpenCV/numpy.
    resized = cv2.resize(img, tuple(spec["resize"][::-1]), interpolation=cv2.INTER_LINEAR)
    top = (spec["resize"][0] - spec["crop"][0]) // 2
    left = (spec["resize"][1] - spec["crop"][1]) // 2
    crop = resized[top : top + spec["crop"][0], left : left + spec["crop"][1]]
    x = (crop.astype(np.float32) / spec["max_pixel_value"] - np.array(spec["mean"], np.float32)) / np.array(
        spec["std"], np.float32
    )
    expected = torch.from_numpy(x.transpose(2, 0, 1).copy())
    torch.testing.assert_close(build_eval_transform(params)(image=img)["image"], expected, rtol=1e-5, atol=1e-5)


def test_preprocess_spec_checks_channels():
    with pytest.raises(ValueError):
        eval_preprocess_spec(AugmentParams(), channels=1)
    assert eval_preprocess_spec(AugmentParams(mean=[0.5], std=[0.5]), channels=1)["resize"] == [32, 32]


def test_preview_grid_is_a_deterministic_png(tmp_path):
    images = [_image(40, 40, 3, seed=i) for i in range(3)] + [_image(30, 30, 1)]
    params = AugmentParams(image_size=24, rotate_p=1.0, rotate_limit=30, hflip_p=0.5)
    transform = build_train_transform(params, normalize=False)
    a = preview_grid(images, transform, tmp_path / "a.png", columns=4, seed=1)
    b = preview_grid(images, transform, tmp_path / "b.png", columns=4, seed=1)
    c = preview_grid(images, transform, tmp_path / "c.png", columns=4, seed=2)
    pixels = []
    for path in (a, b, c):
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG"
            pixels.append(np.asarray(im.convert("RGB")))
    np.testing.assert_array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_preview_grid_accepts_a_normalizing_transform(tmp_path):
    transform = build_train_transform(AugmentParams(image_size=16))
    path = preview_grid([_image()], transform, tmp_path / "p.png", columns=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0
