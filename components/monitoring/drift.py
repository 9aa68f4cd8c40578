"""Drift tests of a prediction-log window against the bundle's reference profile.

- class distribution: population stability index (PSI) of the predicted classes, with a chi-square
  test of the same counts (scipy.stats.chi2_contingency) reported beside it;
- confidence: drop of the mean top-1 probability;
- image and prediction statistics: two-sample Kolmogorov-Smirnov tests (scipy.stats.ks_2samp); a
  statistic drifts when its p-value is below ks_pvalue divided by the number of statistics tested
  (Bonferroni) and its KS distance is at least ks_min_statistic;
- live accuracy: from a feedback CSV of id,label joined to the logged prediction ids.

Every check says whether it could be computed and, when not, why; the report lists both.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field
from scipy import stats

from components.config import MonitorParams
from components.monitoring.image_stats import IMAGE_STATISTICS, PREDICTION_STATISTICS
from components.monitoring.prediction_log import read_prediction_log
from components.monitoring.profile import ReferenceProfile

PSI_FLOOR = 1e-4  # smallest share used in PSI, so a class absent on one side gives a large, finite value
MAX_LISTED_PROBLEMS = 20

CheckKind = Literal["class_distribution", "confidence", "image_statistic", "prediction_statistic", "accuracy"]


class Check(BaseModel):
    """One drift test: computed or not (and why), its value against its threshold, drifted or not."""

    name: str
    kind: CheckKind
    computed: bool
    drifted: bool = False
    value: float | None = Field(None, description="PSI, confidence drop, KS distance or accuracy drop.")
    threshold: float | None = None
    p_value: float | None = None
    reason: str | None = Field(None, description="Why the check was not computed, or could not decide.")
    details: dict[str, Any] = {}


class WindowSummary(BaseModel):
    """Which log records were compared, and which were left out."""

    log_dir: str
    files: int = 0
    records_read: int = 0
    predictions: int = 0
    excluded_other_model: int = 0
    other_models: dict[str, int] = {}
    malformed_lines: int = 0
    errors_by_kind: dict[str, int] = {}
    first: str | None = None
    last: str | None = None


class FeedbackSummary(BaseModel):
    """What a feedback CSV held and how much of it joined the window."""

    path: str
    rows: int = 0
    usable: int = 0
    matched: int = 0
    correct: int = 0
    unmatched: int = 0
    skipped: int = 0
    problems: list[str] = []


class DriftReport(BaseModel):
    """The monitor's result: every check, whether any threshold was crossed, and what was not computed."""

    model_sha256: str | None
    model_name: str | None = None
    reference_images: int | None = None
    reference_accuracy: float | None = None
    window: WindowSummary
    feedback: FeedbackSummary | None = None
    checks: list[Check] = []
    drift_detected: bool = False
    triggered: list[str] = []
    notes: list[str] = []
    predicted_counts: dict[str, int] = {}
    window_samples: dict[str, list[float]] = Field(default_factory=dict, exclude=True)
    reference: ReferenceProfile | None = Field(None, exclude=True)

    def check(self, name: str) -> Check | None:
        """The check called `name`, or None."""
        return next((c for c in self.checks if c.name == name), None)

    def metrics(self) -> dict[str, float]:
        """Numeric results for MLflow: drift/<check> values, p-values, flags and window counts."""
        out: dict[str, float] = {
            "drift/detected": float(self.drift_detected),
            "window/predictions": float(self.window.predictions),
            "window/excluded_other_model": float(self.window.excluded_other_model),
            "window/errors": float(sum(self.window.errors_by_kind.values())),
        }
        for c in self.checks:
            key = c.name.replace(":", "_")
            if c.value is not None:
                out[f"drift/{key}"] = c.value
            if c.p_value is not None:
                out[f"drift/{key}_p"] = c.p_value
            if c.computed:
                out[f"drift/{key}_drifted"] = float(c.drifted)
        if self.feedback and self.feedback.matched:
            out["live/accuracy"] = self.feedback.correct / self.feedback.matched
            out["live/labelled"] = float(self.feedback.matched)
        return out


