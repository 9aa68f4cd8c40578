"""The data's fingerprint as the plan sees it: sizes, aspect ratios, modes, counts, balance, mirror test."""

from __future__ import annotations

import statistics
from collections import Counter

from pydantic import BaseModel

from components.data import multilabel
from components.data.manifest import ManifestRow
from components.planning.mirror import MirrorTest

GREY_MODES = {"1", "L", "LA", "F", "I", "I;16", "I;16B", "I;16L", "I;16N"}


class DataFingerprint(BaseModel):
    """What the plan decides from (all derived from the clean manifest and the mirror test)."""

    num_images: int
    num_train: int
    num_classes: int
    train_counts: dict[str, int]
    imbalance_ratio: float  # largest / smallest train class
    median_side: int  # median of each image's shorter side
    median_width: int
    median_height: int
    off_square: float  # share of images whose aspect ratio is outside 4:5 .. 5:4
    modes: dict[str, int]
    grey_fraction: float
    mirror: MirrorTest | None = None
    multilabel: bool = False  # the label cells hold label sets (counts are per label)

    @property
    def grey(self) -> bool:
        """Every image is single-channel."""
        return self.grey_fraction >= 1.0


def fingerprint_of(rows: list[ManifestRow], mirror: MirrorTest | None = None, task: str = "auto") -> DataFingerprint:
    """The DataFingerprint of clean manifest rows (columns label, split, width, height, mode); with `task`
    multilabel (or auto and a label cell holding the separator) the classes and counts are per label."""
    widths = [int(r["width"]) for r in rows]
    heights = [int(r["height"]) for r in rows]
    sides = [min(w, h) for w, h in zip(widths, heights, strict=True)]
    ratios = [w / h for w, h in zip(widths, heights, strict=True) if h]
    multi = multilabel.resolve_task(task, [r["label"] for r in rows]) == "multilabel"
    cells = [multilabel.split_cell(r["label"]) if multi else [r["label"]] for r in rows]
    train = Counter(label for r, labels in zip(rows, cells, strict=True) if r["split"] == "train" for label in labels)
    modes = Counter(r.get("mode", "") for r in rows)
    grey = sum(n for mode, n in modes.items() if mode in GREY_MODES)
    counts = list(train.values())
    return DataFingerprint(
        num_images=len(rows),
        num_train=sum(1 for r in rows if r["split"] == "train"),
        num_classes=len({label for labels in cells for label in labels}),
        train_counts=dict(sorted(train.items())),
        imbalance_ratio=round(max(counts) / min(counts), 3) if counts and min(counts) else 0.0,
        median_side=int(statistics.median(sides)) if sides else 0,
        median_width=int(statistics.median(widths)) if widths else 0,
        median_height=int(statistics.median(heights)) if heights else 0,
        off_square=round(sum(1 for r in ratios if not 0.8 <= r <= 1.25) / len(ratios), 3) if ratios else 0.0,
        modes=dict(modes.most_common()),
        grey_fraction=round(grey / len(rows), 3) if rows else 0.0,
        mirror=mirror,
        multilabel=multi,
    )
