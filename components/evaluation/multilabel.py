"""Multi-label evaluation: per-label thresholds tuned on the validation split, torchmetrics' multilabel metrics,
and the report files (per-label table, precision-recall curves, predictions, thresholds.json).

A multi-label model has one sigmoid output per label. Each label's threshold is the one that maximises that
label's F1 on the validation split (from torchmetrics' precision-recall curve; 0.5 for a label without a positive
validation image); the test metrics use these thresholds. `accuracy` is the exact-match ratio (every label of the
image right), so the stages that read an accuracy keep working; the headline figure is `map` (macro average
precision, threshold-free) and the gates compare it.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_hamming_distance,
    multilabel_precision,
    multilabel_precision_recall_curve,
    multilabel_recall,
)

from components.data.manifest import ManifestRow
from components.evaluation.report import EvalReport, _figure

THRESHOLDS_FILE = "thresholds.json"
DEFAULT_THRESHOLD = 0.5


@contextmanager
def _quiet() -> Iterator[None]:
    """torchmetrics warns for a label without a positive target (its recall is undefined): the report says so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No positive samples found in target")
        yield


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per-label thresholds maximising each label's F1 on (validation) probabilities (N, L) and 0/1 targets (N, L).

    Uses torchmetrics' multilabel precision-recall curve; a label without a positive target keeps
    DEFAULT_THRESHOLD. Returns L floats in [0, 1]."""
    probs, targets = probs.float().cpu(), targets.int().cpu()
    with _quiet():
        precision, recall, thresholds = multilabel_precision_recall_curve(probs, targets, num_labels=probs.shape[1])
    tuned = []
    for label in range(probs.shape[1]):
        if int(targets[:, label].sum()) == 0 or len(thresholds[label]) == 0:
            tuned.append(DEFAULT_THRESHOLD)
            continue
        p, r = precision[label][:-1], recall[label][:-1]  # the curve's last point has no threshold
        f1 = torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-12), torch.zeros_like(p))
        tuned.append(float(thresholds[label][int(torch.argmax(f1))]))
    return tuned


def compute_multilabel_metrics(
    logits: torch.Tensor, targets: torch.Tensor, classes: list[str], thresholds: list[float]
) -> dict:
    """The multi-label test metrics from logits (N, L), 0/1 targets (N, L), the label names and thresholds.

    Returns a JSON-ready dict: "summary" {map, micro_f1, macro_f1, macro_precision, macro_recall, hamming_loss,
    accuracy (exact match), num_samples}; "per_class" [{class, ap, precision, recall, f1, threshold, support}];
    "confusion" [{class, tn, fp, fn, tp}] at the thresholds.
    """
    if logits.ndim != 2 or logits.shape != targets.shape or logits.shape[1] != len(classes):
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not fit {len(classes)} labels"
        )
    if logits.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    probs = torch.sigmoid(logits.detach().float().cpu())
    targets = targets.detach().cpu().int()
    predicted = (probs >= torch.tensor(thresholds, dtype=torch.float32)).float()  # 0/1: torchmetrics keeps them
    n = len(classes)
    with _quiet():
        ap = multilabel_average_precision(probs, targets, num_labels=n, average=None)
        per = {
            name: fn(predicted, targets, num_labels=n, average=None, zero_division=0)
            for name, fn in (
                ("precision", multilabel_precision),
                ("recall", multilabel_recall),
                ("f1", multilabel_f1_score),
            )
        }
        summary = {
            "map": float(multilabel_average_precision(probs, targets, num_labels=n, average="macro")),
            "micro_f1": float(multilabel_f1_score(predicted, targets, num_labels=n, average="micro", zero_division=0)),
            "macro_f1": float(per["f1"].mean()),
            "macro_precision": float(per["precision"].mean()),
            "macro_recall": float(per["recall"].mean()),
            "hamming_loss": float(multilabel_hamming_distance(predicted, targets, num_labels=n, average="micro")),
            "accuracy": float(multilabel_exact_match(predicted, targets, num_labels=n)),
            "num_samples": int(logits.shape[0]),
        }
    hits = predicted.int()
    per_class, confusion = [], []
    for i, name in enumerate(classes):
        t, p = targets[:, i], hits[:, i]
        per_class.append(
            {
                "class": name,
                "ap": float(ap[i]),
                "precision": float(per["precision"][i]),
                "recall": float(per["recall"][i]),
                "f1": float(per["f1"][i]),
                "threshold": float(thresholds[i]),
                "support": int(t.sum()),
            }
        )
        confusion.append(
            {
                "class": name,
                "tn": int(((t == 0) & (p == 0)).sum()),
                "fp": int(((t == 0) & (p == 1)).sum()),
                "fn": int(((t == 1) & (p == 0)).sum()),
                "tp": int(((t == 1) & (p == 1)).sum()),
            }
        )
    return {"summary": summary, "per_class": per_class, "confusion": confusion}


def write_pr_curves_png(
    logits: torch.Tensor, targets: torch.Tensor, classes: list[str], per_class: list[dict], path: Path
) -> Path:
    """Draw each label's precision-recall curve (legend: its AP) with its tuned threshold's point marked."""
    probs = torch.sigmoid(logits.detach().float().cpu())
    with _quiet():
        precision, recall, thresholds = multilabel_precision_recall_curve(
            probs, targets.detach().cpu().int(), num_labels=len(classes)
        )
    fig = _figure(6.5, 5.0)
    ax = fig.add_subplot()
    for i, row in enumerate(per_class):
        line = ax.plot(recall[i].numpy(), precision[i].numpy(), label=f"{row['class']} (AP {row['ap']:.3f})")[0]
        ax.plot([row["recall"]], [row["precision"]], "o", color=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.01), title="Precision-recall per label")
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, format="png", dpi=110)
    return path


def write_label_confusion_png(confusion: list[dict], path: Path) -> Path:
    """Per-label counts at the thresholds (rows labels, columns TN FP FN TP) as an annotated heat map."""
    columns = ("tn", "fp", "fn", "tp")
    matrix = np.asarray([[row[c] for c in columns] for row in confusion], dtype=np.int64)
    fig = _figure(5.5, max(2.5, 0.4 * len(confusion) + 1.5))
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues", aspect="auto", vmin=0, vmax=max(1, int(matrix.max())))
    ax.set_xticks(range(4), labels=[c.upper() for c in columns])
    ax.set_yticks(range(len(confusion)), labels=[row["class"] for row in confusion])
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(int(value)), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    ax.set_title("Per-label counts at the tuned thresholds")
    fig.savefig(path, format="png", dpi=110)
    return path


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_multilabel_report(
    logits: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    thresholds: list[float],
    image_paths: list[str],
    out_dir: Path,
    tuned_on: str,
) -> EvalReport:
    """Compute the multi-label metrics of a test set and write the evaluate stage's files into out_dir.

    Writes metrics.json (the metrics plus "classes", "task" and "thresholds"), per_class.csv (class, ap,
    precision, recall, f1, threshold, support), confusion_matrix.csv / .png (per-label TN FP FN TP),
    pr_curves.png, predictions.csv (path, target, predicted: labels joined by ';', probabilities per label)
    and thresholds.json ({"thresholds": {label: t}, "tuned_on": ...}). Returns the EvalReport.
    """
    from components.data.multilabel import join_labels

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = compute_multilabel_metrics(logits, targets, classes, thresholds)
    by_label = dict(zip(classes, thresholds, strict=True))
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(
        json.dumps({**metrics, "classes": classes, "task": "multilabel", "thresholds": by_label}, indent=2)
    )
    thresholds_path = out_dir / THRESHOLDS_FILE
    thresholds_path.write_text(json.dumps({"thresholds": by_label, "tuned_on": tuned_on}, indent=2) + "\n")
    per_class_path = _write_csv(out_dir / "per_class.csv", metrics["per_class"], list(metrics["per_class"][0]))
    confusion_csv = _write_csv(
        out_dir / "confusion_matrix.csv", metrics["confusion"], ["class", "tn", "fp", "fn", "tp"]
    )
    confusion_png = write_label_confusion_png(metrics["confusion"], out_dir / "confusion_matrix.png")
    pr_png = write_pr_curves_png(logits, targets, classes, metrics["per_class"], out_dir / "pr_curves.png")
    probs = torch.sigmoid(logits.detach().float().cpu()).numpy()
    limits = np.asarray(thresholds)
    rows = [
        {
            "path": str(path),
            "target": join_labels([c for c, t in zip(classes, truth, strict=True) if t > 0.5]),
            "predicted": join_labels([c for c, on in zip(classes, p >= limits, strict=True) if on]),
            **{f"p_{c}": f"{v:.6f}" for c, v in zip(classes, p, strict=True)},
        }
        for path, truth, p in zip(image_paths, targets.detach().cpu().tolist(), probs, strict=True)
    ]
    predictions_path = _write_csv(
        out_dir / "predictions.csv", rows, ["path", "target", "predicted", *(f"p_{c}" for c in classes)]
    )
    return EvalReport(
        metrics=metrics["summary"],
        metrics_path=str(metrics_path),
        per_class_path=str(per_class_path),
        confusion_csv_path=str(confusion_csv),
        confusion_png_path=str(confusion_png),
        misclassified_png_path=None,
        predictions_path=str(predictions_path),
        pr_curves_png_path=str(pr_png),
        thresholds_path=str(thresholds_path),
    )


def evaluate_multilabel(
    classifier, rows: list[ManifestRow], val_rows: list[ManifestRow] | None, out_dir: Path, max_pixels: int
) -> EvalReport:
    """Evaluate a multi-label Classifier on `rows`, with thresholds tuned on `val_rows` (DEFAULT_THRESHOLD for
    every label without them). Raises DataError for a label the model does not know."""
    from components.data.augment import build_eval_transform
    from components.data.dataset import eval_loader
    from components.errors import DataError
    from components.evaluation.predict import predict

    if not rows:
        raise DataError("no images to evaluate")

    def run(some_rows: list[ManifestRow]) -> tuple[torch.Tensor, torch.Tensor]:
        transform = build_eval_transform(classifier.augment)
        loader = eval_loader(
            some_rows, classifier.classes, transform, classifier.spec.in_channels, max_pixels, multilabel=True
        )
        logits, targets = predict(classifier.model, loader)
        return logits[:, : len(classifier.classes)], targets

    logits, targets = run(rows)
    thresholds = [DEFAULT_THRESHOLD] * len(classifier.classes)
    if val_rows:
        val_logits, val_targets = run(val_rows)
        thresholds = tune_thresholds(torch.sigmoid(val_logits), val_targets)
    tuned_on = f"val ({len(val_rows)} images)" if val_rows else "none (default 0.5)"
    return write_multilabel_report(
        logits, targets, classifier.classes, thresholds, [r["path"] for r in rows], out_dir, tuned_on
    )


def read_thresholds(path: str | Path) -> dict[str, float]:
    """{label: threshold} of a thresholds.json written by write_multilabel_report."""
    return {str(k): float(v) for k, v in json.loads(Path(path).read_text())["thresholds"].items()}
