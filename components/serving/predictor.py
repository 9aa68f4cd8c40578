"""Inference over a verified bundle: decode uploaded bytes, apply the bundle's eval preprocessing
(exactly the training eval transform, from preprocess.json) and run the ONNX model with onnxruntime.

Only numpy, Pillow, OpenCV and onnxruntime are needed here (no torch), so a slim serving image can
carry it. Resizing uses cv2.resize with INTER_LINEAR, the call albumentations' Resize makes, so the
arrays match the training eval transform bit for bit before normalisation.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from components.bundle_format import MODEL_FILE, BundleError, verify_bundle
from components.data.images import load_image
from components.errors import ImageDecodeError

_INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR}
UPLOAD_NAME = "upload"


def decode_image_bytes(data: bytes, channels: int, max_pixels: int) -> np.ndarray:
    """Decode uploaded image bytes with load_image's semantics.

    Takes the raw bytes, the channel count wanted (1 or 3) and the largest pixel count accepted
    (checked from the header before decoding). Returns a HxWxC uint8 array (EXIF orientation applied,
    alpha on white, 16-bit scaled, palettes expanded). Raises ImageDecodeError("upload", reason) with
    the reasons of load_image: "empty file", "not an image", "truncated", "corrupt image data",
    "too many pixels (...)" (as ImageTooLargeError), "unsupported mode X".
    """
    if not data:
        raise ImageDecodeError(UPLOAD_NAME, "empty file")
    # load_image takes a path (it checks the file on disk), so the bytes go through a private temp file.
    fd, name = tempfile.mkstemp(prefix="visionflow-upload-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            return load_image(name, channels=channels, max_pixels=max_pixels)
        except ImageDecodeError as err:  # keep the temp path out of messages and logs (and the error's type)
            raise type(err)(UPLOAD_NAME, err.reason) from None
    finally:
        os.unlink(name)


def _pair(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise BundleError(f"preprocess.json: {key} must be [height, width], got {value!r}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of an NxC float array; returns float32 NxC probabilities."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function of a float array (numerically stable); returns float32."""
    x = logits.astype(np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x)))).astype(
        np.float32
    )


def labels_over_thresholds(
    probabilities: np.ndarray, labels: list[str], thresholds: dict[str, float]
) -> list[list[dict[str, Any]]]:
    """Per image, every label whose probability is at least its threshold: [{"label", "probability",
    "threshold"}, ...] sorted by probability, highest first (empty when none passes)."""
    limits = [float(thresholds[label]) for label in labels]
    results = []
    for row in np.asarray(probabilities):
        order = [i for i in np.argsort(-row, kind="stable") if float(row[i]) >= limits[i]]
        results.append([{"label": labels[i], "probability": float(row[i]), "threshold": limits[i]} for i in order])
    return results


def top_k_predictions(probabilities: np.ndarray, labels: list[str], k: int) -> list[list[dict[str, Any]]]:
    """Turn NxC probabilities into per-image top-k lists.

    Takes the probabilities, the labels (one per column) and k (clipped to 1..C). Returns, per image,
    [{"label": str, "probability": float}, ...] sorted by probability, highest first.
    """
    k = max(1, min(int(k), len(labels)))
    results = []
    for row in np.asarray(probabilities):
        order = np.argsort(-row, kind="stable")[:k]
        results.append([{"label": labels[i], "probability": float(row[i])} for i in order])
    return results


