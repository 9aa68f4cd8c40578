"""Measure every compression variant the same way (onnxruntime on CPU, same test array), gate it
against the reference and write the comparison table and trade-off plot."""

from __future__ import annotations

import csv
import math
import statistics
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel

from components.evaluation.metrics import compute_metrics
from components.packaging.export import INPUT_NAME, check_onnx_file


class VariantResult(BaseModel):
    """One compressed (or reference) model, measured on the test split."""

    name: str
    method: str
    artifact: str
    size_bytes: int
    params: int | None = None
    macs: int | None = None
    accuracy: float
    macro_f1: float
    latency_b1_ms: float
    latency_b32_ms: float
    threads: int
    accuracy_drop: float = 0.0
    accepted: bool = True
    note: str = ""
    machine: str = ""  # machine_summary(threads) of the machine that measured it


def unmade_variant(name: str, method: str, reason: str, threads: int) -> VariantResult:
    """The row of a variant that could not be made (a model torch-pruning or onnxruntime cannot handle): no
    file, NaN figures, never accepted, the reason in its note."""
    nan = float("nan")
    return VariantResult(
        name=name,
        method=method,
        artifact="",
        size_bytes=0,
        accuracy=nan,
        macro_f1=nan,
        latency_b1_ms=nan,
        latency_b32_ms=nan,
        threads=threads,
        accepted=False,
        note=f"not made: {reason}",
    )


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo, or "unknown CPU" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


# The CPU flags that decide how fast int8 runs (AMX and VNNI multiply int8 in hardware; plain AVX2 / AVX-512
# must widen to 16 bits), in the order they are printed.
INT8_FLAGS = ("amx_int8", "amx_tile", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "asimddp", "i8mm")


def int8_instruction_sets() -> list[str]:
    """Which of INT8_FLAGS this CPU reports in /proc/cpuinfo (empty where there is none)."""
    from components.optimization.quantize import cpu_flags

    flags = cpu_flags()
    return [f for f in INT8_FLAGS if f in flags]


def machine_summary(threads: int) -> str:
    """One line naming the machine a latency was measured on: CPU model, int8 instruction sets,
    onnxruntime version and intra-op threads."""
    import onnxruntime as ort

    isa = ", ".join(int8_instruction_sets()) or "none found"
    return f"{cpu_model()}; int8 instruction sets: {isa}; onnxruntime {ort.__version__}; {threads} thread(s)"


def _session(onnx_path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _median_ms(session, batch: np.ndarray, repeats: int, warmup: int) -> float:
    feed = {INPUT_NAME: batch}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(times))


def measure_onnx(
    onnx_path: Path,
    images: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, float | int]:
    """Accuracy, macro F1, file size and latency of an ONNX classifier on onnxruntime's CPU provider.

    Takes the .onnx path, the test images (N, C, S, S) float32 already normalised, their class
    indices (N,), the class names, the intra-op thread count, and the timed runs and untimed
    warm-up runs per latency figure. Metrics come from compute_metrics on the logits of the whole
    array (of concatenated multi-task logits only the first len(classes) columns count). Latency
    is the median wall time of one run at batch 1 (the first image) and at batch 32 (test images
    repeated to fill it). Returns {"accuracy", "macro_f1", "size_bytes", "latency_b1_ms",
    "latency_b32_ms"} (the VariantResult fields of the same names).
    """
    onnx_path = Path(onnx_path)
    images = np.ascontiguousarray(images, dtype=np.float32)
    if len(images) == 0:
        raise ValueError("no test images to measure on")
    check_onnx_file(onnx_path)
    session = _session(onnx_path, threads)
    logits = np.concatenate(
        [session.run(None, {INPUT_NAME: images[i : i + 256]})[0] for i in range(0, len(images), 256)]
    )[:, : len(classes)]
    summary = _summary(torch.from_numpy(logits), torch.as_tensor(np.asarray(targets)), classes)
    batch32 = np.ascontiguousarray(np.resize(images, (32, *images.shape[1:])))
    return {
        "accuracy": summary["accuracy"],
        "macro_f1": summary["macro_f1"],
        "size_bytes": onnx_path.stat().st_size,
        "latency_b1_ms": _median_ms(session, images[:1], repeats, warmup),
        "latency_b32_ms": _median_ms(session, batch32, repeats, warmup),
    }


def _summary(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of test logits; for multi-label 0/1 targets (N, L) the gate's figure is the macro
    average precision (mAP, threshold-free) in "accuracy", and macro F1 at 0.5."""
    if targets.ndim == 2:
        from components.evaluation.multilabel import compute_multilabel_metrics

        summary = compute_multilabel_metrics(logits, targets, classes, [0.5] * len(classes))["summary"]
        return {"accuracy": summary["map"], "macro_f1": summary["macro_f1"]}
    return compute_metrics(logits, targets, classes)["summary"]


def gate(variants: list[VariantResult], reference: str, tolerance: float) -> list[VariantResult]:
    """Judge each variant against the one named `reference`: accuracy_drop = reference accuracy −
    variant accuracy, accepted = drop <= tolerance (the reference itself has drop 0, accepted).

    Takes the variants, the reference's name and the largest accepted drop (fraction, 0.01 = one
    point). Returns new VariantResults in the same order; raises ValueError when no variant has
    the reference's name."""
    base = next((v for v in variants if v.name == reference), None)
    if base is None:
        raise ValueError(f"no variant named {reference!r} to gate against (have {[v.name for v in variants]})")
    gated = []
    for v in variants:
        drop = base.accuracy - v.accuracy
        # A hair of slack so that a drop equal to the tolerance is not lost to float rounding; NaN (a variant
        # that could not be made) is never accepted.
        gated.append(v.model_copy(update={"accuracy_drop": drop, "accepted": bool(drop <= tolerance + 1e-12)}))
    return gated


