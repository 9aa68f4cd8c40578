"""Run comparison: which params differ between runs, the metric columns to show, a comparison plot.

Takes the plain run dicts of `tracking.recent_runs` (run_id, run_name, status, duration_s, params,
metrics, tags); no MLflow calls here.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

DEFAULT_METRICS = ("test/accuracy", "test/macro_f1")
# Runs of multi-label models (data.task multilabel) are compared by mAP and macro F1 first (their test/accuracy is
# the exact-match ratio).
MULTILABEL_METRICS = ("test/map", "test/macro_f1", "test/accuracy")
# Params worth showing first when they differ; any other differing param follows.
PREFERRED_PARAMS = (
    "model.name",
    "train.optimizer",
    "train.lr",
    "train.max_epochs",
    "train.batch_size",
    "augment.image_size",
    "data.path",
    "multitask.mode",
)
# Params that differ between any two runs without saying anything about the model.
_NOISE_PARAMS = ("run.", "train.resume", "train.progress_bar")


def varying_params(runs: list[dict[str, Any]], limit: int = 6) -> list[str]:
    """The param names whose values differ across `runs` (preferred names first), at most `limit`."""
    names = set().union(*(r["params"] for r in runs)) if runs else set()
    differing = [n for n in names if not n.startswith(_NOISE_PARAMS) and len({r["params"].get(n) for r in runs}) > 1]
    ordered = [n for n in PREFERRED_PARAMS if n in differing] + sorted(
        n for n in differing if n not in PREFERRED_PARAMS
    )
    return ordered[:limit]


def metric_columns(runs: list[dict[str, Any]], metric: str | None = None) -> list[str]:
    """The metric columns of a comparison: `metric` first (when given), then the default test metrics present
    (mAP and macro F1 first when a run is multi-label, i.e. has test/map)."""
    present = set().union(*(r["metrics"] for r in runs)) if runs else set()
    columns = [metric] if metric else []
    defaults = MULTILABEL_METRICS if "test/map" in present else DEFAULT_METRICS
    columns += [m for m in defaults if m in present and m not in columns]
    return columns


def run_label(run: dict[str, Any], params: list[str]) -> str:
    """A short label for plots: the run name and the values of the differing params."""
    values = ", ".join(f"{p.rsplit('.', 1)[-1]}={run['params'].get(p, '-')}" for p in params[:3])
    return f"{run['run_name'] or run['run_id'][:8]}" + (f" ({values})" if values else "")


def grid_combinations(grid: list[str]) -> list[list[str]]:
    """Expand `KEY=V1,V2` grid entries into the list of override lists of their cartesian product.

    Values are split at commas outside brackets, so `augment.mean=[0.5],[0.4]` gives two values.
    Raises ValueError for an entry without `=`, with no values, or a key given twice.
    """
    axes: list[list[str]] = []
    keys: list[str] = []
    for entry in grid:
        key, sep, values = entry.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"invalid --grid {entry!r}: expected KEY=V1,V2,... e.g. train.optimizer=sgd,adam")
        if key in keys:
            raise ValueError(f"--grid names {key} twice")
        choices = _split_top_level(values)
        if not choices:
            raise ValueError(f"invalid --grid {entry!r}: no values after '='")
        keys.append(key)
        axes.append([f"{key}={v}" for v in choices])
    return [list(combo) for combo in itertools.product(*axes)] if axes else []


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


def comparison_plot(runs: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """A horizontal bar chart of `metric` per run (oldest at the top), labelled by the differing params;
    returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = varying_params(runs)
    shown = [r for r in reversed(runs) if metric in r["metrics"]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(shown), 2) + 1.2))
    labels = [run_label(r, params) for r in shown]
    values = [r["metrics"][metric] for r in shown]
    bars = ax.barh(range(len(shown)), values, color="#4c72b0")
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(f"{metric} by run")
    for bar, value in zip(bars, values, strict=False):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.4f}", va="center", fontsize=8)
    if values:
        ax.set_xlim(0, max(values) * 1.15 or 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
