"""MODEL_CARD.md: what the model is, the data it learnt from, its test metrics, intended use and limits."""

from __future__ import annotations

import math
from typing import Any

from components.bundle_format import CHECKSUMS_FILE, LABELS_FILE, MODEL_FILE, PREPROCESS_FILE


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key in sorted(metrics):
        value = metrics[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, name + "."))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, (int, float)):
            rows.append((name, value))
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            rows.append((name, value.item()))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    lines = ["| " + " | ".join(_fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


DEFAULT_INTENDED_USE = (
    "Classifying images that resemble the training data (same kind of subject, framing, resolution "
    "and colour mode) into one of the listed classes. Outputs are probabilities over the known classes "
    "only; route low-confidence predictions to a person where a mistake matters."
)


DEFAULT_LIMITATIONS = (
    "The model only knows the listed classes and will give one of them for any input, including images "
    "from none of them. Accuracy was measured on a held-out split of the same data source and will be "
    "lower on images from other cameras, scanners, lighting or populations. Probabilities are not "
    "calibrated guarantees. Do not use it for decisions about people without a separate evaluation of "
    "fairness and error costs."
)


def model_card(
    model_name: str,
    data_source: str,
    fingerprint: str,
    split_counts: dict[str, int],
    metrics: dict[str, Any],
    confusion_matrix_image: str | None = None,
    compression_table: str | list[dict[str, Any]] | None = None,
    intended_use: str | None = None,
    limitations: str | None = None,
    labels: list[str] | None = None,
    architecture: str | None = None,
    version: str | None = None,
) -> str:
    """Build the MODEL_CARD.md text.

    Takes the model name, the data source (as given to ingest), the data set fingerprint, image counts
    per split ({"train": n, ...}), the test metrics (scalar numbers are listed, nested dicts with dotted
    names, lists left out), the confusion-matrix image's file name in the bundle (rendered as a
    markdown image), an optional compression comparison (markdown text, or rows as dicts rendered as a
    table), intended-use and limitations paragraphs (defaults when None), and optionally the labels,
    the architecture and a version. Returns the markdown text (no timestamps: the same inputs give the
    same card).
    """
    lines = [f"# Model card: {model_name}", ""]
    if version:
        lines += [f"Version: {version}", ""]
    lines += ["## Model", ""]
    if architecture:
        lines.append(f"- Architecture: {architecture}")
    lines += [
        f"- Format: ONNX ({MODEL_FILE}); preprocessing in {PREPROCESS_FILE}, labels in {LABELS_FILE}",
        f"- Files and their SHA-256 in {CHECKSUMS_FILE}",
    ]
    if labels:
        lines.append(f"- Classes ({len(labels)}): " + ", ".join(f"`{label}`" for label in labels))
    lines += ["", "## Data", "", f"- Source: `{data_source}`", f"- Fingerprint: `{fingerprint}`"]
    if split_counts:
        lines.append("- Images per split: " + ", ".join(f"{k} {v}" for k, v in split_counts.items()))
        lines.append(f"- Total: {sum(split_counts.values())}")
    lines += ["", "## Metrics (test split)", ""]
    rows = _flatten(metrics)
    if rows:
        lines += ["| metric | value |", "|---|---|"] + [f"| {name} | {_fmt(value)} |" for name, value in rows]
    else:
        lines.append("No metrics recorded.")
    if confusion_matrix_image:
        lines += ["", f"![Confusion matrix]({confusion_matrix_image})"]
    if compression_table:
        table = compression_table if isinstance(compression_table, str) else _table(compression_table)
        lines += ["", "## Compression", "", table.strip()]
    lines += [
        "",
        "## Intended use",
        "",
        (intended_use or DEFAULT_INTENDED_USE).strip(),
        "",
        "## Limitations",
        "",
        (limitations or DEFAULT_LIMITATIONS).strip(),
        "",
    ]
    return "\n".join(lines)
