"""Turn a checkpoint into a verified deployment bundle, and score a bundle on manifest rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from components.config import PackageParams
from components.data.augment import build_eval_transform, eval_preprocess_spec
from components.data.dataset import eval_arrays
from components.data.images import load_image
from components.errors import VisionflowError
from components.evaluation.report import EvalReport
from components.packaging.bundle import model_card, pack_bundle, verify_bundle, write_bundle
from components.packaging.export import export_onnx, export_torchscript, onnx_parity
from components.training.module import load_classifier

PARITY_IMAGES = 64


class PackagingError(VisionflowError):
    """The model cannot be packaged as it is (e.g. the ONNX export does not match PyTorch)."""


class PackagedModel(BaseModel):
    """The packaging result: bundle folder and archive, the ONNX file, parity figures, an input example."""

    model_config = {"arbitrary_types_allowed": True}

    bundle_dir: str
    archive: str
    onnx_path: str
    parity: dict[str, float]
    input_example: np.ndarray


def package_checkpoint(
    checkpoint: str,
    test_rows: list[dict[str, str]],
    out_dir: Path,
    params: PackageParams,
    evaluation: EvalReport,
    data_source: str,
    fingerprint: str,
    split_counts: dict[str, int],
    max_pixels: int,
    int8_onnx: str | None = None,
    comparison_md: str | None = None,
) -> PackagedModel:
    """Export `checkpoint` to ONNX, check parity on up to 64 test images (raising PackagingError past
    the thresholds in `params`), write and verify the bundle and its .tar.gz under `out_dir`.

    Returns a PackagedModel.
    """
    classifier = load_classifier(checkpoint)
    out_dir = Path(out_dir)
    images, _ = eval_arrays(
        test_rows[:PARITY_IMAGES], classifier.classes, build_eval_transform(classifier.augment),
        classifier.spec.in_channels, max_pixels,
    )
    onnx_path = export_onnx(classifier.model, classifier.spec, out_dir / "export" / "model.onnx")
    parity = onnx_parity(classifier.model, onnx_path, torch.from_numpy(images))
    if parity["max_abs_logit_diff"] > params.parity_max_abs_diff or parity["top1_agreement"] < params.parity_min_agreement:
        raise PackagingError(
            f"ONNX export does not match PyTorch: max |logit diff| {parity['max_abs_logit_diff']:.2e} "
            f"(limit {params.parity_max_abs_diff}), top-1 agreement {parity['top1_agreement']:.4f} "
            f"(limit {params.parity_min_agreement})"
        )
    if params.torchscript:
        export_torchscript(classifier.model, classifier.spec, out_dir / "export" / "model.torchscript.pt")
    metrics = {**evaluation.metrics, "onnx_parity": parity}
    extra = {"confusion_matrix.png": Path(evaluation.confusion_png_path)}
    if int8_onnx:
        extra["model.int8.onnx"] = Path(int8_onnx)
    card = model_card(
        model_name=params.model_name,
        architecture=classifier.spec.name,
        data_source=data_source,
        fingerprint=fingerprint,
        split_counts=split_counts,
        metrics=evaluation.metrics,
        confusion_matrix_image="confusion_matrix.png",
        compression_table=Path(comparison_md).read_text() if comparison_md else None,
        labels=classifier.classes,
    )
    bundle = write_bundle(
        out_dir / "bundle", onnx_path, classifier.classes,
        eval_preprocess_spec(classifier.augment, classifier.spec.in_channels), metrics, card, extra,
    )
    archive = pack_bundle(bundle)
    verify_bundle(bundle)
    return PackagedModel(
        bundle_dir=str(bundle), archive=str(archive), onnx_path=str(onnx_path), parity=parity,
        input_example=images[:1],
    )


def bundle_accuracy(bundle_dir: Path, rows: list[dict[str, str]], max_pixels: int) -> float:
    """Top-1 accuracy of a bundle (its own preprocessing, onnxruntime) on manifest rows."""
    from components.serving.predictor import Predictor

    predictor = Predictor(Path(bundle_dir))
    channels = int(predictor.preprocess["channels"])
    correct = 0
    for start in range(0, len(rows), 64):
        batch = rows[start : start + 64]
        images = [load_image(r["path"], channels, max_pixels) for r in batch]
        predictions = predictor.predict(images, top_k=1)
        correct += sum(p[0]["label"] == r["label"] for p, r in zip(predictions, batch))
    return correct / max(1, len(rows))
