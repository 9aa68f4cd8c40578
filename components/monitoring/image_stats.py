"""Cheap statistics of one decoded image and of one prediction, shared by the reference profile
(computed at packaging time) and the server's prediction log, so both describe images the same way.

Image statistics are computed on the decoded image before the model's preprocessing: width, height,
brightness (mean grey level, 0..1), contrast (standard deviation of grey levels, 0..1), entropy of the
grey-level histogram (bits, 0..8), sharpness (mean absolute difference of neighbouring pixels, 0..1)
and orientation (the share of horizontal differences in all differences: 0.5 for no preferred
direction; a 90° rotation maps x to 1 - x). Images larger than STATS_MAX_SIDE are shrunk first
(INTER_AREA), so the cost stays bounded. Prediction statistics summarise the probability vector:
confidence (top-1 probability), margin (top-1 minus top-2) and entropy (normalised to 0..1).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

STATS_MAX_SIDE = 256
DECIMALS = 6  # values are rounded: the log stays compact and the profile matches it exactly
IMAGE_STATISTICS = ("width", "height", "brightness", "contrast", "entropy", "sharpness", "orientation")
PREDICTION_STATISTICS = ("confidence", "margin", "prediction_entropy")


def image_statistics(image: np.ndarray) -> dict[str, float]:
    """Statistics of one decoded image.

    Takes a HxW or HxWxC uint8 array (C = 1 or 3, as decoded). Returns {name: float} for every name in
    IMAGE_STATISTICS (width and height of the image as given, the rest on its grey levels).
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    if image.ndim == 3 and image.shape[2] == 3:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    else:
        grey = image.reshape(height, width)
    scale = STATS_MAX_SIDE / max(height, width)
    if scale < 1:
        grey = cv2.resize(
            grey, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
    values = grey.astype(np.float32) / 255.0
    counts = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    share = counts[counts > 0] / counts.sum()
    dx = float(np.abs(np.diff(values, axis=1)).mean()) if values.shape[1] > 1 else 0.0
    dy = float(np.abs(np.diff(values, axis=0)).mean()) if values.shape[0] > 1 else 0.0
    stats = {
        "width": float(width),
        "height": float(height),
        "brightness": float(values.mean()),
        "contrast": float(values.std()),
        "entropy": float(-(share * np.log2(share)).sum()),
        "sharpness": (dx + dy) / 2,
        "orientation": dx / (dx + dy) if dx + dy > 0 else 0.5,
    }
    return {name: round(value, DECIMALS) for name, value in stats.items()}


def prediction_statistics(probabilities: np.ndarray) -> dict[str, float]:
    """Summary of one probability vector.

    Takes the C probabilities of one image. Returns {"confidence", "margin", "prediction_entropy"}:
    the top-1 probability, top-1 minus top-2 (the top-1 probability when C is 1) and the entropy
    divided by log(C) (0 = certain, 1 = uniform).
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    ordered = np.sort(p)[::-1]
    positive = p[p > 0]
    entropy = float(-(positive * np.log(positive)).sum())
    stats = {
        "confidence": float(ordered[0]),
        "margin": float(ordered[0] - ordered[1]) if len(ordered) > 1 else float(ordered[0]),
        "prediction_entropy": entropy / math.log(len(p)) if len(p) > 1 else 0.0,
    }
    return {name: round(value, DECIMALS) for name, value in stats.items()}
