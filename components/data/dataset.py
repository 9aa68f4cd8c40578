"""Torch dataset over a manifest and the LightningDataModule that feeds training."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from components.data.image_cache import ImageCache, ensure_image_cache, storage_size
from components.data.images import load_image
from components.data.manifest import ManifestRow, rows_of_split
from components.data.multilabel import multi_hot


class ManifestDataset(Dataset):
    """Images listed in manifest rows (dicts with `path` and `label`), decoded and transformed.

    Returns (image tensor, class index) pairs (a transform without normalization gives an HxWxC uint8
    tensor); with `task_classes` (extra task → its classes) the
    target is a LongTensor of class indices, primary task first. A decode error names the file.
    With `cache` (built from the same rows) images come from the memory-mapped cache instead of
    the files; each process maps it on first use. With `with_index` each item also carries its position in
    `rows` (image, target, index), so per-sample training signals can be attributed (training/margins.py).
    """

    def __init__(
        self,
        rows: list[ManifestRow],
        classes: list[str],
        transform: Callable,
        channels: int,
        max_pixels: int,
        task_classes: dict[str, list[str]] | None = None,
        cache: ImageCache | None = None,
        with_index: bool = False,
        multilabel: bool = False,
    ):
        self.with_index = with_index
        index = {name: i for i, name in enumerate(classes)}
        self.paths = [row["path"] for row in rows]
        if multilabel:  # the label cell holds a label set: a float 0/1 target per class (components.data.multilabel)
            self.targets = list(torch.from_numpy(multi_hot(rows, classes)))
        else:
            self.targets = [index[row["label"]] for row in rows]
        self.extra_targets = None
        if task_classes:
            indices = {task: {name: i for i, name in enumerate(names)} for task, names in task_classes.items()}
            self.extra_targets = [[indices[task][row[task]] for task in task_classes] for row in rows]
        self.transform = transform
        self.channels = channels
        self.max_pixels = max_pixels
        if cache is not None and cache.shape[0] != len(self.paths):
            raise ValueError(f"the image cache holds {cache.shape[0]} images, the rows {len(self.paths)}")
        self.cache = cache
        self._images: np.memmap | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = None  # a spawned worker maps the file itself instead of receiving a pickled copy
        return state

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, i: int) -> np.ndarray:
        if self.cache is None:
            return load_image(self.paths[i], self.channels, self.max_pixels)
        if self._images is None:
            self._images = self.cache.open()
        return np.array(self._images[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.transform(image=self._image(i))["image"]
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
        target = self.target(i)
        return (image, target, i) if self.with_index else (image, target)

    def target(self, i: int):
        """The target of item i: its class index, or a tensor (class indices of the tasks, or multi-hot labels)."""
        target = self.targets[i]
        if self.extra_targets is not None:
            target = torch.tensor([target, *self.extra_targets[i]])
        return target


def _reseed_worker_transform(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (a seeded Compose is copied into every worker)."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


class ImageDataModule(L.LightningDataModule):
    """Train/val loaders over a validated manifest with the train and eval transforms.

    With `normalize` = (mean, std) the transforms stop at uint8 (augmentation per sample, on uint8): batches
    travel as (N, H, W, C) uint8, a quarter of the float32 bytes, and are normalised as a whole on the training
    device after the transfer (`normalize_batch`), with the same float32 arithmetic as albumentations' Normalize.
    """

    def __init__(
        self,
        rows: list[ManifestRow],
        classes: list[str],
        train_transform: Callable,
        eval_transform: Callable,
        channels: int,
        max_pixels: int,
        batch_size: int,
        num_workers: int = 0,
        balanced_sampler: bool = False,
        task_classes: dict[str, list[str]] | None = None,
        cache_dir: str | None = None,
        cache_side: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        normalize: tuple[list[float], list[float]] | None = None,
        index_train: bool = False,
        multilabel: bool = False,
        in_memory: dict | None = None,
    ):
        super().__init__()
        # in_memory: {"in_memory": auto|on|off, "memory_budget_mb", "augment": BatchAugment, "seed"} holds the train
        # split in memory and augments whole batches on the device (components.data.in_memory); None: never.
        self.in_memory = in_memory
        self._memory = None
        self._memory_decided = False
        self.multilabel = multilabel
        self.index_train = index_train  # train batches carry the samples' row positions as a third item
        self.normalize = normalize
        self.balanced_sampler = balanced_sampler
        self.task_classes = task_classes
        self.rows = rows
        self.classes = classes
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.channels = channels
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_size = storage_size(rows, cache_side)  # native size for small images (image_cache.storage_size)
        if cache_dir is not None and self.cache_size is None:
            print(
                f"[visionflow] image cache off: the images have different sizes, some smaller than {cache_side}px, "
                "and no common size to cache them at without upsampling",
                flush=True,
            )
            cache_dir = None
        self.cache_dir = cache_dir
        self.cache_side = cache_side
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor

    def _cache(self, rows: list[ManifestRow]) -> ImageCache | None:
        if self.cache_dir is None or not rows:
            return None
        return ensure_image_cache(
            rows,
            self.cache_dir,
            self.cache_size,
            self.channels,
            self.max_pixels,
            self.num_workers,
            log=lambda line: print(line, flush=True),
        )

    def normalize_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H, W, C) uint8 images → (N, C, H, W) float32 (x - mean·255) · 1/(std·255), computed in float32
        exactly as albumentations' Normalize does; batches of float images (or without `normalize`) pass as they are."""
        x, y, *rest = batch  # rest: the samples' row positions when the dataset yields them
        if self.normalize is None or x.dtype != torch.uint8:
            return (x, y, *rest)
        mean, std = (np.asarray(v, dtype=np.float32) for v in self.normalize)
        shift = torch.from_numpy(mean * np.float32(255.0)).to(x.device).view(1, -1, 1, 1)
        scale = torch.from_numpy(np.reciprocal(std * np.float32(255.0))).to(x.device).view(1, -1, 1, 1)
        images = torch.empty((x.shape[0], x.shape[3], x.shape[1], x.shape[2]), dtype=torch.float32, device=x.device)
        return (images.copy_(x.permute(0, 3, 1, 2)).sub_(shift).mul_(scale), y, *rest)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning hook: augment an in-memory train batch, or normalise a uint8 batch, on the training device."""
        if self._memory is not None and self.trainer is not None and self.trainer.training:
            return self._memory_augment(batch)
        return self.normalize_batch(batch)

    def _memory_train_set(self, dataset: ManifestDataset):
        """The train split held in memory (built once; None after one log line when it does not fit or is off)."""
        if self.in_memory is None or self._memory_decided:
            return self._memory
        from components.data.in_memory import BatchAugmenter, hold_in_memory

        trainer = self.trainer
        device = torch.device(self.in_memory.get("device", "cpu"))  # without a trainer (plain loops, benches)
        if trainer is not None:
            device = trainer.strategy.root_device
        rank = trainer.global_rank if trainer is not None else 0
        settings = {
            **self.in_memory,
            "rank": rank,
            "local_processes": trainer.num_devices if trainer is not None and device.type == "cpu" else 1,
            "max_pixels": self.max_pixels,
            "cache_dir": self.cache_dir,
            "workers": self.num_workers,
            "with_index": dataset.with_index,
        }
        rows = rows_of_split(self.rows, "train")
        targets = [dataset.target(i) for i in range(len(dataset))]
        log = lambda line: print(line, flush=True)  # noqa: E731
        self._memory = hold_in_memory(rows, targets, self.cache_size, self.channels, settings, device, log)
        self._memory_augment = BatchAugmenter(self.in_memory["augment"], self.in_memory.get("seed", 0), rank)
        self._memory_decided = True
        return self._memory

    def prepare_data(self) -> None:
        """Build the image caches of the train and val splits (Lightning calls this on one process per node
        while the others wait; the loaders then find the caches ready)."""
        for split in ("train", "val"):
            self._cache(rows_of_split(self.rows, split))

    def _dataset(self, split: str, transform: Callable) -> ManifestDataset:
        rows = rows_of_split(self.rows, split)
        with_index = self.index_train and split == "train"
        return ManifestDataset(
            rows, self.classes, transform, self.channels, self.max_pixels, self.task_classes, self._cache(rows),
            with_index, multilabel=self.multilabel,
        )  # fmt: skip

    def _loader(self, dataset: Dataset, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            worker_init_fn=_reseed_worker_transform,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the train split with the random train transform (class-balanced
        sampling with replacement when balanced_sampler is set)."""
        dataset = self._dataset("train", self.train_transform)
        sampler = None
        if self.balanced_sampler:
            counts = Counter(dataset.targets)
            weights = [1.0 / counts[t] for t in dataset.targets]
            sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)
        memory = self._memory_train_set(dataset)
        if memory is not None:
            from components.data.in_memory import memory_loader

            return memory_loader(memory, self.batch_size, sampler)
        return self._loader(dataset, shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """Loader over the val split with the deterministic eval transform."""
        return self._loader(self._dataset("val", self.eval_transform), shuffle=False)


def eval_loader(
    rows: list[ManifestRow],
    classes: list[str],
    transform: Callable,
    channels: int,
    max_pixels: int,
    batch_size: int = 256,
    task_classes: dict[str, list[str]] | None = None,
    multilabel: bool = False,
) -> DataLoader:
    """An ordered DataLoader over `rows` with `transform` (for evaluation); the order is the rows' order."""
    dataset = ManifestDataset(rows, classes, transform, channels, max_pixels, task_classes, multilabel=multilabel)
    return DataLoader(dataset, batch_size=batch_size)


def eval_arrays(
    rows: list[ManifestRow],
    classes: list[str],
    transform: Callable,
    channels: int,
    max_pixels: int,
    multilabel: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows' images through `transform` as one float32 (N, C, S, S) array, and their class indices (N,)
    (multilabel: their 0/1 targets (N, C))."""
    images, targets = [], []
    for x, y in eval_loader(rows, classes, transform, channels, max_pixels, multilabel=multilabel):
        images.append(x.numpy())
        targets.append(np.asarray(y))
    return np.concatenate(images).astype(np.float32), np.concatenate(targets)


def resolve_num_workers(value: int | str, local_processes: int = 1) -> int:
    """DataLoader workers for one training process: `value` when it is an int; for "auto", the CPU cores this
    process may use, shared among the `local_processes` training processes of the node, less one for the
    training loop itself, between 0 and 8."""
    if isinstance(value, int):
        return value
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, local_processes) - 1))
