"""The evaluate stage's files: metrics.json, per-class and confusion CSVs, plots, predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.config import DataParams, EvaluateParams
from components.evaluation.metrics import compute_metrics
from components.evaluation.results import EvalReport
from components.image_grid import Cell, image_grid, read_picture

MAX_PIXELS = DataParams.model_fields["max_pixels"].default  # data.max_pixels when the caller has none


def _figure(width: float, height: float):
    # Figure without pyplot renders with Agg on savefig and keeps no global state, so it is
    # safe in threads (Prefect tasks) and never opens a window.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def write_confusion_png(confusion: list[list[int]], classes: list[str], path: Path) -> Path:
    """Draw the confusion matrix (rows true, columns predicted) with its counts.

    Takes the C x C counts, the class names and the PNG path; the figure, fonts and
    annotations scale with C so that 2 to about 50 classes stay readable. Returns path.
    """
    matrix = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    side = min(max(4.5, 0.38 * n + 2.5), 24.0)
    font = max(7.0, min(10.0, 350.0 / n))  # 10 pt up to 35 classes, 7 pt at 50
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    vmax = max(1, int(matrix.max()))
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest", vmin=0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    ax.set_xticks(range(n), labels=classes, fontsize=font)
    for label in ax.get_xticklabels():
        label.set(rotation=45 if n <= 8 else 90, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    threshold = vmax / 2
    for i in range(n):
        for j in range(n):
            value = int(matrix[i, j])
            if value == 0 and n > 20:
                continue  # zeros would only clutter a large matrix
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=font,
                color="white" if value > threshold else "black",
            )
    fig.savefig(path, format="png", dpi=110)
    return path


def write_misclassified_png(
    rows: list[dict[str, Any]], path: Path, limit: int, channels: int = 3, max_pixels: int = MAX_PIXELS
) -> Path | None:
    """Draw up to `limit` misclassified images, most confident mistakes first.

    Takes prediction rows (dicts with path, target, predicted, confidence, correct), the PNG path,
    the limit and the channels the model sees (images are shown as L for 1, RGB for 3). Each
    cell is titled "true → pred (conf)"; an unreadable file is drawn as an empty cell saying so.
    Returns path, or None when nothing is misclassified or limit is 0.
    """
    wrong = [r for r in rows if not r["correct"]]
    if limit <= 0 or not wrong:
        return None
    wrong = sorted(wrong, key=lambda r: -r["confidence"])[:limit]
    captions = [f"{row['target']} → {row['predicted']} ({row['confidence']:.2f})" for row in wrong]
    cells = [
        Cell(read_picture(row["path"], channels, max_pixels), text) for row, text in zip(wrong, captions, strict=True)
    ]
    return image_grid(cells, path, "Most confident mistakes (true → predicted (confidence))")


def write_report(
    logits: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    image_paths: list[str],
    out_dir: Path,
    params: EvaluateParams,
    channels: int,
    max_pixels: int = MAX_PIXELS,
) -> EvalReport:
    """Compute the metrics of a test set and write the evaluate stage's files into out_dir.

    Takes logits (N, C), integer targets (N,), the class names in index order, the N source
    image paths (same order), the output folder (created), the evaluate parameters and the
    number of channels the model sees (the misclassified images are shown in that mode) and data.max_pixels (the
    largest image decoded for that grid).

    Writes metrics.json (compute_metrics' whole dict plus "classes"),
    per_class.csv (class, precision, recall, f1, support), confusion_matrix.csv (header row and
    first column are class names; rows true, columns predicted), confusion_matrix.png,
    predictions.csv (path, target, predicted, confidence: class names and the softmax
    probability of the predicted class) and misclassified.png (see write_misclassified_png).
    Returns an EvalReport with the summary metrics and the file paths.
    """
    if len(image_paths) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {len(image_paths)} image paths")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(logits, targets, classes, top_k=params.top_k, calibration_bins=params.calibration_bins)

    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps({**metrics, "classes": list(classes)}, indent=2))

    per_class_path = out_dir / "per_class.csv"
    with per_class_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(metrics["per_class"])

    confusion_csv = out_dir / "confusion_matrix.csv"
    with confusion_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, counts in zip(classes, metrics["confusion_matrix"], strict=False):
            writer.writerow([name, *counts])
    confusion_png = write_confusion_png(metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png")

    probs = torch.softmax(logits.detach().float().cpu(), dim=1)
    confidence, predicted = probs.max(dim=1)
    rows = [
        {
            "path": str(path),
            "target": classes[int(t)],
            "predicted": classes[int(p)],
            "confidence": float(c),
            "correct": int(t) == int(p),
        }
        for path, t, p, c in zip(
            image_paths, targets.reshape(-1).tolist(), predicted.tolist(), confidence.tolist(), strict=False
        )
    ]
    predictions_path = out_dir / "predictions.csv"
    with predictions_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "target", "predicted", "confidence"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "confidence": f"{r['confidence']:.6f}"} for r in rows)

    misclassified = write_misclassified_png(
        rows, out_dir / "misclassified.png", params.misclassified_grid, channels, max_pixels
    )

    return EvalReport(
        metrics=metrics["summary"],
        metrics_path=str(metrics_path),
        per_class_path=str(per_class_path),
        confusion_csv_path=str(confusion_csv),
        confusion_png_path=str(confusion_png),
        misclassified_png_path=str(misclassified) if misclassified else None,
        predictions_path=str(predictions_path),
    )
