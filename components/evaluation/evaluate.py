"""Evaluate a checkpoint on manifest rows: predictions, metrics (per task too) and report files."""

from __future__ import annotations

from pathlib import Path

from components.config import EvaluateParams
from components.data.augment import build_eval_transform
from components.data.dataset import eval_loader
from components.data.manifest import ManifestRow
from components.errors import DataError
from components.evaluation.calibration import calibrate
from components.evaluation.metrics import compute_metrics
from components.evaluation.multilabel import evaluate_multilabel
from components.evaluation.predict import predict
from components.evaluation.report import EvalReport, write_report
from components.models.multitask import split_logits
from components.training.module import load_classifier


def evaluate_checkpoint(
    checkpoint: str,
    rows: list[ManifestRow],
    out_dir: Path,
    params: EvaluateParams,
    max_pixels: int,
    calibration_rows: list[ManifestRow] | None = None,
) -> EvalReport:
    """Run the checkpoint over `rows` (manifest rows) with its own eval transform and write the report.

    The report covers the primary task; a multi-task model adds `<task>/accuracy` and
    `<task>/macro_f1` of each extra task to the returned metrics. With `params.calibrate` and
    `calibration_rows` (the validation split), a temperature is fitted on those rows' logits
    (components.evaluation.calibration: calibration.json, reliability.png) and the report's probabilities
    are the calibrated ones. Raises DataError when the rows are empty or carry classes the model does
    not know.
    """
    classifier = load_classifier(checkpoint)
    if classifier.task == "multilabel":  # thresholds tuned on the validation rows, sigmoid metrics
        return evaluate_multilabel(classifier, rows, calibration_rows, Path(out_dir), max_pixels)
    if not rows:
        raise DataError("no images to evaluate")
    unknown = sorted({r["label"] for r in [*rows, *(calibration_rows or [])]} - set(classifier.classes))
    if unknown:
        raise DataError(f"the data has classes the model does not know: {', '.join(unknown[:10])}")

    def run(some_rows: list[ManifestRow]):
        loader = eval_loader(
            some_rows,
            classifier.classes,
            build_eval_transform(classifier.augment),
            classifier.spec.in_channels,
            max_pixels,
            task_classes=classifier.task_classes or None,
        )
        return predict(classifier.model, loader)

    logits, targets = run(rows)
    extra: dict[str, float] = {}
    if classifier.task_classes:
        parts = split_logits(logits, classifier.spec.task_sizes())
        for i, (task, names) in enumerate(classifier.task_classes.items(), start=1):
            summary = compute_metrics(parts[i], targets[:, i], names, top_k=1)["summary"]
            extra[f"{task}/accuracy"] = summary["accuracy"]
            extra[f"{task}/macro_f1"] = summary["macro_f1"]
        logits, targets = parts[0], targets[:, 0]
    calibration = None
    if params.calibrate and calibration_rows:
        val_logits, val_targets = run(calibration_rows)
        if classifier.task_classes:
            val_logits, val_targets = split_logits(val_logits, classifier.spec.task_sizes())[0], val_targets[:, 0]
        calibration = calibrate(val_logits, val_targets, logits, targets, Path(out_dir), params.calibration_bins)
        logits = logits / calibration.temperature
    report = write_report(
        logits,
        targets,
        classifier.classes,
        [r["path"] for r in rows],
        Path(out_dir),
        params,
        classifier.spec.in_channels,
        max_pixels,
    )
    report.metrics.update(extra)
    report.calibration = calibration
    return report
