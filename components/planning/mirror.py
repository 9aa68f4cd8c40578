"""Is a horizontal flip label-preserving for this data? Measured, not assumed.

A nearest-class-mean classifier is fitted on (a sample of) the training images and scored on the validation
images as they are and mirrored left-right. When mirroring keeps the classes (faces, most photos), the mirrored
images sit as close to their class means as the originals; when it does not (digits, text), accuracy falls
towards chance.
"""

from __future__ import annotations

from collections import defaultdict

import cv2
import numpy as np
from pydantic import BaseModel

from components.data.images import load_image
from components.data.manifest import ManifestRow
from components.errors import ImageDecodeError

SIDE = 16  # images are compared as SIDE x SIDE RGB pixels
MIN_SIGNAL = 0.15  # accuracy above chance below which the test says nothing
MIN_RETAINED = 0.8  # share of the above-chance accuracy mirrored images must keep to count as mirror-safe


class MirrorTest(BaseModel):
    """The mirror test's figures and verdict ("safe", "unsafe" or "inconclusive")."""

    accuracy: float
    mirrored_accuracy: float
    chance: float
    images: int
    verdict: str


def _pixels(path: str, max_pixels: int) -> np.ndarray | None:
    try:
        image = load_image(path, 3, max_pixels)  # colour kept: it may be what tells the classes apart
    except ImageDecodeError:
        return None
    small = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (small - small.mean()) / (small.std() + 1e-6)


def _sample(rows: list[ManifestRow], split: str, per_class: int) -> list[ManifestRow]:
    by_class: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        if row["split"] == split and len(by_class[row["label"]]) < per_class:
            by_class[row["label"]].append(row)
    return [row for group in by_class.values() for row in group]


def mirror_verdict(accuracy: float, mirrored_accuracy: float, chance: float) -> str:
    """Returns "inconclusive" when the classifier is barely above chance, else "safe" when mirrored images keep
    MIN_RETAINED of its above-chance accuracy, else "unsafe"."""
    signal = accuracy - chance
    if signal < MIN_SIGNAL:
        return "inconclusive"
    return "safe" if (mirrored_accuracy - chance) >= MIN_RETAINED * signal else "unsafe"


def mirror_test(rows: list[ManifestRow], max_pixels: int = 40_000_000, per_class: int = 100) -> MirrorTest:
    """Run the nearest-class-mean mirror test on manifest rows (train split: class means; val split: scored).

    Reads at most `per_class` images per class and split; returns a MirrorTest."""
    means: dict[str, np.ndarray] = {}
    for label, group in _grouped(_sample(rows, "train", per_class)).items():
        arrays = [a for a in (_pixels(r["path"], max_pixels) for r in group) if a is not None]
        if arrays:
            means[label] = np.mean(arrays, axis=0)
    labels = sorted(means)
    empty = np.zeros((0, SIDE * SIDE * 3))
    centres = np.stack([means[c] for c in labels]).reshape(len(labels), -1) if labels else empty
    right = mirrored = total = 0
    for row in _sample(rows, "val", per_class):
        image = _pixels(row["path"], max_pixels)
        if image is None or row["label"] not in means:
            continue
        for flipped in (False, True):
            x = (image[:, ::-1] if flipped else image).reshape(1, -1)
            guess = labels[int(np.argmin(((centres - x) ** 2).sum(axis=1)))]
            if guess == row["label"]:
                right, mirrored = (right, mirrored + 1) if flipped else (right + 1, mirrored)
        total += 1
    chance = 1.0 / max(1, len(labels))
    accuracy = right / total if total else 0.0
    mirrored_accuracy = mirrored / total if total else 0.0
    return MirrorTest(
        accuracy=round(accuracy, 4),
        mirrored_accuracy=round(mirrored_accuracy, 4),
        chance=round(chance, 4),
        images=total,
        verdict=mirror_verdict(accuracy, mirrored_accuracy, chance),
    )


def _grouped(rows: list[ManifestRow]) -> dict[str, list[ManifestRow]]:
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        groups[row["label"]].append(row)
    return groups
