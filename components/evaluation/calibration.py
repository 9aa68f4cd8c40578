"""Calibrated probabilities: temperature scaling (Guo et al. 2017) fitted on the validation split's logits,
the expected calibration error (torchmetrics) and reliability diagrams before and after.

One scalar T > 0 divides every logit before the softmax: the predicted class (argmax) and so the accuracy
never change, only how sure the probabilities say the model is. T is fitted by L-BFGS on the negative
log-likelihood of the validation split (over log T, so T stays positive) and kept within
[MIN_TEMPERATURE, MAX_TEMPERATURE]: a validation split the model gets all right would otherwise drive T
towards 0 (every probability 1.0); one without any wrong answer keeps T = 1 (nothing to fit on).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from components.evaluation.results import CALIBRATION_JSON, RELIABILITY_PNG, CalibrationResult

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) against integer `targets` (L-BFGS over log T),
    clipped to [MIN_TEMPERATURE, MAX_TEMPERATURE]. Rows without a single wrong answer leave T = 1: their NLL
    only falls as T shrinks, which would turn every probability into 1.0. Raises ValueError without rows."""
    logits = logits.detach().float().cpu().clone()  # a copy: predict's logits are inference tensors (no autograd)
    targets = targets.detach().reshape(-1).long().cpu().clone()
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"need (N, C) logits and N targets, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if bool((logits.argmax(dim=1) == targets).all()):
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.clamp(low, high).exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    value = float(log_t.detach().clamp(low, high).exp())
    return value if math.isfinite(value) else 1.0


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """torchmetrics' multiclass expected calibration error (l1 norm, `bins` equal-width confidence bins)."""
    probs = probs.detach().float().cpu()
    return float(
        multiclass_calibration_error(probs, targets.reshape(-1).long().cpu(), probs.shape[1], n_bins=bins, norm="l1")
    )


def reliability_bins(probs: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """The reliability curve of top-1 confidences: per equal-width bin of (0, 1], the mean confidence, the
    accuracy and the count (bins without images are left out). Takes each image's confidence (N,) or the (N, C)
    probabilities, and whether its prediction was right (N,)."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1) if probs.ndim == 2 else probs
    correct = np.asarray(correct, dtype=np.float64).reshape(-1)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # torchmetrics' right-closed bins
    curve: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        members = index == b
        if members.any():
            curve["confidence"].append(float(confidence[members].mean()))
            curve["accuracy"].append(float(correct[members].mean()))
            curve["count"].append(float(members.sum()))
    return curve


def write_reliability_png(panels: list[tuple[str, list[tuple[str, dict]]]], path: Path) -> Path:
    """Reliability diagrams side by side: one panel per (title, [(curve label, reliability_bins dict), ...]),
    each with the diagonal of perfect calibration and marker sizes following the bin counts. Returns path."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, curves) in zip(axes, panels, strict=True):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
        for label, curve in curves:
            counts = np.asarray(curve["count"], dtype=float)
            sizes = 12 + 60 * counts / max(1.0, counts.max()) if counts.size else 12
            (line,) = ax.plot(curve["confidence"], curve["accuracy"], linewidth=1.5, label=label)
            ax.scatter(curve["confidence"], curve["accuracy"], s=sizes, zorder=3, color=line.get_color())
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (top-1)", ylabel="accuracy", title=title)
        ax.legend(fontsize=7, loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits.float() / temperature, targets.reshape(-1).long()))


def calibrate(
    val_logits: torch.Tensor,
    val_targets: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    out_dir: Path,
    bins: int = 15,
) -> CalibrationResult:
    """Fit T on the validation logits and measure the evaluated split (`logits`, `targets`) before and after.

    Writes calibration.json (the result and both reliability curves) and reliability.png (the evaluated
    split's reliability diagram with T = 1 and with T) into `out_dir`; returns the CalibrationResult.
    """
    temperature = fit_temperature(val_logits, val_targets)
    targets = targets.reshape(-1).long()
    correct = (logits.argmax(dim=1) == targets).numpy()
    before, after = torch.softmax(logits.float(), 1), torch.softmax(logits.float() / temperature, 1)
    result = CalibrationResult(
        temperature=temperature,
        ece_before=expected_calibration_error(before, targets, bins),
        ece_after=expected_calibration_error(after, targets, bins),
        nll_before=_nll(val_logits, val_targets, 1.0),
        nll_after=_nll(val_logits, val_targets, temperature),
        num_fitted=int(val_logits.shape[0]),
        bounded=not MIN_TEMPERATURE < temperature < MAX_TEMPERATURE,
    )
    curves = {
        "before": reliability_bins(before.numpy(), correct, bins),
        "after": reliability_bins(after.numpy(), correct, bins),
    }
    out_dir = Path(out_dir)
    png = write_reliability_png(
        [
            (f"T = 1 (ECE {result.ece_before:.3f})", [("uncalibrated", curves["before"])]),
            (f"T = {temperature:.3g} (ECE {result.ece_after:.3f})", [("temperature scaled", curves["after"])]),
        ],
        out_dir / RELIABILITY_PNG,
    )
    result.json_path, result.png_path = str(out_dir / CALIBRATION_JSON), str(png)
    payload: dict[str, Any] = {**result.model_dump(exclude={"json_path", "png_path"}), "curves": curves}
    (out_dir / CALIBRATION_JSON).write_text(json.dumps(payload, indent=2))
    return result
