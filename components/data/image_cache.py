"""Decoded images kept once in a memory-mapped uint8 array, so epochs and runs after the first skip decoding.

Each image is decoded by the safe loader (`load_image`) and stored at the size `storage_size` picks: the square
side the eval transform resizes to first (`eval_resize_side`), with the very same Resize, when no image is smaller
than that side; or the images' own size when they all share one that is smaller (MNIST-like data: cached at native
size, resized after, so the random crops are those of the original images). On the cached image the eval Resize
is a no-op or the same Resize as on the decoded file, so evaluation sees exactly the pixels of the uncached path;
the random train crop is taken from the cached image (as FFCV and DALI pipelines crop from a pre-resized copy).
Images of different sizes, some smaller than the side, have no common size without upsampling: not cached.

Files: `<cache_dir>/images/<key>-<height>x<width>x<channels>.u8` (N×H×W×C uint8, C order) and a JSON
header beside it (`.json`: version, key, shape, dtype). The key is a sha256 of the images' content hashes in
order (from the manifest), the side, the channels and the cache version, so other data can never reuse the
file; a header that does not match (another version, a truncated or foreign file) means the cache is rebuilt.
Both files are written under temporary names and renamed into place: readers never see half a cache, and
concurrent builders (DDP ranks, parallel runs) are safe because the contents are deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset

from components.data.augment import build_resize
from components.data.images import load_image
from components.data.manifest import ManifestRow
from components.errors import DataError, ImageDecodeError

CACHE_VERSION = 1
_DTYPE = "uint8"


Size = tuple[int, int]  # (height, width) of the stored images


def _hw(side: int | Size) -> Size:
    return (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))


class ImageCache(BaseModel):
    """A built cache: the data file and the (N, height, width, channels) shape of its uint8 array."""

    path: str
    shape: tuple[int, int, int, int]

    def open(self) -> np.memmap:
        """Map the array read-only; returns an (N, height, width, channels) uint8 np.memmap."""
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)


def content_key(rows: list[ManifestRow], side: int | Size, channels: int) -> str:
    """sha256 over the rows' content hashes (their paths where a row has none) in order, the size (a square side
    or (height, width)), the channels and the cache version. Takes manifest rows; returns the hex digest."""
    h, w = _hw(side)
    sizes = [h] if h == w else [h, w]  # a square side keeps the key of the caches built before non-square sizes
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, *sizes, channels]).encode())
    for row in rows:
        digest.update((row.get("sha256") or row["path"]).encode() + b"\n")
    return digest.hexdigest()


def cache_files(cache_dir: str | os.PathLike, key: str, side: int | Size, channels: int) -> tuple[Path, Path]:
    """(data file, header file) of the cache with this key, size and channels under cache_dir/images."""
    h, w = _hw(side)
    stem = Path(cache_dir) / "images" / f"{key[:24]}-{h}x{w}x{channels}"
    return stem.with_suffix(".u8"), stem.with_suffix(".json")


def _stale_reason(data_path: Path, header_path: Path, key: str, shape: tuple[int, ...]) -> str | None:
    """Why the cache files on disk cannot be used for (key, shape); None when they can, "missing" when absent."""
    if not data_path.is_file() or not header_path.is_file():
        return "missing"
    try:
        header = json.loads(header_path.read_text())
    except (OSError, ValueError):
        return "unreadable header"
    if not isinstance(header, dict):
        return "unreadable header"
    if header.get("version") != CACHE_VERSION:
        return f"cache version {header.get('version')} (current {CACHE_VERSION})"
    if header.get("key") != key:
        return "built from different images"
    if tuple(header.get("shape", ())) != shape or header.get("dtype") != _DTYPE:
        return f"shape {header.get('shape')} {header.get('dtype')} instead of {list(shape)} {_DTYPE}"
    if data_path.stat().st_size != int(np.prod(shape)):
        return f"data file has {data_path.stat().st_size} bytes instead of {int(np.prod(shape))}"
    return None


class _DecodeResize(Dataset):
    """(index, resized uint8 image, "") per path; (index, empty array, reason) for a file that cannot be decoded."""

    def __init__(self, paths: list[str], size: Size, channels: int, max_pixels: int):
        self.paths, self.channels, self.max_pixels, self.size = paths, channels, max_pixels, size
        self.resize = build_resize(*size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, str]:
        try:
            image = load_image(self.paths[i], self.channels, self.max_pixels)
        except ImageDecodeError as err:
            return i, np.zeros(0, np.uint8), err.reason
        if image.shape[:2] == self.size:  # stored at native size: no resampling
            return i, image.reshape(*self.size, self.channels), ""
        return i, self.resize(image=image)["image"].reshape(*self.size, self.channels), ""


def _not_writable(directory: Path, err: OSError) -> DataError:
    return DataError(
        f"image cache directory {directory} is not writable ({err.strerror or err}): set run.cache_dir to a "
        "writable folder, or data.cache=false to decode images every epoch"
    )


def decode_into(
    array: np.ndarray, paths: list[str], size: Size, channels: int, max_pixels: int, workers: int = 0
) -> None:
    """Decode `paths` (resized to `size` = (height, width) unless already that size) into the (N, H, W, C) uint8
    `array` (a memory map or a plain array), with `workers` DataLoader processes; ImageDecodeError names a file
    that cannot be decoded."""
    # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, and a run that
    # builds the cache would then train on other random streams than the same seed's rerun that finds it.
    loader = DataLoader(
        _DecodeResize(paths, size, channels, max_pixels),
        batch_size=None,
        num_workers=workers,
        generator=torch.Generator(),
    )
    for i, image, reason in loader:
        if reason:
            raise ImageDecodeError(paths[int(i)], reason)
        array[int(i)] = image.numpy()


def _write(
    paths: list[str],
    size: Size,
    channels: int,
    max_pixels: int,
    data_path: Path,
    header_path: Path,
    key: str,
    workers: int,
) -> None:
    """Decode every path into a temporary array file, then rename it and its header into place."""
    shape = (len(paths), *size, channels)
    directory = data_path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _not_writable(directory, err) from None
    need = int(np.prod(shape))
    free = shutil.disk_usage(directory).free
    if need > free:
        raise DataError(
            f"the image cache needs {need / 2**30:.2f} GiB in {directory} but only {free / 2**30:.2f} GiB are free: "
            "set run.cache_dir to a larger disk, or data.cache=false"
        )
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_data = directory / f".{data_path.name}.{token}.tmp"
    tmp_header = directory / f".{header_path.name}.{token}.tmp"
    try:
        try:
            array = np.memmap(tmp_data, dtype=np.uint8, mode="w+", shape=shape) if need else None
        except OSError as err:
            raise _not_writable(directory, err) from None
        if need:
            decode_into(array, paths, size, channels, max_pixels, workers)
            array.flush()
            del array
        else:
            tmp_data.write_bytes(b"")
        tmp_header.write_text(json.dumps({"version": CACHE_VERSION, "key": key, "shape": list(shape), "dtype": _DTYPE}))
        os.replace(tmp_data, data_path)
        os.replace(tmp_header, header_path)
    finally:
        tmp_data.unlink(missing_ok=True)
        tmp_header.unlink(missing_ok=True)


def ensure_image_cache(
    rows: list[ManifestRow],
    cache_dir: str | os.PathLike,
    side: int | Size,
    channels: int,
    max_pixels: int,
    workers: int = 0,
    log: Callable[[str], None] = print,
) -> ImageCache:
    """The cache of these rows' images at height×width×channels: reused when a valid one exists, else built.

    Takes manifest rows (`path`, `sha256`), the cache folder, the size (a square side or (height, width), see
    `storage_size`), the channels (1 or 3), the
    decoder's pixel limit, the DataLoader workers used to decode, and a function that receives one line when a
    cache is built or rebuilt. Returns the ImageCache. Raises DataError when the folder is not writable or the
    disk is too small, ImageDecodeError (naming the file) when an image cannot be decoded.
    """
    size = _hw(side)
    key = content_key(rows, size, channels)
    data_path, header_path = cache_files(cache_dir, key, size, channels)
    shape = (len(rows), *size, channels)
    reason = _stale_reason(data_path, header_path, key, shape)
    if reason is not None:
        verb = "building" if reason == "missing" else f"rebuilding stale ({reason})"
        log(f"[visionflow] {verb} image cache {data_path} ({len(rows)} images at {size[0]}x{size[1]}x{channels})")
        _write([row["path"] for row in rows], size, channels, max_pixels, data_path, header_path, key, workers)
    return ImageCache(path=str(data_path), shape=shape)


def storage_size(rows: list[ManifestRow], side: int) -> Size | None:
    """The (height, width) the rows' decoded images are stored at (image cache, in-memory training set), from the
    manifest's width/height columns: (side, side) when no image is smaller than `side` (or sizes are unknown), the
    images' own size when they all share one with a side below `side` (cached at native size, resized after: an
    upsampled copy would change the random crops; measured on the 8x8 digits: ~2.5 points of test accuracy), and
    None for images of different sizes some of which are smaller than `side` (no common size: not stored)."""
    sizes = {
        (int(r["height"]), int(r["width"]))
        for r in rows
        if str(r.get("width", "")).isdigit() and str(r.get("height", "")).isdigit()
    }
    if not sizes or min(min(hw) for hw in sizes) >= side:
        return (side, side)
    return next(iter(sizes)) if len(sizes) == 1 else None
