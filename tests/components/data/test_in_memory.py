"""The in-memory train split: held when it fits the budget and augmented in batches, falls back to the image cache
with one log line when it does not, and trains a model end to end through Lightning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import AugmentParams, fill_auto, load_params
from components.data.augment import build_eval_transform, build_train_transform, eval_resize_side
from components.data.batch_augment import BatchAugment
from components.data.dataset import ImageDataModule, ManifestDataset
from components.data.in_memory import InMemoryImages
from components.data.ingest import file_sha256

MAX_PIXELS = 10_000_000


def _rows(folder: Path, n: int = 24, size: int = 12) -> list[dict[str, str]]:
    """n grey size×size PNGs: class a bright on the left half, class b on the right; a third of them for val."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = "ab"[i % 2]
        pixels = rng.integers(0, 60, (size, size), dtype=np.uint8)
        half = slice(0, size // 2) if label == "a" else slice(size // 2, size)
        pixels[:, half] += 180
        path = folder / f"{label}{i}.png"
        Image.fromarray(pixels, "L").save(path)
        rows.append(
            {"path": str(path), "sha256": file_sha256(path), "label": label, "split": "val" if i % 3 == 0 else "train",
             "width": str(size), "height": str(size)}
        )  # fmt: skip
    return rows


def _data(tmp_path, rows, in_memory: str, budget, cache: bool = True) -> ImageDataModule:
    params = AugmentParams(image_size=16, mean=[0.5], std=[0.5])
    return ImageDataModule(
        rows, ["a", "b"], build_train_transform(params), build_eval_transform(params), channels=1,
        max_pixels=MAX_PIXELS, batch_size=4, cache_dir=str(tmp_path / "cache") if cache else None,
        cache_side=eval_resize_side(params),
        in_memory={"in_memory": in_memory, "memory_budget_mb": budget, "augment": BatchAugment(params), "seed": 1},
    )  # fmt: skip


@pytest.mark.parametrize("cache", [True, False])
def test_a_train_split_within_the_budget_is_held_at_native_size_and_augmented_in_batches(tmp_path, capsys, cache):
    rows = _rows(tmp_path / "images")
    data = _data(tmp_path, rows, "auto", 1.0, cache)
    loader = data.train_dataloader()
    assert isinstance(loader.dataset, InMemoryImages) and loader.dataset.images.shape == (16, 12, 12, 1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "memory budget" in line]
    assert len(lines) == 1 and "held in cpu memory" in lines[0]
    decoded = ManifestDataset([r for r in rows if r["split"] == "train"], ["a", "b"], lambda image: {"image": image},
                              1, MAX_PIXELS)  # fmt: skip
    assert torch.equal(loader.dataset.images[3], decoded[3][0])
    x, y = data._memory_augment(next(iter(loader)))
    assert x.dtype == torch.float32 and x.shape == (4, 1, 16, 16) and y.dtype == torch.long
    assert data.train_dataloader().dataset is loader.dataset  # decided and decoded once


def test_a_budget_too_small_falls_back_to_the_cache_with_one_log_line(tmp_path, capsys):
    rows = _rows(tmp_path / "images")
    data = _data(tmp_path, rows, "on", 0.001)  # 1 KiB for 16 × 12×12 = 2.3 KiB
    for _ in range(2):
        loader = data.train_dataloader()
        assert isinstance(loader.dataset, ManifestDataset) and loader.dataset.cache is not None
        x, y = next(iter(loader))
        assert x.shape == (4, 1, 16, 16)
    lines = [line for line in capsys.readouterr().out.splitlines() if "memory budget" in line]
    assert lines == [
        "[visionflow] training images stay in the memory-mapped image cache: 16 × 12×12×1 = 0.0 MiB exceed the "
        "memory budget of 0.0 MiB (data.memory_budget_mb, data.in_memory on)"
    ]
    assert data._memory is None
    off = _data(tmp_path, rows, "off", "auto")
    assert isinstance(off.train_dataloader().dataset, ManifestDataset)


def test_a_tiny_training_on_the_in_memory_path(tmp_path, capsys):
    """Lightning feeds the in-memory batches through the DataModule's hook: the model sees normalised float batches
    at the input size (with the row positions the margins callback reads), validation stays the per-image
    loader, and the loss falls."""
    import lightning as L

    from components.training.fit import datamodule_from_params, model_spec_from_params
    from components.training.module import ClassifierModule

    overrides = ["augment.image_size=16", "train.batch_size=4", "train.num_workers=0", "trainer.accelerator=cpu",
                 "data.channels=1", "augment.mean=[0.5]", "augment.std=[0.5]", "train.lr=0.01",
                 f"run.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    params = fill_auto(load_params(None, overrides))
    data = datamodule_from_params(params, _rows(tmp_path / "images", n=48), ["a", "b"])
    data.index_train = True  # as for the suspicious-label margins: batches carry their rows' positions
    seen, losses = [], []

    class Recording(ClassifierModule):
        def training_step(self, batch, batch_idx):
            seen.append((batch[0].dtype, tuple(batch[0].shape[1:]), len(batch)))
            out = super().training_step(batch, batch_idx)
            losses.append(float((out["loss"] if isinstance(out, dict) else out).detach()))
            return out

    module = Recording(
        spec=model_spec_from_params(params, 2).model_dump(),
        optim=params.train.model_dump(),
        classes=["a", "b"],
        augment=params.augment.model_dump(),
    )
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert isinstance(trainer.train_dataloader.dataset, InMemoryImages)
    assert set(seen) == {(torch.float32, (1, 16, 16), 3)}
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    assert "training images held in cpu memory" in capsys.readouterr().out