class Predictor:
    """An onnxruntime CPU session over a verified bundle, with the bundle's eval preprocessing."""

    def __init__(
        self,
        bundle_dir: Path,
        max_pixels: int = 40_000_000,
        threads: int | None = None,
        contents: dict[str, Any] | None = None,
    ):
        """Verify the bundle (checksums, files, external data) and load its model.

        Takes the bundle directory, the largest pixel count decode() accepts, optionally the number
        of onnxruntime intra-op threads (None: onnxruntime's default) and, from a caller that has just
        verified the bundle (or is writing one from these files), verify_bundle's result for it: the
        bundle is then not verified again. Raises BundleError when the bundle does not verify, its
        preprocess.json is not usable, or the model does not have one NCHW input.
        """
        self.bundle_dir = Path(bundle_dir)
        contents = contents if contents is not None else verify_bundle(self.bundle_dir)
        self.labels: list[str] = contents["labels"]
        self.preprocess: dict[str, Any] = contents["preprocess"]
        self.metrics: dict[str, Any] = contents["metrics"]
        self.files: dict[str, str] = contents["files"]
        # Temperature scaling fitted at evaluation (calibration.json); 1.0 for a bundle without one.
        self.temperature = float(contents.get("temperature", 1.0))
        # task.json / thresholds.json: a multilabel bundle answers every label over its threshold (sigmoid).
        self.task: str = contents.get("task", "single")
        self.thresholds: dict[str, float] | None = contents.get("thresholds")
        if self.task == "multilabel" and not self.thresholds:
            raise BundleError("multilabel bundle without thresholds.json: its per-label thresholds are missing")
        self.max_pixels = int(max_pixels)
        self._read_preprocess(self.preprocess)

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                str(self.bundle_dir / MODEL_FILE), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load {MODEL_FILE}: {err}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise BundleError(f"{MODEL_FILE} must have one input, has {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.output_name = self.session.get_outputs()[0].name

    def _read_preprocess(self, spec: dict[str, Any]) -> None:
        self.channels = int(spec["channels"])
        if self.channels not in (1, 3):
            raise BundleError(f"preprocess.json: channels must be 1 or 3, got {spec['channels']!r}")
        self.resize = _pair(spec["resize"], "resize")
        self.crop = _pair(spec["crop"], "crop")
        if self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1]:
            raise BundleError("preprocess.json: crop is larger than resize")
        interpolation = spec.get("interpolation", "bilinear")
        if interpolation not in _INTERPOLATIONS:
            raise BundleError(f"preprocess.json: unsupported interpolation {interpolation!r}")
        self.interpolation = _INTERPOLATIONS[interpolation]
        if spec.get("layout", "NCHW") != "NCHW" or spec.get("dtype", "float32") != "float32":
            raise BundleError("preprocess.json: only layout NCHW and dtype float32 are supported")
        mean = np.asarray(spec["mean"], dtype=np.float32)
        std = np.asarray(spec["std"], dtype=np.float32)
        if mean.shape != (self.channels,) or std.shape != (self.channels,) or np.any(std <= 0):
            raise BundleError("preprocess.json: mean and std need one value per channel (std > 0)")
        max_value = float(spec.get("max_pixel_value", 255))
        # Same arithmetic as albumentations' Normalize: (x - mean * max) * (1 / (std * max)).
        self._offset = (mean * max_value).astype(np.float32)
        self._scale = (1.0 / (std * max_value)).astype(np.float32)

    def decode(self, data: bytes) -> np.ndarray:
        """Decode uploaded bytes to a HxWxC uint8 array with the bundle's channel count.

        Takes the bytes; returns the array; raises ImageDecodeError (see decode_image_bytes).
        """
        return decode_image_bytes(data, self.channels, self.max_pixels)

    def preprocess_image(self, image: np.ndarray) -> np.ndarray:
        """Apply the eval preprocessing to one image.

        Takes a HxWxC (or HxW) uint8 array with the bundle's channel count. Returns a float32 CxHxW
        array: resized to `resize` (bilinear), center-cropped to `crop`, normalised with mean/std.
        """
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(f"expected a HxWx{self.channels} image, got shape {image.shape}")
        height, width = self.resize
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=self.interpolation)
            if image.ndim == 2:
                image = image[:, :, None]
        crop_h, crop_w = self.crop
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        image = image[top : top + crop_h, left : left + crop_w]
        normalised = (image.astype(np.float32) - self._offset) * self._scale
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a preprocessed batch.

        Takes a float32 NxCxHxW array. Returns float32 NxL softmax probabilities over the labels, with the
        bundle's temperature applied (softmax(logits / T)): only the first len(labels) output columns are used
        (a multi-task model concatenates the logits of its other tasks after the primary task's).
        """
        logits = self.session.run([self.output_name], {self.input_name: np.asarray(batch, dtype=np.float32)})[0]
        logits = np.asarray(logits).reshape(len(batch), -1)
        if logits.shape[1] < len(self.labels):
            raise RuntimeError(f"model gives {logits.shape[1]} outputs for {len(self.labels)} labels")
        if self.task == "multilabel":  # one independent yes/no per label
            return sigmoid(logits[:, : len(self.labels)])
        return softmax(logits[:, : len(self.labels)] / self.temperature)

    def predict(self, images: list[np.ndarray], top_k: int = 3) -> list[list[dict[str, Any]]]:
        """Classify decoded images in one batch.

        Takes HxWxC uint8 arrays and k. Returns per image [{"label", "probability"}, ...], the top k
        sorted by probability.
        """
        if not images:
            return []
        batch = np.stack([self.preprocess_image(image) for image in images])
        return self.answer(self.probabilities(batch), top_k)

    def answer(self, probabilities: np.ndarray, top_k: int = 3) -> list[list[dict[str, Any]]]:
        """What the server returns for NxL probabilities: the top k per image, or for a multilabel bundle every
        label whose probability is at least its threshold ({"label", "probability", "threshold"}, highest first;
        an empty list when no label passes)."""
        if self.task == "multilabel":
            return labels_over_thresholds(probabilities, self.labels, self.thresholds or {})
        return top_k_predictions(probabilities, self.labels, top_k)

    def predicted_cell(self, probabilities: np.ndarray) -> str:
        """The prediction of one image as a manifest label cell: the top-1 label, or for a multilabel bundle the
        labels over their thresholds joined by ';' ("" for none)."""
        if self.task == "multilabel":
            return ";".join(sorted(entry["label"] for entry in self.answer(probabilities[None, :])[0]))
        return self.labels[int(np.argmax(probabilities))]
