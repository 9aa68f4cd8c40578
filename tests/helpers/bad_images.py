"""A generated corpus of broken and unusual image files, with what loading each one must give.

`make_bad_corpus(folder)` writes the files and returns a Corpus: `bad` maps file name -> the exact
quarantine reason, `good` maps file name -> the (height, width) it must load with.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 40_000_000


@dataclass
class Corpus:
    folder: Path
    bad: dict[str, str] = field(default_factory=dict)
    good: dict[str, tuple[int, int]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.folder / name


def png_with_declared_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched to declare width x height (CRC fixed): tiny on disk."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1), 0).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def make_bad_corpus(folder: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Corpus:
    """Write the broken and unusual files into `folder`; returns the Corpus of expectations."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(folder)

    # --- files that must be quarantined, with their exact reasons
    (folder / "empty.png").write_bytes(b"")
    corpus.bad["empty.png"] = "empty file"

    (folder / "text.png").write_text("this is not an image\n")
    corpus.bad["text.png"] = "not an image"

    buffer = io.BytesIO()
    _noise((64, 64), 1).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    corpus.bad["truncated.jpg"] = "truncated"

    # 10000x10000: above PIL's warning limit; 20000x20000: above PIL's own error limit.
    (folder / "huge_header.png").write_bytes(png_with_declared_size(10_000, 10_000))
    corpus.bad["huge_header.png"] = f"too many pixels (10000×10000 = 100000000 > max_pixels {max_pixels})"
    (folder / "bomb_header.png").write_bytes(png_with_declared_size(20_000, 20_000))
    corpus.bad["bomb_header.png"] = f"too many pixels (20000×20000 = 400000000 > max_pixels {max_pixels})"

    # --- unusual files that must load
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(folder / "cmyk.jpg", "JPEG", quality=95)
    corpus.good["cmyk.jpg"] = (10, 20)

    gradient = np.tile(np.linspace(1000, 60000, 64).astype(np.uint16), (16, 1))
    image16 = Image.fromarray(gradient)
    assert image16.mode == "I;16"
    image16.save(folder / "gradient16.png")
    corpus.good["gradient16.png"] = (16, 64)

    rgba = np.zeros((8, 16, 4), dtype=np.uint8)
    rgba[:, 8:] = (255, 0, 0, 255)  # right half opaque red, left half fully transparent black
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    corpus.good["rgba.png"] = (8, 16)

    palette = Image.new("P", (12, 6), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 6))
    palette.paste(1, (6, 0, 12, 6))  # left blue, right green
    palette.save(folder / "palette.png")
    corpus.good["palette.png"] = (6, 12)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    _noise((40, 20), 2).save(folder / "exif_rotated.jpg", "JPEG", exif=exif.tobytes())
    corpus.good["exif_rotated.jpg"] = (40, 20)  # stored 40 wide x 20 high, displayed 20 wide x 40 high

    Image.new("1", (9, 7), 1).save(folder / "bilevel.png")
    corpus.good["bilevel.png"] = (7, 9)
    return corpus
