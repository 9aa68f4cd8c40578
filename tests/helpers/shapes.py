"""A tiny generated ImageFolder: coloured shapes on noise, 3 classes, plus optional bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (50, 80, 230)}


def _shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    colour = COLOURS[kind]
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def make_shapes(root: Path, per_class: int = 24, size: int = 32, bad_files: bool = True, seed: int = 0) -> Path:
    """Write `per_class` PNGs per class under root/<class>/; with bad_files, add a zero-byte PNG and a
    text file named .png to the first class. Returns root."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _shape(kind, size, rng).save(folder / f"{kind}_{i:03d}.png")
    if bad_files:
        (root / CLASSES[0] / "empty.png").write_bytes(b"")
        (root / CLASSES[0] / "notes.png").write_text("this is not an image\n")
    return root