def read_feedback(path: Path, labels: list[str]) -> tuple[dict[str, str], FeedbackSummary]:
    """Read a feedback CSV of id,label (a header row "id,label" is optional).

    Takes the CSV path and the model's labels. Returns ({record id: true label}, summary). Rows with
    the wrong number of columns, an empty id or label, a label the model does not know or an id given
    twice with different labels are skipped and listed (with their line number) in summary.problems;
    a missing or unreadable file gives no labels and one problem. Never raises for bad content.
    """
    path = Path(path)
    summary = FeedbackSummary(path=str(path))
    found: dict[str, str] = {}
    known = set(labels)
    if not path.is_file():
        summary.problems.append(f"feedback file not found: {path}")
        return found, summary
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        summary.problems.append(f"feedback file unreadable ({type(err).__name__}): {path}")
        return found, summary
    conflicting: set[str] = set()
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if number == 1 and [c.lower() for c in cells] == ["id", "label"]:
            continue
        summary.rows += 1
        problem = None
        if len(cells) != 2:
            problem = f"expected 2 columns (id,label), got {len(cells)}"
        elif not cells[0] or not cells[1]:
            problem = "empty id or label"
        elif cells[1] not in known and _label_set(cells[1], known) is None:
            problem = f"unknown label {cells[1][:40]!r}"
        elif cells[0] in found and found[cells[0]] != cells[1]:
            problem = f"id {cells[0][:40]} given again with another label"
            conflicting.add(cells[0])
        if problem:
            summary.skipped += 1
            if len(summary.problems) < MAX_LISTED_PROBLEMS:
                summary.problems.append(f"line {number}: {problem}")
            continue
        found[cells[0]] = cells[1] if cells[1] in known else _label_set(cells[1], known)
    for record_id in conflicting:
        found.pop(record_id, None)
    summary.usable = len(found)
    return found, summary


def select_window(
    log_dir: Path, params: MonitorParams, model_sha256: str | None, now: datetime | None = None
) -> tuple[list[dict[str, Any]], WindowSummary]:
    """The prediction records to compare: the model's latest `params.window_records` predictions
    (within `params.window_hours` when set).

    Takes the log folder, the monitor params, the SHA-256 of the reference model.onnx (records of other
    models are left out and counted; None keeps all) and the current time (UTC now by default).
    Returns (records oldest first, WindowSummary).
    """
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=params.window_hours) if params.window_hours else None
    contents = read_prediction_log(Path(log_dir), since)
    summary = WindowSummary(
        log_dir=str(log_dir),
        files=contents.files,
        records_read=len(contents.records),
        malformed_lines=contents.malformed_lines,
    )
    predictions = []
    others: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for record in contents.records:
        event = record.get("event")
        if event == "error":
            errors[str(record.get("kind", "unknown"))] += 1
        elif event == "prediction":
            sha = record.get("model_sha256")
            if model_sha256 is not None and sha != model_sha256:
                name = f"{record.get('model') or '?'} v{record.get('version') or '?'} ({str(sha)[:12]})"
                others[name] += 1
            else:
                predictions.append(record)
    predictions = predictions[-params.window_records :]
    summary.predictions = len(predictions)
    summary.excluded_other_model = sum(others.values())
    summary.other_models = dict(others)
    summary.errors_by_kind = dict(errors)
    if predictions:
        summary.first, summary.last = predictions[0]["ts"], predictions[-1]["ts"]
    return predictions, summary


