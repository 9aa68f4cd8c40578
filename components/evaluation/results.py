"""What the evaluation stages hand on: plain pydantic models, importable without torch (the pipeline's process reads
them back from the training process that evaluated, flows/warm_start.call)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

CALIBRATION_JSON = "calibration.json"
RELIABILITY_PNG = "reliability.png"


class CalibrationResult(BaseModel):
    """The fitted temperature and the calibration error of the evaluated split before and after it."""

    temperature: float = Field(description="T: calibrated probabilities are softmax(logits / T).")
    ece_before: float = Field(description="Expected calibration error (l1) of the evaluated split with T = 1.")
    ece_after: float = Field(description="Expected calibration error (l1) of the evaluated split with T.")
    nll_before: float = Field(description="Negative log-likelihood of the validation split with T = 1.")
    nll_after: float = Field(description="Negative log-likelihood of the validation split with T.")
    num_fitted: int = Field(description="Validation images T was fitted on.")
    bounded: bool = Field(False, description="T hit MIN_TEMPERATURE or MAX_TEMPERATURE.")
    json_path: str | None = None
    png_path: str | None = None


class EvalReport(BaseModel):
    """What the evaluate stage hands on: the summary metrics and where its files are."""

    metrics: dict[str, float]
    metrics_path: str
    per_class_path: str
    confusion_csv_path: str
    confusion_png_path: str
    misclassified_png_path: str | None
    predictions_path: str
    calibration: CalibrationResult | None = None  # temperature scaling, when evaluate.calibrate fitted one
    pr_curves_png_path: str | None = None  # multi-label: precision-recall curve per label
    thresholds_path: str | None = None  # multi-label: thresholds.json, the per-label thresholds tuned on val


class ModelSource(BaseModel):
    """One side of a diff: the run, and the model file that answers for it."""

    run_id: str
    kind: str = Field(description="bundle (a verified bundle folder) or checkpoint (a .ckpt file).")
    path: str
    temperature: float = Field(1.0, description="Checkpoint only: the temperature its evaluation fitted.")
    thresholds: dict[str, float] | None = Field(None, description="Multi-label checkpoint only: its tuned thresholds.")
    task: str = "single"


class DiffResult(BaseModel):
    """What the diff found and where its files are."""

    run_a: str
    run_b: str
    task: str
    num_images: int
    source: str = Field(description="Where the rows came from (a run's split, or a data set).")
    summary_a: dict[str, float]
    summary_b: dict[str, float]
    counts: dict[str, int] = Field(description="Images per change kind: fixed, broken, changed.")
    files: dict[str, str] = Field(description="File name → path of every file written.")
    markdown: str = Field(description="The summary as markdown (also in summary.md).")


class Explanation(BaseModel):
    """One explained image: the file, the model's answer and the PNG drawn for it (None in a grid)."""

    path: str
    predicted: str
    confidence: float
    target: str | None = None
    png: str | None = None


class ExplainResult(BaseModel):
    """What explaining an evaluation produced: the grid (None when skipped), the method used and why it skipped."""

    png_path: str | None = None
    method: str | None = None
    layer: str | None = None
    skipped: str | None = None
    images: list[Explanation] = []


def read_calibration(out_dir: Path) -> CalibrationResult | None:
    """The CalibrationResult written by calibrate() into `out_dir`, or None when there is none."""
    path = Path(out_dir) / CALIBRATION_JSON
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    png = Path(out_dir) / RELIABILITY_PNG
    fields = {k: v for k, v in data.items() if k in CalibrationResult.model_fields}
    return CalibrationResult(**fields, json_path=str(path), png_path=str(png) if png.is_file() else None)


def read_report(out_dir: Path) -> EvalReport:
    """The EvalReport of an evaluation written earlier by write_report into `out_dir`.

    Takes the folder; returns the EvalReport (summary metrics read back from metrics.json).
    Raises FileNotFoundError naming the first of its files that is missing.
    """
    out_dir = Path(out_dir)
    files = {
        name: out_dir / name
        for name in ("metrics.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "predictions.csv")
    }
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"evaluation file missing: {path}")
    misclassified = out_dir / "misclassified.png"
    return EvalReport(
        metrics=json.loads(files["metrics.json"].read_text())["summary"],
        metrics_path=str(files["metrics.json"]),
        per_class_path=str(files["per_class.csv"]),
        confusion_csv_path=str(files["confusion_matrix.csv"]),
        confusion_png_path=str(files["confusion_matrix.png"]),
        misclassified_png_path=str(misclassified) if misclassified.is_file() else None,
        predictions_path=str(files["predictions.csv"]),
        calibration=read_calibration(out_dir),
        pr_curves_png_path=_present(out_dir / "pr_curves.png"),  # multi-label evaluations
        thresholds_path=_present(out_dir / "thresholds.json"),
    )


def _present(path: Path) -> str | None:
    return str(path) if path.is_file() else None