def slower_than(variant: VariantResult, reference: VariantResult) -> list[str]:
    """The batch sizes at which `variant` ran slower than `reference`, as short phrases (empty: never slower)."""
    return [
        f"batch {batch}: {mine:.2f} ms against {theirs:.2f} ms {reference.name}"
        for batch, mine, theirs in (
            (1, variant.latency_b1_ms, reference.latency_b1_ms),
            (32, variant.latency_b32_ms, reference.latency_b32_ms),
        )
        if mine > theirs
    ]


def best_variant(
    variants: list[VariantResult],
    objective: Literal["smallest", "fastest"],
    reference: VariantResult | None = None,
) -> VariantResult | None:
    """The accepted variant with the smallest file ("smallest") or the lowest batch-1 latency
    ("fastest"); ties go to the higher accuracy. Returns None when none is accepted.

    With the `reference` measured on the same machine, a variant slower than it at batch 1 or 32 is
    never chosen as "fastest", and "smallest" takes it only when no accepted variant is as fast as
    the reference (a smaller file that runs slower is rarely what a user wants)."""
    accepted = [v for v in variants if v.accepted]
    if reference is not None:
        quick = [v for v in accepted if not slower_than(v, reference)]
        accepted = quick if objective == "fastest" or quick else accepted
    if not accepted:
        return None
    if objective == "smallest":
        return min(accepted, key=lambda v: (v.size_bytes, -v.accuracy))
    if objective == "fastest":
        return min(accepted, key=lambda v: (v.latency_b1_ms, -v.accuracy))
    raise ValueError(f"objective must be 'smallest' or 'fastest', got {objective!r}")


_COLUMNS = [
    ("name", "variant"),
    ("method", "method"),
    ("accuracy", "accuracy"),
    ("accuracy_drop", "drop"),
    ("macro_f1", "macro F1"),
    ("size_bytes", "size"),
    ("params", "params"),
    ("macs", "MACs"),
    ("latency_b1_ms", "latency b1 (ms)"),
    ("latency_b32_ms", "latency b32 (ms)"),
    ("accepted", "accepted"),
    ("note", "note"),
]


def _human(n: int | None, unit: str = "") -> str:
    if n is None:
        return "–"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n} {unit}".strip()


def _markdown_cell(v: VariantResult, field: str) -> str:
    value = getattr(v, field)
    if field in ("accuracy", "macro_f1"):
        return f"{value:.4f}"
    if field == "accuracy_drop":
        return f"{value * 100:+.2f} pt"
    if field == "size_bytes":
        return _human(value, "B")
    if field in ("params", "macs"):
        return _human(value)
    if field.startswith("latency"):
        return f"{value:.3f}"
    if field == "accepted":
        return "yes" if value else "**no**"
    return str(value).replace("|", "\\|")


def write_comparison(variants: list[VariantResult], out_dir: Path) -> tuple[Path, Path, Path]:
    """Write the comparison of `variants` into `out_dir` (created): comparison.csv (every
    VariantResult field, one row per variant), comparison.md (a line naming the machine: CPU model,
    int8 instruction sets, onnxruntime version and threads, then a markdown table, one row per
    variant) and tradeoff.png (accuracy against batch-1 latency, marker area proportional to file
    size, each point labelled, accepted variants filled and rejected ones hollow red).
    Returns (csv path, markdown path, png path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "tradeoff.png"

    fields = list(VariantResult.model_fields)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for v in variants:
            writer.writerow(v.model_dump())

    threads = sorted({v.threads for v in variants})
    machines = sorted({v.machine for v in variants if v.machine}) or [machine_summary(threads[0] if threads else 1)]
    lines = [
        f"Measured with onnxruntime (CPU provider) on {'; '.join(machines)}; latency is the median per run.",
        "",
        "| " + " | ".join(title for _, title in _COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_markdown_cell(v, field) for field, _ in _COLUMNS) + " |" for v in variants]
    md_path.write_text("\n".join(lines) + "\n")

    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=110)
    axes = figure.subplots()
    variants = [v for v in variants if math.isfinite(v.latency_b1_ms) and math.isfinite(v.accuracy)]  # made ones
    largest = max((v.size_bytes for v in variants), default=1) or 1
    for accepted, style in (
        (True, {"color": "tab:blue", "label": "accepted"}),
        (False, {"facecolors": "none", "edgecolors": "tab:red", "label": "rejected"}),
    ):
        chosen = [v for v in variants if v.accepted == accepted]
        if chosen:
            axes.scatter(
                [v.latency_b1_ms for v in chosen],
                [v.accuracy for v in chosen],
                s=[30 + 1200 * v.size_bytes / largest for v in chosen],
                alpha=0.6,
                linewidths=1.5,
                **style,
            )
    for v in variants:
        axes.annotate(
            f"{v.name}\n{_human(v.size_bytes, 'B')}",
            (v.latency_b1_ms, v.accuracy),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
        )
    axes.set_xlabel(f"latency at batch 1 (ms, {', '.join(map(str, threads))} thread(s))")
    axes.set_ylabel("test accuracy")
    axes.set_title("Compression trade-off (marker area ∝ file size)")
    axes.grid(True, alpha=0.3)
    if variants:
        axes.legend(loc="lower right", markerscale=0.4)
    figure.tight_layout()
    figure.savefig(png_path)
    return csv_path, md_path, png_path
