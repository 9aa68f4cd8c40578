"""The drift report as files: drift.json, report.md (plots beside it) and a self-contained report.html
(plots embedded), with a class-distribution plot and one histogram per compared statistic."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from components.monitoring.drift import Check, DriftReport

CLASS_PLOT = "class_distribution.png"
STATS_PLOT = "statistics.png"


class DriftReportFiles(BaseModel):
    """Paths of the written report files."""

    json_path: str
    markdown_path: str
    html_path: str
    plots: list[str]


def _figure(width: float, height: float):
    # A Figure without pyplot renders with Agg and keeps no global state (safe in threads).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _class_plot(report: DriftReport, path: Path) -> Path | None:
    reference = report.reference
    if reference is None or not report.predicted_counts:
        return None
    labels = reference.labels
    ref = np.array([reference.predicted_counts.get(label, 0) for label in labels], dtype=float)
    cur = np.array([report.predicted_counts.get(label, 0) for label in labels], dtype=float)
    ref, cur = ref / max(ref.sum(), 1), cur / max(cur.sum(), 1)
    fig = _figure(max(5.0, 0.45 * len(labels) + 2), 3.2)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    ax.bar(x - 0.2, ref, 0.4, label="reference")
    ax.bar(x + 0.2, cur, 0.4, label="window")
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 12 else 0, ha="right" if len(labels) > 12 else "center")
    ax.set_ylabel("share of predictions")
    check = report.check("class_distribution")
    title = "predicted classes"
    if check is not None and check.value is not None:
        title += f" (PSI {check.value:.3f}{', drift' if check.drifted else ''})"
    ax.set_title(title)
    ax.legend()
    fig.savefig(path)
    return path


def _stats_plot(report: DriftReport, path: Path) -> Path | None:
    reference = report.reference
    checks = [c for c in report.checks if c.name.startswith("ks:") and c.computed]
    if reference is None or not checks:
        return None
    columns = 3
    rows = -(-len(checks) // columns)
    fig = _figure(4.0 * columns, 2.6 * rows)
    for index, check in enumerate(checks):
        name = check.name.removeprefix("ks:")
        ref, cur = np.asarray(reference.samples[name]), np.asarray(report.window_samples[name])
        low, high = float(min(ref.min(), cur.min())), float(max(ref.max(), cur.max()))
        bins = np.linspace(low, high if high > low else low + 1, 31)
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.hist(ref, bins=bins, density=True, alpha=0.55, label="reference")
        ax.hist(cur, bins=bins, density=True, alpha=0.55, label="window")
        ax.set_title(
            f"{name}: KS {check.value:.3f}, p {check.p_value:.2g}",
            color="red" if check.drifted else "black",
            fontsize=9,
        )
        ax.tick_params(labelsize=7)
        if index == 0:
            ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _check_row(check: Check) -> list[str]:
    status = "DRIFT" if check.drifted else ("ok" if check.computed else "not computed")
    note = check.reason or ""
    if not note and "alpha" in check.details:
        note = f"drift when p < {check.details['alpha']:.2g} and KS >= {check.threshold:g}"
    return [check.name, status, _fmt(check.value), _fmt(check.threshold), _fmt(check.p_value), note]


def _summary(report: DriftReport) -> list[str]:
    w = report.window
    items = [
        f"model.onnx SHA-256: {(report.model_sha256 or '?')[:16]}",
        f"reference: {report.reference_images or 0} images, accuracy {_fmt(report.reference_accuracy)}",
        f"window: {w.predictions} predictions ({w.first or '-'} to {w.last or '-'}) "
        f"from {w.files} log file(s) in {w.log_dir}",
        f"left out: {w.excluded_other_model} predictions of other models, {w.malformed_lines} malformed lines",
        "failed requests in the log: " + (", ".join(f"{k} {v}" for k, v in sorted(w.errors_by_kind.items())) or "none"),
    ]
    if report.feedback is not None:
        f = report.feedback
        accuracy = f"{f.correct / f.matched:.4f}" if f.matched else "-"
        items.append(
            f"feedback: {f.rows} rows, {f.usable} usable, {f.matched} matched the window "
            f"({f.unmatched} did not), live accuracy {accuracy}"
        )
    return items


def drift_markdown(report: DriftReport, plots: list[str] | None = None) -> str:
    """The report as markdown: verdict, window, checks table, what was not computed, feedback.

    Takes the DriftReport and the plot file names to reference (relative to the markdown file; none
    for a Prefect artifact). Returns the markdown text.
    """
    verdict = f"**drift detected**: {', '.join(report.triggered)}" if report.drift_detected else "no drift detected"
    lines = [f"# Drift report: {report.model_name or 'model'}", "", verdict, ""]
    lines += [f"- {item}" for item in _summary(report)]
    lines += ["", "| check | status | value | threshold | p-value | note |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in _check_row(c)) + " |" for c in report.checks]
    computed = [c.name for c in report.checks if c.computed]
    missing = [c for c in report.checks if not c.computed]
    lines += ["", f"Computed: {', '.join(computed) or 'nothing'}."]
    if missing:
        reasons = sorted({c.reason or "" for c in missing})
        lines.append(f"Not computed: {', '.join(c.name for c in missing)} ({'; '.join(reasons)}).")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    if report.feedback is not None and report.feedback.problems:
        lines += ["", "## Feedback problems", ""] + [f"- {p}" for p in report.feedback.problems]
    for plot in plots or []:
        lines += ["", f"![{Path(plot).stem}]({Path(plot).name})"]
    return "\n".join(lines) + "\n"


def write_drift_report(report: DriftReport, out_dir: Path) -> DriftReportFiles:
    """Write drift.json, the plots, report.md and report.html into out_dir (created when missing).

    Takes the DriftReport and the folder. Returns the DriftReportFiles.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        str(p) for p in (_class_plot(report, out_dir / CLASS_PLOT), _stats_plot(report, out_dir / STATS_PLOT)) if p
    ]
    json_path = out_dir / "drift.json"
    json_path.write_text(json.dumps(report.model_dump(mode="json"), indent=2, allow_nan=False, default=str) + "\n")
    markdown = drift_markdown(report, plots)
    markdown_path = out_dir / "report.md"
    markdown_path.write_text(markdown)
    html_path = out_dir / "report.html"
    html_path.write_text(_html(report, plots))
    return DriftReportFiles(
        json_path=str(json_path), markdown_path=str(markdown_path), html_path=str(html_path), plots=plots
    )


