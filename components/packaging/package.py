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
from components.packaging.export import (
    executorch_parity,
    export_executorch,
    export_onnx,
    export_torchscript,
    onnx_parity,
)
from components.training.module import load_classifier

PARITY_IMAGES = 64
PROFILE_MAX_IMAGES = 5000


class PackagingError(VisionflowError):
    """The model cannot be packaged as it is (e.g. the ONNX export does not match PyTorch)."""


class PackagedModel(BaseModel):
    """The packaging result: bundle folder and archive, the ONNX file, parity figures, an input example."""

    model_config = {"arbitrary_types_allowed": True}

    bundle_dir: str
    archive: str
    onnx_path: str
    parity: dict[str, float]
    executorch_parity: dict[str, float] | None = None
    input_example: np.ndarray


def _check_parity(kind: str, parity: dict[str, float], params: PackageParams) -> None:
    if (
        parity["max_abs_logit_diff"] > params.parity_max_abs_diff
        or parity["top1_agreement"] < params.parity_min_agreement
    ):
        raise PackagingError(
            f"{kind} export does not match PyTorch: max |logit diff| {parity['max_abs_logit_diff']:.2e} "
            f"(limit {params.parity_max_abs_diff}), top-1 agreement {parity['top1_agreement']:.4f} "
            f"(limit {params.parity_min_agreement})"
        )


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
    """Export `checkpoint` to ONNX (and, with params.executorch, to an ExecuTorch model.pte put in the
    bundle), check parity on up to 64 test images (raising PackagingError past the thresholds in
    `params`), write and verify the bundle and its .tar.gz under `out_dir`.

    Returns a PackagedModel.
    """
    classifier = load_classifier(checkpoint)
    out_dir = Path(out_dir)
    images, _ = eval_arrays(
        test_rows[:PARITY_IMAGES],
        classifier.classes,
        build_eval_transform(classifier.augment),
        classifier.spec.in_channels,
        max_pixels,
    )
    onnx_path = export_onnx(classifier.model, classifier.spec, out_dir / "export" / "model.onnx")
    parity = onnx_parity(classifier.model, onnx_path, torch.from_numpy(images))
    _check_parity("ONNX", parity, params)
    pte_parity = None
    extra = {"confusion_matrix.png": Path(evaluation.confusion_png_path)}
    if params.executorch:
        try:
            pte_path = export_executorch(classifier.model, classifier.spec, out_dir / "export" / "model.pte")
        except RuntimeError as err:
            raise PackagingError(f"{err} (set package.executorch=false to package without it)") from err
        pte_parity = executorch_parity(classifier.model, pte_path, torch.from_numpy(images))
        _check_parity("ExecuTorch", pte_parity, params)
        extra["model.pte"] = pte_path
    if params.torchscript:
        export_torchscript(classifier.model, classifier.spec, out_dir / "export" / "model.torchscript.pt")
    metrics = {**evaluation.metrics, "onnx_parity": parity, **({"executorch_parity": pte_parity} if pte_parity else {})}
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
        out_dir / "bundle",
        onnx_path,
        classifier.classes,
        eval_preprocess_spec(classifier.augment, classifier.spec.in_channels),
        metrics,
        card,
        extra,
    )
    _add_reference_profile(bundle, test_rows, max_pixels)
    archive = pack_bundle(bundle)
    verify_bundle(bundle)
    return PackagedModel(
        bundle_dir=str(bundle),
        archive=str(archive),
        onnx_path=str(onnx_path),
        parity=parity,
        executorch_parity=pte_parity,
        input_example=images[:1],
    )


def _add_reference_profile(bundle: Path, rows: list[dict[str, str]], max_pixels: int) -> None:
    """Write reference_profile.json (predictions and image statistics on up to PROFILE_MAX_IMAGES test
    images, evenly spaced, through the bundle's own onnxruntime predictor) into the bundle."""
    from components.monitoring.profile import build_reference_profile, write_reference_profile
    from components.serving.predictor import Predictor

    if not rows:
        return
    rows = rows[:: max(1, -(-len(rows) // PROFILE_MAX_IMAGES))]
    predictor = Predictor(bundle, max_pixels=max_pixels)
    channels = int(predictor.preprocess["channels"])
    images = (load_image(r["path"], channels, max_pixels) for r in rows)
    write_reference_profile(bundle, build_reference_profile(predictor, images, [r["label"] for r in rows]))


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
        correct += sum(p[0]["label"] == r["label"] for p, r in zip(predictions, batch, strict=False))
    return correct / max(1, len(rows))
