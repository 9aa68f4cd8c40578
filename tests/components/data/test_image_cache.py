"""The decoded-image cache: same eval pixels as decoding, built once, rebuilt when stale, safe to build twice
at once."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import AugmentParams
from components.data.augment import build_eval_transform, build_train_transform, eval_resize_side
from components.data.dataset import ImageDataModule, ManifestDataset, resolve_num_workers
from components.data.image_cache import cache_files, content_key, ensure_image_cache
from components.data.ingest import file_sha256
from components.errors import DataError, ImageDecodeError

MAX_PIXELS = 10_000_000
# Non-square, larger and smaller than the cache side, RGB, grayscale, with alpha, as JPEG and PNG.
SHAPES = [((40, 30), "RGB", "jpg"), ((64, 64), "RGB", "png"), ((12, 50), "L", "png"), ((33, 21), "RGBA", "png")]


def _rows(folder: Path, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((w, h), mode, ext) in enumerate(SHAPES * 2):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze()
        path = folder / f"img{i}.{ext}"
        Image.fromarray(pixels, mode).save(path)
        rows.append({"path": str(path), "sha256": file_sha256(path), "label": "ab"[i % 2], "split": "val"})
    return rows


def _items(dataset: ManifestDataset) -> list[torch.Tensor]:
    return [dataset[i][0] for i in range(len(dataset))]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("ratio", [1.0, 1.25])
def test_eval_pixels_are_exactly_those_of_the_uncached_path(tmp_path, channels, ratio):
    params = AugmentParams(image_size=16, eval_resize_ratio=ratio, mean=[0.5] * channels, std=[0.5] * channels)
    rows = _rows(tmp_path / "images")
    side = eval_resize_side(params)
    cache = ensure_image_cache(rows, tmp_path / "cache", side, channels, MAX_PIXELS)
    assert cache.shape == (len(rows), side, side, channels)
    transform = build_eval_transform(params)
    cached = ManifestDataset(rows, ["a", "b"], transform, channels, MAX_PIXELS, cache=cache)
    decoded = ManifestDataset(rows, ["a", "b"], transform, channels, MAX_PIXELS)
    for a, b in zip(_items(cached), _items(decoded), strict=True):
        assert a.shape == (channels, 16, 16)
        assert torch.equal(a, b)


def test_train_transform_without_crop_gives_the_same_samples(tmp_path):
    """With crop_scale_min 1 and no eval margin the train Resize is a no-op on cached images: same seed,
    same samples."""
    params = AugmentParams(image_size=16, crop_scale_min=1.0, rotate_p=1.0, hflip_p=0.5)
    rows = _rows(tmp_path / "images")
    cache = ensure_image_cache(rows, tmp_path / "cache", eval_resize_side(params), 3, MAX_PIXELS)
    cached = ManifestDataset(rows, ["a", "b"], build_train_transform(params, seed=3), 3, MAX_PIXELS, cache=cache)
    decoded = ManifestDataset(rows, ["a", "b"], build_train_transform(params, seed=3), 3, MAX_PIXELS)
    for a, b in zip(_items(cached), _items(decoded), strict=True):
        assert torch.equal(a, b)


def test_built_once_then_reused_and_other_data_gets_its_own_file(tmp_path):
    rows = _rows(tmp_path / "images")
    lines: list[str] = []
    first = ensure_image_cache(rows, tmp_path / "cache", 16, 3, MAX_PIXELS, log=lines.append)
    assert len(lines) == 1 and "building" in lines[0]
    again = ensure_image_cache(rows, tmp_path / "cache", 16, 3, MAX_PIXELS, log=lines.append)
    assert again == first and len(lines) == 1
    other = ensure_image_cache(
        _rows(tmp_path / "other", seed=1), tmp_path / "cache", 16, 3, MAX_PIXELS, log=lines.append
    )
    assert other.path != first.path and len(lines) == 2
    header = json.loads(Path(first.path).with_suffix(".json").read_text())
    assert header["key"] == content_key(rows, 16, 3) and header["shape"] == [len(rows), 16, 16, 3]
    assert not [p for p in (tmp_path / "cache" / "images").iterdir() if p.name.endswith(".tmp")]


def test_building_the_cache_leaves_the_global_random_stream_alone(tmp_path):
    """A run that builds the cache trains on the same random streams as the same seed's rerun that finds it."""
    rows = _rows(tmp_path / "images")
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    ensure_image_cache(rows, tmp_path / "cache", 16, 3, MAX_PIXELS, log=lambda line: None)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("damage", ["foreign header", "truncated data", "old version"])
def test_a_stale_cache_is_rebuilt_with_a_message(tmp_path, damage):
    rows = _rows(tmp_path / "images")
    cache = ensure_image_cache(rows, tmp_path / "cache", 16, 3, MAX_PIXELS)
    expected = np.array(cache.open())
    data_path, header_path = cache_files(tmp_path / "cache", content_key(rows, 16, 3), 16, 3)
    header = json.loads(header_path.read_text())
    if damage == "foreign header":
        header["key"] = content_key(_rows(tmp_path / "other", seed=1), 16, 3)
    elif damage == "old version":
        header["version"] = 0
    else:
        data_path.write_bytes(data_path.read_bytes()[:100])
    header_path.write_text(json.dumps(header))
    lines: list[str] = []
    rebuilt = ensure_image_cache(rows, tmp_path / "cache", 16, 3, MAX_PIXELS, log=lines.append)
    assert len(lines) == 1 and "rebuilding stale" in lines[0]
    assert np.array_equal(np.array(rebuilt.open()), expected)