def population_stability_index(reference: dict[str, int], current: dict[str, int], labels: list[str]) -> float:
    """PSI = sum over labels of (q - p) * ln(q / p), p the reference share and q the current share of
    each label (shares floored at 1e-4). Takes two {label: count} dicts and the labels; returns PSI."""
    p = np.array([reference.get(label, 0) for label in labels], dtype=np.float64)
    q = np.array([current.get(label, 0) for label in labels], dtype=np.float64)
    p = np.maximum(p / max(p.sum(), 1), PSI_FLOOR)
    q = np.maximum(q / max(q.sum(), 1), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def _class_check(profile: ReferenceProfile, counts: dict[str, int], params: MonitorParams) -> Check:
    psi = population_stability_index(profile.predicted_counts, counts, profile.labels)
    table = np.array(
        [
            [profile.predicted_counts.get(label, 0) for label in profile.labels],
            [counts.get(label, 0) for label in profile.labels],
        ]
    )
    table = table[:, table.sum(axis=0) > 0]
    p_value = float(stats.chi2_contingency(table).pvalue) if table.shape[1] > 1 else 1.0
    return Check(
        name="class_distribution",
        kind="class_distribution",
        computed=True,
        value=psi,
        threshold=params.psi_threshold,
        drifted=psi > params.psi_threshold,
        details={"chi2_p_value": p_value},
    )


def _confidence_check(profile: ReferenceProfile, values: list[float], params: MonitorParams) -> Check:
    reference = float(np.mean(profile.samples["confidence"]))
    current = float(np.mean(values))
    drop = reference - current
    return Check(
        name="confidence_drop",
        kind="confidence",
        computed=True,
        value=drop,
        threshold=params.confidence_drop,
        drifted=drop > params.confidence_drop,
        details={"reference_mean": reference, "window_mean": current},
    )


def _ks_checks(profile: ReferenceProfile, window: dict[str, list[float]], params: MonitorParams) -> list[Check]:
    names = [n for n in (*IMAGE_STATISTICS, *PREDICTION_STATISTICS) if n in profile.samples or n in window]
    testable = [n for n in names if profile.samples.get(n) and window.get(n)]
    alpha = params.ks_pvalue / max(1, len(testable))
    checks = []
    for name in names:
        kind = "image_statistic" if name in IMAGE_STATISTICS else "prediction_statistic"
        if name not in testable:
            side = "reference profile" if not profile.samples.get(name) else "log window"
            checks.append(Check(name=f"ks:{name}", kind=kind, computed=False, reason=f"no {name} values in the {side}"))
            continue
        reference, current = np.asarray(profile.samples[name]), np.asarray(window[name])
        result = stats.ks_2samp(reference, current)
        distance, p_value = float(result.statistic), float(result.pvalue)
        checks.append(
            Check(
                name=f"ks:{name}",
                kind=kind,
                computed=True,
                value=distance,
                p_value=p_value,
                threshold=params.ks_min_statistic,
                drifted=p_value < alpha and distance >= params.ks_min_statistic,
                details={
                    "alpha": alpha,
                    "reference_median": float(np.median(reference)),
                    "window_median": float(np.median(current)),
                },
            )
        )
    return checks


def _label_set(cell: str, known: set[str]) -> str | None:
    """A multi-label feedback cell ("loop;even") as the server logs it ("even;loop"), or None when a part is
    empty or unknown (live accuracy of a multi-label model is the exact match of the label set)."""
    parts = [part.strip() for part in cell.split(";")]
    return ";".join(sorted(set(parts))) if all(part in known for part in parts) else None


def _accuracy_check(
    feedback: dict[str, str],
    summary: FeedbackSummary,
    records: list[dict[str, Any]],
    reference_accuracy: float | None,
    params: MonitorParams,
) -> Check:
    window_ids = {r.get("id"): r for r in records}
    matched = [(window_ids[i], label) for i, label in feedback.items() if i in window_ids]
    summary.matched = len(matched)
    summary.unmatched = len(feedback) - len(matched)
    summary.correct = sum(record.get("predicted") == label for record, label in matched)
    if not matched:
        return Check(
            name="live_accuracy",
            kind="accuracy",
            computed=False,
            reason="no feedback row matches a prediction id in the window",
        )
    accuracy = summary.correct / summary.matched
    details = {"live_accuracy": accuracy, "labelled": summary.matched, "reference_accuracy": reference_accuracy}
    if reference_accuracy is None:
        return Check(
            name="live_accuracy",
            kind="accuracy",
            computed=True,
            details=details,
            reason="no reference accuracy in the bundle to compare with",
        )
    drop = reference_accuracy - accuracy
    check = Check(
        name="live_accuracy",
        kind="accuracy",
        computed=True,
        value=drop,
        threshold=params.accuracy_drop,
        details=details,
    )
    if summary.matched < params.min_feedback:
        check.reason = f"only {summary.matched} labelled predictions (min_feedback {params.min_feedback}): not decided"
    else:
        check.drifted = drop > params.accuracy_drop
    return check


_STATISTICS = (*IMAGE_STATISTICS, *PREDICTION_STATISTICS)
_DRIFT_CHECKS = ("class_distribution", "confidence_drop", *(f"ks:{n}" for n in _STATISTICS))


def compare_window(
    log_dir: Path,
    profile: ReferenceProfile | None,
    params: MonitorParams,
    model_sha256: str | None,
    feedback_path: Path | None = None,
    labels: list[str] | None = None,
    reference_accuracy: float | None = None,
    model_name: str | None = None,
    now: datetime | None = None,
) -> DriftReport:
    """Compare the prediction-log window with the reference profile.

    Takes the log folder, the bundle's profile (None: drift tests are reported as not computed), the
    monitor params, the SHA-256 of the bundle's model.onnx (records of other models are left out), an
    optional feedback CSV, the model's labels (default: the profile's), the reference accuracy (default:
    the profile's; e.g. metrics.json's accuracy for a bundle without profile), the model name and the
    current time. Returns the DriftReport; bad or missing input is reported in it, never raised.
    """
    records, window = select_window(log_dir, params, model_sha256, now)
    labels = labels or (profile.labels if profile else [])
    if profile is not None and profile.accuracy is not None:
        reference_accuracy = profile.accuracy
    report = DriftReport(
        model_sha256=model_sha256,
        model_name=model_name,
        window=window,
        reference=profile,
        reference_images=profile.num_images if profile else None,
        reference_accuracy=reference_accuracy,
    )
    report.notes.extend(_window_notes(Path(log_dir), window, model_sha256))
    if profile is not None and model_sha256 is not None and profile.model_sha256 != model_sha256:
        report.notes.append("the bundle's reference profile was computed with another model.onnx: drift tests skipped")
        profile = None
    report.predicted_counts = _predicted_counts(records, profile is not None and profile.task == "multilabel")
    report.window_samples = _window_samples(records)
    report.checks.extend(_drift_checks(profile, records, report, params))
    if feedback_path is not None:
        report.checks.append(_feedback_check(Path(feedback_path), labels, records, reference_accuracy, params, report))
    report.triggered = [c.name for c in report.checks if c.drifted]
    report.drift_detected = bool(report.triggered)
    return report


def _window_notes(log_dir: Path, window: WindowSummary, model_sha256: str | None) -> list[str]:
    """What the reader of the report should know about the log window: missing log, bad lines, other models."""
    notes = []
    if not log_dir.is_dir():
        notes.append(f"no prediction log folder at {log_dir} (serve with --prediction-log {log_dir})")
    elif window.files == 0:
        notes.append(f"no prediction log files in {log_dir}")
    if window.malformed_lines:
        notes.append(f"{window.malformed_lines} malformed log lines skipped")
    if window.excluded_other_model:
        seen = ", ".join(f"{name}: {n}" for name, n in window.other_models.items())
        notes.append(
            f"{window.excluded_other_model} predictions of another model than the reference ({str(model_sha256)[:12]}) "
            f"left out ({seen})"
        )
    return notes


def _predicted_counts(records: list[dict[str, Any]], multilabel: bool = False) -> dict[str, int]:
    """Predictions per label; multilabel: how many images were answered with each label (label frequencies)."""
    counts: dict[str, int] = {}
    for record in records:
        label = record.get("predicted")
        if isinstance(label, str):
            for name in [n for n in label.split(";") if n] if multilabel else [label]:
                counts[name] = counts.get(name, 0) + 1
    return counts


def _window_samples(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per statistic, the finite numeric values the window's records hold."""
    samples: dict[str, list[float]] = {}
    for record in records:
        for name in _STATISTICS:
            value = record.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                samples.setdefault(name, []).append(float(value))
    return samples


def _not_computed_reason(profile: ReferenceProfile | None, records: list, params: MonitorParams) -> str | None:
    if profile is None:
        return "the bundle has no usable reference profile (package it again to add reference_profile.json)"
    if len(records) == 0:
        return "the log window holds no predictions of this model"
    if len(records) < params.min_records:
        return f"the log window holds {len(records)} predictions, fewer than min_records {params.min_records}"
    return None


def _check_kind(name: str) -> CheckKind:
    kinds: dict[str, CheckKind] = {"class_distribution": "class_distribution", "confidence_drop": "confidence"}
    if name in kinds:
        return kinds[name]
    return "image_statistic" if name.removeprefix("ks:") in IMAGE_STATISTICS else "prediction_statistic"


def _drift_checks(
    profile: ReferenceProfile | None, records: list[dict[str, Any]], report: DriftReport, params: MonitorParams
) -> list[Check]:
    """The class-distribution, confidence and KS checks, or all of them as not computed (with a note why)."""
    reason = _not_computed_reason(profile, records, params)
    if reason:
        report.notes.append(f"drift tests not computed: {reason}")
        return [Check(name=name, kind=_check_kind(name), computed=False, reason=reason) for name in _DRIFT_CHECKS]
    assert profile is not None
    samples = report.window_samples
    checks = [_class_check(profile, report.predicted_counts, params)]
    if samples.get("confidence") and profile.samples.get("confidence"):
        checks.append(_confidence_check(profile, samples["confidence"], params))
    else:
        checks.append(Check(name="confidence_drop", kind="confidence", computed=False, reason="no confidence values"))
    return checks + _ks_checks(profile, samples, params)


def _feedback_check(
    feedback_path: Path,
    labels: list[str],
    records: list[dict[str, Any]],
    reference_accuracy: float | None,
    params: MonitorParams,
    report: DriftReport,
) -> Check:
    """The live-accuracy check from a feedback CSV; sets report.feedback and notes its problems."""
    feedback, report.feedback = read_feedback(feedback_path, labels)
    if report.feedback.problems:
        skipped = (
            f"{report.feedback.skipped} of {report.feedback.rows} rows skipped"
            if report.feedback.rows
            else "no rows used"
        )
        report.notes.append(f"feedback: {skipped}; first problem: {report.feedback.problems[0]}")
    if not feedback:
        return Check(name="live_accuracy", kind="accuracy", computed=False, reason="no usable feedback rows")
    return _accuracy_check(feedback, report.feedback, records, reference_accuracy, params)
