"""Decoding one image file into a uint8 array, safely (size checked before decoding, every mode handled).

The source file is only ever opened for reading. Every failure is an `ImageDecodeError` with a short,
stable reason that validation uses for its quarantine list.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from components.errors import ImageDecodeError, ImageTooLargeError

# Modes converted straight to RGB by PIL.
_TO_RGB = {"CMYK", "YCbCr", "HSV", "LAB", "RGBX"}
# Modes with an alpha channel, composited on white.
_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa"}
# Integer / float modes scaled to 8 bits over the image's own range.
_HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}

# load_image checks max_pixels itself before decoding, so PIL's own decompression-bomb check (a warning
# above MAX_IMAGE_PIXELS, an error above twice that) must neither warn nor refuse first. The check runs
# inside Image.open against a module global; it is lifted for the header read only, under a lock, which
# does not depend on the warnings filters (catch_warnings is not thread-safe, filters get reset by hosts).
_PIL_LIMIT_LOCK = threading.Lock()


def _open(path: str) -> Image.Image:
    """Image.open (lazy: reads the header only) without PIL's own bomb limit; the caller checks sizes."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def probe_image(path: str | os.PathLike) -> tuple[int, int, str] | None:
    """Read only the header of an image file.

    Takes a path; returns (width, height, mode) without decoding the pixels, or None when PIL
    cannot identify the file (missing, empty, not an image, unreadable header).
    """
    try:
        with _open(os.fspath(path)) as img:
            return int(img.width), int(img.height), str(img.mode)
    except Exception:  # PIL raises many types on a broken header; all mean "cannot identify"
        return None


def _too_many(width: int, height: int, max_pixels: int) -> str:
    return f"too many pixels ({width}×{height} = {width * height} > max_pixels {max_pixels})"


def _scale_to_l(img: Image.Image) -> Image.Image:
    """Scale an I;16 / I / F image to 8-bit L over its actual min..max range."""
    values = np.asarray(img).astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Image.new("L", img.size, 0)
    low, high = float(finite.min()), float(finite.max())
    if high > low:
        scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / (high - low) * 255.0
    else:  # a constant image: keep its level relative to the type's range
        full = 65535.0 if img.mode.startswith("I;16") else 255.0
        scaled = np.full(values.shape, min(max(low, 0.0), full) / full * 255.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _normalize_mode(img: Image.Image, path: str) -> Image.Image:
    """Bring any supported mode to L or RGB (alpha on white, high depth scaled, palettes expanded)."""
    mode = img.mode
    if mode == "P":
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in _WITH_ALPHA:
        return _composite_on_white(img)
    if mode in _TO_RGB:
        return img.convert("RGB")
    if mode in _HIGH_DEPTH:
        return _scale_to_l(img)
    raise ImageDecodeError(path, f"unsupported mode {mode}")


def load_image(path: str | os.PathLike, channels: int, max_pixels: int) -> np.ndarray:
    """Decode one image file.

    Takes the file path, the channel count wanted (1 = grayscale, 3 = RGB) and the largest pixel
    count accepted (checked from the header, before decoding). Returns a HxWxC uint8 array (always
    3-D), EXIF orientation applied, alpha composited on white, 16-bit/float scaled to 8 bits.
    Raises ImageDecodeError(path, reason) with reason one of: "file not found", "a folder, not an image file",
    "empty file",
    "not an image", "truncated", "corrupt image data", "too many pixels (...)" (as its subclass
    ImageTooLargeError), "unsupported mode X".
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageDecodeError(path, "a folder, not an image file" if os.path.isdir(path) else "file not found")
    if os.path.getsize(path) == 0:
        raise ImageDecodeError(path, "empty file")
    try:
        img = _open(path)
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image") from None
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except Exception:  # a header PIL recognises but cannot parse
        raise ImageDecodeError(path, "not an image") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(path, _too_many(width, height, max_pixels))
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError(path, _too_many(width, height, max_pixels)) from None
        except EOFError:
            raise ImageDecodeError(path, "truncated") from None
        except Exception as err:  # OSError, SyntaxError, ValueError, struct.error ... from decoders
            reason = "truncated" if "truncated" in str(err).lower() else "corrupt image data"
            raise ImageDecodeError(path, reason) from None
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block: keep the stored orientation
            oriented = img
        rgb_or_l = _normalize_mode(oriented, path)
        target = rgb_or_l.convert("L" if channels == 1 else "RGB")
        array = np.array(target, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return array