def test_a_cache_dir_that_is_not_writable_is_one_clear_error(tmp_path):
    rows = _rows(tmp_path / "images")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"image cache directory .* is not writable.*data.cache=false"):
        ensure_image_cache(rows, blocker / "cache", 16, 3, MAX_PIXELS)


def test_an_undecodable_image_is_named(tmp_path):
    rows = _rows(tmp_path / "images")
    Path(rows[3]["path"]).write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match=rf"{rows[3]['path']}: not an image"):
        ensure_image_cache(rows, tmp_path / "cache", 16, 3, MAX_PIXELS, workers=1)
    assert not list((tmp_path / "cache" / "images").glob("*.u8"))


def test_concurrent_builders_leave_one_valid_cache(tmp_path):
    rows = _rows(tmp_path / "images")
    results, errors = [], []

    def build():
        try:
            results.append(ensure_image_cache(rows, tmp_path / "cache", 16, 3, MAX_PIXELS, log=lambda _: None))
        except Exception as err:  # noqa: BLE001 (collected for the assertion)
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({r.path for r in results}) == 1
    lines: list[str] = []
    ensure_image_cache(rows, tmp_path / "cache", 16, 3, MAX_PIXELS, log=lines.append)
    assert not lines  # what the builders left is valid
    assert sorted(p.suffix for p in (tmp_path / "cache" / "images").iterdir()) == [".json", ".u8"]


def test_datamodule_loaders_read_the_cache_in_workers(tmp_path):
    rows = _rows(tmp_path / "images")
    for i, row in enumerate(rows):
        row["split"] = "train" if i < 6 else "val"
    params = AugmentParams(image_size=16)
    data = ImageDataModule(
        rows,
        ["a", "b"],
        build_train_transform(params, seed=0),
        build_eval_transform(params),
        channels=3,
        max_pixels=MAX_PIXELS,
        batch_size=4,
        num_workers=1,
        cache_dir=str(tmp_path / "cache"),
        cache_side=16,
    )
    data.prepare_data()
    assert len(list((tmp_path / "cache" / "images").glob("*.u8"))) == 2  # train and val
    for path in rows:  # the loaders must not touch the source files any more
        Path(path["path"]).unlink()
    batches = list(data.train_dataloader())
    assert sum(len(y) for _, y in batches) == 6 and batches[0][0].shape == (4, 3, 16, 16)
    assert sum(len(y) for _, y in data.val_dataloader()) == 2


