"""A real bundle over scikit-learn's bundled digits, cheap to build (about a second): a multinomial
logistic regression on the 8x8 pixels, written as a two-node ONNX graph (Flatten, Gemm), with the
reference profile computed on a held-out part. Used by the monitoring tests."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from components.config import AugmentParams
from components.data.augment import eval_preprocess_spec
from components.monitoring.profile import build_reference_profile, write_reference_profile
from components.packaging.bundle import write_bundle
from components.packaging.model_card import model_card

LABELS = [str(d) for d in range(10)]


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8, 1) uint8 images (scaled like the bundled:digits source) and their int labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(data.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    return images, data.target.astype(int)


def split(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one deterministic part: train (3/5), reference (1/5) or heldout (1/5)."""
    images, labels = digits()
    index = np.random.default_rng(0).permutation(len(images)) % 5
    mask = {"train": index < 3, "reference": index == 3, "heldout": index == 4}[part]
    return images[mask], labels[mask]


def _features(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5).reshape(len(images), -1)


def _onnx_model(weights: np.ndarray, bias: np.ndarray, path: Path) -> Path:
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "b"], ["logits"], transB=1),
        ],
        "digits_logreg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@functools.lru_cache(maxsize=1)
def digits_bundle() -> Path:
    """A verified bundle with reference_profile.json, built once per test session (treat as read-only)."""
    from sklearn.linear_model import LogisticRegression

    from components.serving.predictor import Predictor

    folder = Path(tempfile.mkdtemp(prefix="visionflow-digits-"))
    train_x, train_y = split("train")
    classifier = LogisticRegression(max_iter=300).fit(_features(train_x), train_y)
    onnx_path = _onnx_model(classifier.coef_, classifier.intercept_, folder / "model.onnx")
    preprocess = eval_preprocess_spec(AugmentParams(image_size=8, mean=[0.5], std=[0.5]), 1)
    reference_x, reference_y = split("reference")
    accuracy = float(classifier.score(_features(reference_x), reference_y))
    metrics = {"accuracy": accuracy}
    card = model_card(
        "digits-logreg", "bundled:digits", "test", {"train": len(train_x), "test": len(reference_x)}, metrics
    )
    bundle = write_bundle(folder / "bundle", onnx_path, LABELS, preprocess, metrics, card)
    profile = build_reference_profile(Predictor(bundle), list(reference_x), [str(y) for y in reference_y])
    write_reference_profile(bundle, profile)
    return bundle
