"""What the evaluation stages hand on: plain pydantic models, importable without torch (the pipeline's process reads
them back from the training process that evaluated, flows/warm_start.call)."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