def test_auto_workers_leave_a_core_for_training_and_share_the_rest():
    assert resolve_num_workers(3) == 3 and resolve_num_workers(0) == 0
    cores = len(os.sched_getaffinity(0))
    assert resolve_num_workers("auto") == min(8, cores - 1)  # this process's cores, one left for training
    assert resolve_num_workers("auto", local_processes=2) == max(0, min(8, cores // 2 - 1))
    assert resolve_num_workers("auto", local_processes=64) == 0
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})  # a process pinned to one core: no worker beside the training loop
        assert resolve_num_workers("auto") == 0
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.parametrize("cache", [True, False])
def test_datamodule_val_batches_equal_the_evaluation_loader_bit_for_bit(tmp_path, cache):
    """uint8 batches normalised after loading give exactly the floats of the per-image eval transform."""
    from components.data.dataset import eval_loader

    params = AugmentParams(image_size=16, eval_resize_ratio=1.25, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    rows = _rows(tmp_path / "images")
    data = ImageDataModule(
        rows,
        ["a", "b"],
        build_train_transform(params, normalize=False),
        build_eval_transform(params, normalize=False),
        channels=3,
        max_pixels=MAX_PIXELS,
        batch_size=8,
        cache_dir=str(tmp_path / "cache") if cache else None,
        cache_side=eval_resize_side(params),
        normalize=(params.mean, params.std),
    )
    (raw,) = list(data.val_dataloader())
    assert raw[0].dtype == torch.uint8 and raw[0].shape == (8, 16, 16, 3)
    x, y = data.normalize_batch(raw)
    (expected, expected_y) = next(iter(eval_loader(rows, ["a", "b"], build_eval_transform(params), 3, MAX_PIXELS)))
    assert x.shape == expected.shape and x.is_contiguous()
    assert torch.equal(x, expected) and torch.equal(y, expected_y)


def test_lightning_normalises_uint8_batches_through_the_datamodule_hook(tmp_path):
    """The GPU path (uint8 batches, normalised after the transfer) trained on CPU: the model only ever sees floats."""
    import lightning as L

    from components.config import fill_auto, load_params
    from components.training.fit import datamodule_from_params, model_spec_from_params
    from components.training.module import ClassifierModule

    params = load_params(
        None,
        [
            "augment.image_size=16",
            "train.batch_size=4",
            "train.num_workers=0",
            f"run.cache_dir={tmp_path / 'cache'}",
            "trainer.accelerator=cpu",
        ],
    )
    params = fill_auto(params)  # no data set to plan from: the fields' own defaults
    rows = _rows(tmp_path / "images")
    for i, row in enumerate(rows):
        row["split"] = "train" if i < 6 else "val"
    data = datamodule_from_params(params, rows, ["a", "b"])
    assert data.normalize is None  # CPU training: workers normalise
    data = ImageDataModule(
        rows,
        ["a", "b"],
        build_train_transform(params.augment, normalize=False),
        build_eval_transform(params.augment, normalize=False),
        channels=3,
        max_pixels=MAX_PIXELS,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        cache_side=16,
        normalize=(params.augment.mean, params.augment.std),
    )
    seen = []

    class Recording(ClassifierModule):
        def forward(self, x):
            seen.append(x.dtype)
            return super().forward(x)

    module = Recording(
        spec=model_spec_from_params(params, 2).model_dump(),
        optim=params.train.model_dump(),
        classes=["a", "b"],
        augment=params.augment.model_dump(),
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    assert seen and set(seen) == {torch.float32}


def test_storage_size_keeps_small_images_at_their_own_size():
    from components.data.image_cache import storage_size

    assert storage_size([{"width": "8", "height": "8"}] * 2, 32) == (8, 8)  # one small size: native
    assert storage_size([{"width": "40", "height": "12"}], 32) == (12, 40)  # (height, width)
    assert storage_size([{"width": "64", "height": "48"}, {"width": "40", "height": "33"}], 32) == (32, 32)
    assert storage_size([{"width": "8", "height": "8"}, {"width": "64", "height": "48"}], 32) is None  # mixed
    assert storage_size([{"width": "", "height": ""}], 32) == (32, 32)


def _small_rows(folder: Path, size=(20, 12), n=6) -> list[dict[str, str]]:
    """n grey images of size (width, height), smaller than the cache side, with their manifest columns."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"small{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L").save(path)
        rows.append(
            {"path": str(path), "sha256": file_sha256(path), "label": "ab"[i % 2], "split": "train",
             "width": str(size[0]), "height": str(size[1])}
        )  # fmt: skip
    return rows


def test_small_images_are_cached_at_native_size_and_resized_after(tmp_path, capsys):
    """Images smaller than the input are cached as they are (not upsampled): the eval pixels and the random train
    crops (same seed) are exactly those of the decoded files."""
    params = AugmentParams(image_size=32, eval_resize_ratio=1.0, mean=[0.5], std=[0.5], rotate_p=0.5, hflip_p=0.5)
    rows = _small_rows(tmp_path / "images")
    data = ImageDataModule(
        rows, ["a", "b"], build_train_transform(params, seed=5), build_eval_transform(params), channels=1,
        max_pixels=MAX_PIXELS, batch_size=2, cache_dir=str(tmp_path / "cache"), cache_side=eval_resize_side(params),
    )  # fmt: skip
    assert data.cache_dir is not None and data.cache_size == (12, 20)
    cache = data._cache(rows)
    assert cache.shape == (6, 12, 20, 1) and cache.path.endswith("-12x20x1.u8")
    assert "12x20x1" in capsys.readouterr().out
    for transform in (build_eval_transform(params), build_train_transform(params, seed=5)):
        cached = ManifestDataset(rows, ["a", "b"], transform, 1, MAX_PIXELS, cache=cache)
        decoded = ManifestDataset(rows, ["a", "b"], copy.deepcopy(transform), 1, MAX_PIXELS)
        for a, b in zip(_items(cached), _items(decoded), strict=True):
            assert a.shape == (1, 32, 32) and torch.equal(a, b)


def test_the_data_module_turns_the_cache_off_for_mixed_sizes_with_small_images(tmp_path, capsys):
    rows = [{"path": "a.png", "label": "a", "split": "train", "width": "8", "height": "8"}]
    mixed = ImageDataModule(
        [*rows, {**rows[0], "width": "64", "height": "64"}], ["a"], None, None, channels=1, max_pixels=10**6,
        batch_size=1, cache_dir=str(tmp_path), cache_side=32,
    )  # fmt: skip
    assert mixed.cache_dir is None and "image cache off" in capsys.readouterr().out
    small = ImageDataModule(
        rows, ["a"], None, None, channels=1, max_pixels=10**6, batch_size=1, cache_dir=str(tmp_path), cache_side=32
    )
    assert small.cache_dir == str(tmp_path) and small.cache_size == (8, 8)
