"""Images per second of the visionflow train loader against torchvision's ImageFolder + transforms.v2.

Generates N JPEGs (10 classes) at each size, then reads them for a few epochs with:
  torchvision   ImageFolder (PIL decode) + v2 RandomResizedCrop(0.8-1), HorizontalFlip(0.5),
                RandomRotation(10, bilinear, p=0.5), ToDtype, Normalize
  visionflow    the train DataLoader of `datamodule_from_params` with the same augmentations (albumentations),
                with the decoded-image cache (data.cache=true, the default) and without it
Same batch size, workers, shuffling and persistent workers for all. On a machine with a GPU every batch is also
copied to it inside the clock (pinned memory), and visionflow's loader then yields uint8 batches that are
normalised on the GPU, as in training; on CPUs its workers normalise. The first visionflow epoch includes
building the cache. Prints a table; the ratio column compares epochs 2..N against torchvision's.

    python bench/dataloader.py [--images 5000] [--sizes 64 224] [--epochs 3] [--workers auto] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from components.quiet import set_offline_defaults  # noqa: E402 - before prefect / mlflow / albumentations

set_offline_defaults()

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

from components.config import load_params
from components.data.dataset import resolve_num_workers
from components.data.ingest import file_sha256
from components.training.devices import DevicePlan
from components.training.fit import datamodule_from_params

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
CLASSES = 10


def make_jpegs(root: Path, count: int, size: int, seed: int = 0) -> list[dict[str, str]]:
    """Write `count` size×size JPEGs (quality 90: noise plus a coloured ellipse) into root/<class>/; returns
    manifest rows (path, sha256, label, split=train)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label = f"class{i % CLASSES}"
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 120, (size, size, 3), dtype=np.uint8), "RGB")
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        ImageDraw.Draw(image).ellipse(
            [x0, y0, x0 + size // 2, y0 + size // 3], fill=tuple(int(c) for c in rng.integers(0, 256, 3))
        )
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=90)
        rows.append({"path": str(path), "sha256": file_sha256(path), "label": label, "split": "train"})
    return rows


def torchvision_loader(root: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    """ImageFolder + transforms.v2 with the augmentations visionflow's params below describe."""
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop((size, size), scale=(0.8, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.RandomRotation(10, interpolation=InterpolationMode.BILINEAR)], p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def visionflow_loader(
    rows, size: int, batch_size: int, workers: int, cache_dir: Path, cache: bool, gpu_path: bool = False
):
    """The visionflow train DataModule for these rows (with `gpu_path`, the one GPU training gets: uint8 batches)."""
    params = load_params(
        None,
        [
            "data.channels=3",
            f"data.cache={str(cache).lower()}",
            "data.in_memory=off",  # the per-image loader; the in-memory path is bench/small_images.py's
            f"augment.image_size={size}",
            "augment.crop_scale_min=0.8",
            "augment.hflip_p=0.5",
            "augment.rotate_limit=10",
            "augment.rotate_p=0.5",
            f"augment.mean={MEAN}",
            f"augment.std={STD}",
            f"train.batch_size={batch_size}",
            f"train.num_workers={workers}",
            f"run.cache_dir={cache_dir}",
            f"trainer.accelerator={'gpu' if torch.cuda.is_available() else 'cpu'}",
        ],
    )
    classes = sorted({row["label"] for row in rows})
    if not gpu_path:
        return datamodule_from_params(params, rows, classes)
    data = datamodule_from_params(
        params, rows, classes, plan=DevicePlan(accelerator="cuda", devices=1, num_nodes=1, launcher=None)
    )
    data.pin_memory = torch.cuda.is_available()
    return data


def to_device(batch, normalize=None):
    """The batch on the GPU when there is one (then normalised by `normalize`, visionflow's device step)."""
    if not torch.cuda.is_available():
        return batch
    x, y = batch[0].to("cuda", non_blocking=True), batch[1]
    return normalize((x, y)) if normalize else (x, y)


def epochs_per_second(make_loader, epochs: int, images: int, before_first=None, finish=to_device) -> list[float]:
    """Images/second of each full pass over the loader (the same loader object every epoch); `finish` is applied
    to every batch inside the clock (the copy to the GPU and visionflow's normalisation there)."""
    rates = []
    loader = None
    for epoch in range(epochs):
        start = time.perf_counter()
        if epoch == 0:
            if before_first is not None:
                before_first()
            loader = make_loader()
        seen = sum(len(finish(batch)[1]) for batch in loader)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        assert seen == images, (seen, images)
        rates.append(images / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="JPEGs per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="image sides (JPEG = model input)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", default="auto", help="DataLoader workers for every loader (int or auto)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    workers = resolve_num_workers(args.workers if args.workers == "auto" else int(args.workers))
    device = f"to {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    table = Table(
        title=f"train loader images/s — {args.images} JPEGs, batch {args.batch_size}, {workers} worker(s), "
        f"{os.cpu_count()} CPU(s), {device}"
    )
    for column in [
        "size",
        "loader",
        *(f"epoch {e + 1}" for e in range(args.epochs)),
        f"epochs 2-{args.epochs}",
        "× torchvision",
    ]:
        table.add_column(column, justify="right" if column not in ("loader",) else "left")
    with tempfile.TemporaryDirectory(prefix="visionflow-bench-loader-") as tmp:
        for size in args.sizes:
            root = Path(tmp) / f"jpeg{size}"
            rows = make_jpegs(root, args.images, size)
            results = {}
            results["torchvision ImageFolder + v2"] = epochs_per_second(
                lambda root=root, size=size: torchvision_loader(root, size, args.batch_size, workers),
                args.epochs,
                args.images,
            )
            plain = visionflow_loader(rows, size, args.batch_size, workers, Path(tmp) / "cache", cache=False)
            results["visionflow, data.cache=false"] = epochs_per_second(
                plain.train_dataloader,
                args.epochs,
                args.images,
                finish=lambda b, plain=plain: to_device(b, plain.normalize_batch),
            )
            cached = visionflow_loader(rows, size, args.batch_size, workers, Path(tmp) / "cache", cache=True)
            results["visionflow (cache built in epoch 1)"] = epochs_per_second(
                cached.train_dataloader,
                args.epochs,
                args.images,
                before_first=cached.prepare_data,
                finish=lambda b, cached=cached: to_device(b, cached.normalize_batch),
            )
            if not torch.cuda.is_available():
                uint8 = visionflow_loader(
                    rows, size, args.batch_size, workers, Path(tmp) / "cache", cache=True, gpu_path=True
                )
                results["visionflow GPU path: uint8 batches (normalised on the GPU, untimed)"] = epochs_per_second(
                    uint8.train_dataloader, args.epochs, args.images, before_first=uint8.prepare_data
                )
            baseline = float(np.mean(results["torchvision ImageFolder + v2"][1:]))
            for name, rates in results.items():
                steady = float(np.mean(rates[1:])) if len(rates) > 1 else rates[0]
                table.add_row(
                    f"{size}×{size}", name, *(f"{r:,.0f}" for r in rates), f"{steady:,.0f}", f"{steady / baseline:.2f}×"
                )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
