"""Small training sets at in-memory speed: the decoded train split held once as one uint8 tensor (in RAM on CPUs, in
device memory on GPUs) and augmented in whole batches on the device (`batch_augment.BatchAugment`, the same
distributions as the Albumentations train transform).

A train split is held in memory when `data.in_memory` allows it and its decoded bytes fit the memory budget
(`data.memory_budget_mb`; auto: a share of the memory available now — free RAM on CPUs, divided among the node's
training processes, free device memory on GPUs). Otherwise training keeps the memory-mapped image cache and the
per-image Albumentations loader, with one log line saying why: too small a budget is never an out-of-memory crash.
Images are stored at `image_cache.storage_size` (native size for small images), decoded through the image cache
when it is on (a later run skips decoding), else decoded straight into memory.

Each process (DDP rank) holds the whole train split and draws its own shard of every epoch's indices (Lightning puts
a DistributedSampler in the loader), so the ranks see disjoint samples as with the per-image loader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from components.data.batch_augment import BatchAugment
from components.data.image_cache import Size, decode_into, ensure_image_cache
from components.data.manifest import ManifestRow

InMemory = Literal["auto", "on", "off"]
# Share of the available memory the automatic budget gives the train split: `auto` leaves room for the model,
# activations and the rest of the machine; `on` (asked for explicitly) takes most of what is free.
_SHARE = {"auto": 0.25, "on": 0.75}


def available_bytes(device: torch.device, local_processes: int = 1) -> int:
    """Memory free for one training process now: free device memory on CUDA, else available RAM (psutil) shared
    among the node's `local_processes` training processes."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available) // max(1, local_processes)


def budget_bytes(mode: InMemory, budget_mb: float | str, device: torch.device, local_processes: int = 1) -> int:
    """The bytes the train split may take in memory: `budget_mb` MiB when a number, else the mode's share of
    `available_bytes`."""
    if budget_mb != "auto":
        return int(float(budget_mb) * 2**20)
    return int(_SHARE["on" if mode == "on" else "auto"] * available_bytes(device, local_processes))


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def decide(mode: InMemory, need: int, budget: int, device: torch.device, what: str, cached: bool) -> tuple[bool, str]:
    """(hold in memory?, the one log line saying so and why). `need`: the decoded bytes, `what`: their shape,
    `cached`: whether the fallback reads the image cache (else it decodes the files every epoch)."""
    if need <= budget:
        return True, (
            f"[visionflow] training images held in {device.type} memory and augmented in batches there: {what} = "
            f"{_mib(need)} (memory budget {_mib(budget)})"
        )
    fallback = "stay in the memory-mapped image cache" if cached else "are decoded from their files every epoch"
    return False, (
        f"[visionflow] training images {fallback}: {what} = {_mib(need)} exceed the memory budget of "
        f"{_mib(budget)} (data.memory_budget_mb{', data.in_memory on' if mode == 'on' else ''})"
    )


class InMemoryImages(Dataset):
    """A train split held as one (N, H, W, C) uint8 tensor and its targets (on the training device). A DataLoader
    with batch_size B fetches whole batches by tensor indexing (`__getitems__`: (B, C, H, W) views of the gathered
    images); `with_index` adds the samples' row positions as a third item, as ManifestDataset does."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, with_index: bool = False):
        self.images, self.targets, self.with_index = images, targets, with_index

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        on_device = index.to(self.images.device)
        batch = (self.images[on_device].permute(0, 3, 1, 2), self.targets[on_device])
        return (*batch, index) if self.with_index else batch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        batch = self.__getitems__([i])
        return tuple(t[0] for t in batch)


def _whole_batch(batch: Any) -> Any:
    """collate_fn of the in-memory loader: `__getitems__` already returns the collated batch."""
    return batch


def decoded_train_images(
    rows: list[ManifestRow],
    size: Size,
    channels: int,
    max_pixels: int,
    cache_dir: str | None,
    workers: int,
    log: Callable[[str], None],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The rows' images as one (N, H, W, C) uint8 tensor on `device`, holding the bytes once there: read from the
    image cache (built if needed) when `cache_dir` is set, else decoded straight into memory; copied to a GPU in
    chunks."""
    device = torch.device(device)
    if cache_dir is not None:
        source = ensure_image_cache(rows, cache_dir, size, channels, max_pixels, workers, log=log).open()
    else:
        source = np.empty((len(rows), *size, channels), dtype=np.uint8)
        decode_into(source, [row["path"] for row in rows], size, channels, max_pixels, workers)
    if device.type == "cpu":
        return torch.from_numpy(np.array(source) if isinstance(source, np.memmap) else source)
    images = torch.empty(source.shape, dtype=torch.uint8, device=device)
    for start in range(0, len(source), 4096):
        images[start : start + 4096] = torch.from_numpy(np.ascontiguousarray(source[start : start + 4096])).to(device)
    return images


class BatchAugmenter:
    """The train transform on whole batches with its own random stream per process (seed + rank), created on the
    batch's device on first use."""

    def __init__(self, augment: BatchAugment, seed: int, rank: int = 0):
        self.augment, self.seed, self.rank = augment, seed, rank
        self.generator: torch.Generator | None = None

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        images, *rest = batch
        if self.generator is None or self.generator.device != images.device:
            self.generator = torch.Generator(device=images.device)
            self.generator.manual_seed(self.seed * 1000 + self.rank)
        return (self.augment(images, self.generator), *rest)


def memory_loader(
    dataset: InMemoryImages, batch_size: int, sampler: torch.utils.data.Sampler | None = None
) -> DataLoader:
    """A shuffled loader (or one over `sampler`) that fetches whole batches from the in-memory split in the
    training process (no workers: the data are already decoded, and on a GPU already on the device)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=0,
        collate_fn=_whole_batch,
    )


def hold_in_memory(
    rows: list[ManifestRow],
    targets: list[Any],
    size: Size | None,
    channels: int,
    settings: dict[str, Any],
    device: torch.device,
    log: Callable[[str], None],
) -> InMemoryImages | None:
    """The train split as an InMemoryImages on `device` when it fits the budget; None (after one log line) when it
    does not or has no common size. `targets`: one per row (as ManifestDataset.target gives them); `settings`:
    in_memory, memory_budget_mb, local_processes, max_pixels, cache_dir, workers, with_index, rank (only rank 0
    says that the split is held; a fallback is said by every process)."""
    mode = settings["in_memory"]
    if mode == "off" or not rows:
        return None
    if size is None:
        log("[visionflow] training images not held in memory: they have different sizes, some below the input size")
        return None
    need = len(rows) * size[0] * size[1] * channels
    budget = budget_bytes(mode, settings["memory_budget_mb"], device, settings.get("local_processes", 1))
    what = f"{len(rows)} × {size[0]}×{size[1]}×{channels}"
    fits, line = decide(mode, need, budget, device, what, settings.get("cache_dir") is not None)
    if not fits or settings.get("rank", 0) == 0:  # every process decides for itself; a fallback is always said
        log(line)
    if not fits:
        return None
    images = decoded_train_images(
        rows, size, channels, settings["max_pixels"], settings.get("cache_dir"), settings.get("workers", 0), log, device
    )
    return InMemoryImages(images, default_collate(targets).to(device), settings.get("with_index", False))