def _html(report: DriftReport, plots: list[str]) -> str:
    body = [f"<h1>Drift report: {html.escape(report.model_name or 'model')}</h1>"]
    verdict = "drift detected: " + ", ".join(report.triggered) if report.drift_detected else "no drift detected"
    body.append(
        f"<p style='font-weight:bold;color:{'#b00' if report.drift_detected else '#070'}'>{html.escape(verdict)}</p>"
    )
    body.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in _summary(report)) + "</ul>")
    header = ["check", "status", "value", "threshold", "p-value", "note"]
    rows = "".join(
        f"<tr style='background:{'#fdd' if c.drifted else ('#eee' if not c.computed else '#fff')}'>"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in _check_row(c))
        + "</tr>"
        for c in report.checks
    )
    body.append(
        "<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>"
        + "".join(f"<th>{h}</th>" for h in header)
        + f"</tr>{rows}</table>"
    )
    if report.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    if report.feedback is not None and report.feedback.problems:
        body.append(
            "<h2>Feedback problems</h2><ul>"
            + "".join(f"<li>{html.escape(p)}</li>" for p in report.feedback.problems)
            + "</ul>"
        )
    for plot in plots:
        data = base64.b64encode(Path(plot).read_bytes()).decode()
        body.append(f"<p><img alt='{html.escape(Path(plot).stem)}' src='data:image/png;base64,{data}'></p>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>visionflow drift report</title></head>"
        "<body style='font-family:sans-serif'>" + "".join(body) + "</body></html>\n"
    )
