"""Classification metrics of a test set, computed with torchmetrics (nothing hand-written)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)


def compute_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    top_k: int = 3,
    calibration_bins: int = 15,
) -> dict[str, Any]:
    """Compute the test-set metrics from raw model outputs.

    Takes logits (N, C) (unnormalized; softmax is applied here), integer targets (N,), the C
    class names in index order, k of the top-k accuracy (clipped to C) and the number of bins
    of the calibration error. Two classes are still treated as multiclass.

    Returns a JSON-ready dict:
      "summary": {"accuracy", f"top{k}_accuracy" (k after clipping), "macro_precision",
                  "macro_recall", "macro_f1", "ece" (l1 expected calibration error),
                  "num_samples"} as Python floats / int;
      "per_class": [{"class", "precision", "recall", "f1", "support"}] in class order;
      "confusion_matrix": C x C list of int lists, rows = true class, columns = predicted.
    A class that is never predicted or never a target scores 0 (torchmetrics zero_division=0)
    instead of NaN; torchmetrics' macro averages leave out classes with no true positive, false
    positive or false negative at all (absent from both targets and predictions).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    num_samples, num_classes = logits.shape
    if num_classes != len(classes):
        raise ValueError(f"logits have {num_classes} columns but {len(classes)} class names were given")
    if num_classes < 2:
        raise ValueError("at least two classes are needed")
    targets = targets.reshape(-1).long()
    if targets.shape[0] != num_samples:
        raise ValueError(f"{num_samples} logits rows but {targets.shape[0]} targets")
    if num_samples == 0:
        raise ValueError("no samples to evaluate")
    if top_k < 1:
        raise ValueError("top_k must be >= 1")

    # Explicit softmax: torchmetrics only softmaxes inputs outside [0, 1], so logits that happen
    # to lie in [0, 1] would otherwise be taken for probabilities by the calibration error.
    probs = torch.softmax(logits.detach().float().cpu(), dim=1)
    targets = targets.detach().cpu()
    k = min(top_k, num_classes)
    common = {"num_classes": num_classes}

    accuracy = multiclass_accuracy(probs, targets, average="micro", **common)
    topk = multiclass_accuracy(probs, targets, average="micro", top_k=k, **common)
    prf = {}
    for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score)):
        prf[name] = (
            fn(probs, targets, average="macro", zero_division=0, **common),
            fn(probs, targets, average="none", zero_division=0, **common),
        )
    ece = multiclass_calibration_error(probs, targets, n_bins=calibration_bins, norm="l1", **common)
    confusion = multiclass_confusion_matrix(probs, targets, **common)
    support = confusion.sum(dim=1)

    summary = {
        "accuracy": float(accuracy),
        f"top{k}_accuracy": float(topk),
        "macro_precision": float(prf["precision"][0]),
        "macro_recall": float(prf["recall"][0]),
        "macro_f1": float(prf["f1"][0]),
        "ece": float(ece),
        "num_samples": int(num_samples),
    }
    per_class = [
        {
            "class": name,
            "precision": float(prf["precision"][1][i]),
            "recall": float(prf["recall"][1][i]),
            "f1": float(prf["f1"][1][i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    ]
    return {"summary": summary, "per_class": per_class, "confusion_matrix": confusion.tolist()}
