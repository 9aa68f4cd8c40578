"""Grids of pictures, each with a caption above it (the misclassified test images, the explanations, the suspicious
training labels), drawn as one canvas at the PNG's own pixel size.

A matplotlib figure of one axes per picture took 1-2 s to lay out and draw (constrained layout, one resampled image
per axes) at the end of every training and every evaluation; here matplotlib draws only the title and the captions,
and the pictures, resized once (nearest neighbour up, area averaging down, so pixels stay visible and a 12-megapixel
photo does not become a gigabyte canvas), are pasted into those pixels before Pillow writes the PNG.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np

CELL_PX = 171  # the longest side of a picture in its cell (1.9 inches at 90 dpi)
DPI = 90
FONT_PT = 8.0
_LINE_PX = round(FONT_PT / 72 * DPI * 1.35)  # one caption line
_PAD = 6


class Cell(NamedTuple):
    image: np.ndarray | None  # H x W x C (C 1 or 3) or H x W, uint8; None: "unreadable" instead of a picture
    caption: str  # one or more lines
    color: str = "black"


def fit_to_cell(image: np.ndarray, side: int = CELL_PX) -> np.ndarray:
    """`image` (H x W x C or H x W, uint8) resized so that its longer side is `side`, the aspect kept: small pictures
    grow by nearest neighbour (an 8x8 digit stays sharp), large ones shrink by area averaging."""
    import cv2

    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale == 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA)
    return resized[..., None] if resized.ndim == 2 and image.ndim == 3 else resized


def read_picture(path: str, channels: int, max_pixels: int) -> np.ndarray | None:
    """A picture for a cell, decoded as training decodes it (components/data/images.py: orientation, alpha, the
    pixel limit) and fitted as it is read, so 64 full-size photos are never held at once; None when the file
    cannot be read any more (moved or damaged since ingest): its cell then says "unreadable"."""
    from components.data.images import load_image
    from components.errors import ImageDecodeError

    try:
        return fit_to_cell(load_image(path, channels, max_pixels))
    except ImageDecodeError:
        return None


def overlay(image: np.ndarray, heat: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """The picture (H x W x C uint8, C 1 or 3) as RGB uint8 with the [0, 1] map (H x W) over it in the jet colour
    map (None: the picture alone)."""
    from matplotlib import colormaps

    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    if heat is None:
        return np.ascontiguousarray(rgb)
    colours = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return (rgb * (1.0 - alpha) + colours * alpha).round().astype(np.uint8)


def image_grid(cells: list[Cell], path: Path, title: str, columns: int | None = None) -> Path:
    """Write the cells as one PNG at `path`: `columns` per row (default: a square grid), each picture fitted to
    CELL_PX at the foot of its cell with its caption above, the title across the top. Returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in task threads
    from PIL import Image

    columns = max(1, min(columns or math.ceil(math.sqrt(len(cells))), len(cells)))
    rows = math.ceil(len(cells) / columns)
    lines = max(cell.caption.count("\n") + 1 for cell in cells)
    cell_w, cell_h = CELL_PX + 2 * _PAD, CELL_PX + lines * _LINE_PX + 2 * _PAD
    width = columns * cell_w
    title = textwrap.fill(title, width=max(24, width // 7))  # about 7 pixels a character: a narrow grid wraps it
    title_h = (title.count("\n") + 1) * round(_LINE_PX * 1.25) + _PAD
    height = title_h + rows * cell_h
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    agg = FigureCanvasAgg(fig)
    fig.text(0.5, 1 - (_PAD / 2) / height, title, fontsize=FONT_PT + 1.5, ha="center", va="top")
    places = []  # (picture, its lower-left pixel) pasted after the text is drawn
    for i, cell in enumerate(cells):
        left, bottom = (i % columns) * cell_w + _PAD, title_h + (i // columns + 1) * cell_h - _PAD
        centre = (left + CELL_PX / 2) / width
        top = bottom - CELL_PX  # the picture sits at the foot of its cell, the caption just above it
        fig.text(centre, 1 - (top - 2) / height, cell.caption, fontsize=FONT_PT, ha="center", va="bottom",
                 color=cell.color)  # fmt: skip
        if cell.image is None:
            fig.text(centre, 1 - (bottom - CELL_PX / 2) / height, "unreadable", ha="center", va="center")
        else:
            places.append((fit_to_cell(cell.image if cell.image.ndim == 3 else cell.image[..., None]), left, bottom))
    agg.draw()  # the text only: the pictures are pasted as arrays, never resampled by matplotlib
    canvas = np.array(agg.buffer_rgba())[:height, :width, :3]
    for picture, left, bottom in places:
        h, w = picture.shape[:2]
        x = left + (CELL_PX - w) // 2
        canvas[bottom - h : bottom, x : x + w] = picture[..., :3]  # a grey picture broadcasts
    Image.fromarray(canvas).save(path, format="PNG")
    return path
