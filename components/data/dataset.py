"""Torch dataset over a manifest and the LightningDataModule that feeds training."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from components.data.images import load_image


class ManifestDataset(Dataset):
    """Images listed in manifest rows (dicts with `path` and `label`), decoded and transformed.

    Returns (image tensor, class index) pairs; with `task_classes` (extra task → its classes) the
    target is a LongTensor of class indices, primary task first. A decode error names the file.
    """

    def __init__(
        self,
        rows: list[dict[str, str]],
        classes: list[str],
        transform: Callable,
        channels: int,
        max_pixels: int,
        task_classes: dict[str, list[str]] | None = None,
    ):
        index = {name: i for i, name in enumerate(classes)}
        self.paths = [row["path"] for row in rows]
        self.targets = [index[row["label"]] for row in rows]
        self.extra_targets = None
        if task_classes:
            indices = {task: {name: i for i, name in enumerate(names)} for task, names in task_classes.items()}
            self.extra_targets = [[indices[task][row[task]] for task in task_classes] for row in rows]
        self.transform = transform
        self.channels = channels
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.paths[i], self.channels, self.max_pixels)
        target = self.targets[i]
        if self.extra_targets is not None:
            target = torch.tensor([target, *self.extra_targets[i]])
        return self.transform(image=image)["image"], target


def _reseed_worker_transform(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (a seeded Compose is copied into every worker)."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def rows_of_split(rows: list[dict[str, str]], split: str) -> list[dict[str, str]]:
    """The manifest rows of one split ("train", "val", "test"; "all" keeps every row)."""
    return list(rows) if split == "all" else [row for row in rows if row["split"] == split]


class ImageDataModule(L.LightningDataModule):
    """Train/val loaders over a validated manifest with the train and eval transforms."""

    def __init__(
        self,
        rows: list[dict[str, str]],
        classes: list[str],
        train_transform: Callable,
        eval_transform: Callable,
        channels: int,
        max_pixels: int,
        batch_size: int,
        num_workers: int = 0,
        balanced_sampler: bool = False,
        task_classes: dict[str, list[str]] | None = None,
    ):
        super().__init__()
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

    def _dataset(self, split: str, transform: Callable) -> ManifestDataset:
        return ManifestDataset(
            rows_of_split(self.rows, split), self.classes, transform, self.channels, self.max_pixels, self.task_classes
        )

    def _loader(self, dataset: Dataset, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_reseed_worker_transform,
            pin_memory=torch.cuda.is_available(),
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
        return self._loader(dataset, shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """Loader over the val split with the deterministic eval transform."""
        return self._loader(self._dataset("val", self.eval_transform), shuffle=False)


def eval_loader(
    rows: list[dict[str, str]],
    classes: list[str],
    transform: Callable,
    channels: int,
    max_pixels: int,
    batch_size: int = 256,
    task_classes: dict[str, list[str]] | None = None,
) -> DataLoader:
    """An ordered DataLoader over `rows` with `transform` (for evaluation); the order is the rows' order."""
    dataset = ManifestDataset(rows, classes, transform, channels, max_pixels, task_classes)
    return DataLoader(dataset, batch_size=batch_size)


def eval_arrays(
    rows: list[dict[str, str]], classes: list[str], transform: Callable, channels: int, max_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """The rows' images through `transform` as one float32 (N, C, S, S) array, and their class indices (N,)."""
    images, targets = [], []
    for x, y in eval_loader(rows, classes, transform, channels, max_pixels):
        images.append(x.numpy())
        targets.append(np.asarray(y))
    return np.concatenate(images).astype(np.float32), np.concatenate(targets)
