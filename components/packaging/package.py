"""Turn a checkpoint into a verified deployment bundle, and score a bundle on manifest rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from components.bundle_format import CALIBRATION_FILE, MODEL_FILE, TASK_FILE, THRESHOLDS_FILE, read_checksums
from components.config import PackageParams
from components.data.augment import build_eval_transform, eval_preprocess_spec
from components.data.dataset import eval_arrays
from components.data.images import load_image
from components.data.manifest import ManifestRow
from components.errors import PackagingError
from components.evaluation.multilabel import read_thresholds
from components.evaluation.results import CalibrationResult, EvalReport
from components.monitoring.profile import (
    PROFILE_FILE,
    ReferenceProfile,
    build_reference_profile,
    save_reference_profile,
)
from components.packaging.archive import pack_bundle
from components.packaging.bundle import write_bundle
from components.packaging.export import (
    executorch_parity,
    export_executorch,
    export_onnx,
    export_torchscript,
    onnx_parity,
)
from components.packaging.model_card import model_card
from components.packaging.results import PackagedModel
from components.safety import file_sha256
from components.serving.predictor import Predictor
from components.training.module import Classifier, load_classifier

PARITY_IMAGES = 64
PROFILE_MAX_IMAGES = 5000


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
    test_rows: list[ManifestRow],
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
    `params`), compute the reference profile on the exported model, then write the bundle (verified
    once, as it is written) and its .tar.gz under `out_dir`.

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
        multilabel=classifier.task == "multilabel",
    )
    exported = _export(classifier, torch.from_numpy(images), params, out_dir / "export")
    extra = {"confusion_matrix.png": Path(evaluation.confusion_png_path), **exported.files}
    if int8_onnx:
        extra["model.int8.onnx"] = Path(int8_onnx)
    preprocess = eval_preprocess_spec(classifier.augment, classifier.spec.in_channels)
    temperature = 1.0
    if evaluation.calibration is not None:  # the temperature the evaluation fitted travels with the model
        temperature = evaluation.calibration.temperature
        extra[CALIBRATION_FILE] = _write_calibration(out_dir / "export" / CALIBRATION_FILE, evaluation.calibration)
    thresholds = _multilabel_files(classifier, evaluation, out_dir / "export", extra)
    profile = _reference_profile(
        exported.onnx_path, classifier.classes, preprocess, test_rows, max_pixels, temperature, thresholds
    )
    if profile is not None:
        extra[PROFILE_FILE] = save_reference_profile(out_dir / "export" / PROFILE_FILE, profile)
    metrics = {**evaluation.metrics, "onnx_parity": exported.parity}
    if exported.pte_parity:
        metrics["executorch_parity"] = exported.pte_parity
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
    bundle = write_bundle(out_dir / "bundle", exported.onnx_path, classifier.classes, preprocess, metrics, card, extra)
    if profile is not None and read_checksums(bundle)[MODEL_FILE] != profile.model_sha256:
        raise PackagingError(f"the reference profile was computed on another model than {bundle / MODEL_FILE}")
    archive = pack_bundle(bundle, verify=False)  # write_bundle verified what it wrote
    return PackagedModel(
        bundle_dir=str(bundle),
        archive=str(archive),
        onnx_path=str(exported.onnx_path),
        parity=exported.parity,
        executorch_parity=exported.pte_parity,
        input_example=images[:1],
    )


@dataclass
class _Exported:
    onnx_path: Path
    parity: dict[str, float]
    pte_parity: dict[str, float] | None = None
    files: dict[str, Path] = field(default_factory=dict)  # extra bundle files (model.pte)


def _export(classifier: Classifier, images: torch.Tensor, params: PackageParams, export_dir: Path) -> _Exported:
    """ONNX (as the bundle's model.onnx), and with params the ExecuTorch .pte and TorchScript, each
    checked for parity with PyTorch on `images` (PackagingError past the thresholds)."""
    try:
        path = export_dir / MODEL_FILE
        onnx_path = export_onnx(classifier.model, classifier.spec, path, exporter=params.onnx_exporter)
    except RuntimeError as err:
        hint = "" if params.onnx_exporter == "auto" else "; package.onnx_exporter=auto tries both exporters"
        raise PackagingError(f"{err}{hint}") from err
    exported = _Exported(onnx_path, onnx_parity(classifier.model, onnx_path, images))
    _check_parity("ONNX", exported.parity, params)
    if params.executorch:
        try:
            pte_path = export_executorch(classifier.model, classifier.spec, export_dir / "model.pte")
        except RuntimeError as err:
            raise PackagingError(f"{err} (set package.executorch=false to package without it)") from err
        exported.pte_parity = executorch_parity(classifier.model, pte_path, images)
        _check_parity("ExecuTorch", exported.pte_parity, params)
        exported.files["model.pte"] = pte_path
    if params.torchscript:
        export_torchscript(classifier.model, classifier.spec, export_dir / "model.torchscript.pt")
    return exported


def _write_calibration(path: Path, calibration: CalibrationResult) -> Path:
    """The bundle's calibration.json: the temperature the served probabilities use and how it was fitted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = calibration.model_dump(exclude={"json_path", "png_path"})
    path.write_text(json.dumps({**fields, "method": "temperature scaling", "fitted_on": "val"}, indent=2) + "\n")
    return path


def _reference_profile(
    onnx_path: Path,
    labels: list[str],
    preprocess: dict,
    rows: list[ManifestRow],
    max_pixels: int,
    temperature: float = 1.0,
    thresholds: dict[str, float] | None = None,
) -> ReferenceProfile | None:
    """Predictions and image statistics on up to PROFILE_MAX_IMAGES test images (evenly spaced), through
    onnxruntime and the bundle's own preprocessing and temperature, of the exported model the bundle will
    carry; None without rows."""
    if not rows:
        return None
    rows = rows[:: max(1, -(-len(rows) // PROFILE_MAX_IMAGES))]
    # Not a bundle yet: the predictor is handed what the bundle will hold instead of verifying one.
    files = {MODEL_FILE: file_sha256(onnx_path)}
    contents = {"labels": labels, "preprocess": preprocess, "metrics": {}, "files": files, "temperature": temperature}
    contents.update(task="multilabel" if thresholds else "single", thresholds=thresholds)
    predictor = Predictor(onnx_path.parent, max_pixels=max_pixels, contents=contents)
    channels = int(predictor.preprocess["channels"])
    images = (load_image(r["path"], channels, max_pixels) for r in rows)
    return build_reference_profile(predictor, images, [r["label"] for r in rows])


def _multilabel_files(classifier: Classifier, evaluation: EvalReport, export_dir: Path, extra: dict) -> dict | None:
    """A multi-label model's bundle files, added to `extra`: task.json, thresholds.json (tuned on the validation
    split by the evaluation) and pr_curves.png. Returns {label: threshold}, None for a single-label model. Raises
    PackagingError when the evaluation tuned no thresholds."""
    if classifier.task != "multilabel":
        return None
    if not evaluation.thresholds_path or not Path(evaluation.thresholds_path).is_file():
        raise PackagingError("a multilabel model needs the per-label thresholds its evaluation tuned (thresholds.json)")
    thresholds = read_thresholds(evaluation.thresholds_path)
    export_dir.mkdir(parents=True, exist_ok=True)
    (export_dir / TASK_FILE).write_text(json.dumps({"task": "multilabel", "activation": "sigmoid"}) + "\n")
    extra[TASK_FILE] = export_dir / TASK_FILE
    extra[THRESHOLDS_FILE] = Path(evaluation.thresholds_path)
    if evaluation.pr_curves_png_path:
        extra["pr_curves.png"] = Path(evaluation.pr_curves_png_path)
    return thresholds


def bundle_accuracy(bundle_dir: Path, rows: list[ManifestRow], max_pixels: int) -> float:
    """Top-1 accuracy of a bundle (its own preprocessing, onnxruntime) on manifest rows; for a multilabel bundle
    the registry gate's figure is its macro average precision (mAP) instead."""
    predictor = Predictor(Path(bundle_dir))
    channels = int(predictor.preprocess["channels"])
    if predictor.task == "multilabel":
        return bundle_map(predictor, rows, channels, max_pixels)
    correct = 0
    for start in range(0, len(rows), 64):
        batch = rows[start : start + 64]
        images = [load_image(r["path"], channels, max_pixels) for r in batch]
        predictions = predictor.predict(images, top_k=1)
        correct += sum(p[0]["label"] == r["label"] for p, r in zip(predictions, batch, strict=False))
    return correct / max(1, len(rows))


def bundle_map(predictor: Predictor, rows: list[ManifestRow], channels: int, max_pixels: int) -> float:
    """Macro average precision (torchmetrics) of a multilabel bundle's probabilities on manifest rows."""
    from torchmetrics.functional.classification import multilabel_average_precision

    from components.data.multilabel import multi_hot

    probabilities = []
    for start in range(0, len(rows), 64):
        images = [load_image(r["path"], channels, max_pixels) for r in rows[start : start + 64]]
        probabilities.append(predictor.probabilities(np.stack([predictor.preprocess_image(i) for i in images])))
    targets = torch.from_numpy(multi_hot(rows, predictor.labels)).int()
    return float(
        multilabel_average_precision(torch.from_numpy(np.concatenate(probabilities)), targets, len(predictor.labels))
    )
