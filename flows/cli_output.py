"""What the `visionflow` commands print: summary tables, run lists, comparisons, one printer per command result.

Within 80 columns: short facts go into tables, every path or link is printed whole on its own line (for copying).
The printers take the results the command functions (flows/commands.py) return; nothing here decides or runs.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def say(text: str) -> None:
    """One plain line (no markup, no highlighting), folded at the terminal's width."""
    console.print(text, highlight=False)


# --- tables and places ----------------------------------------------------------------------------


def compact_table(title: str) -> Table:
    """A table without borders, columns two spaces apart: the most columns that fit 80."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column table of facts, long values folded inside it (print_summary also takes paths out)."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def _is_place(value: str) -> bool:
    """A path, link or command with a path: printed whole on its own line rather than folded into a table cell."""
    return "/" in value and len(value) > 36


def print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column table of the short facts (long sentences fold inside it, within 80 columns), then each path
    or link whole on its own line ("label: value", or the label above the value when both do not fit)."""
    console.print(summary_table(title, [(key, value) for key, value in rows if not _is_place(value)]))
    places = [(key, value) for key, value in rows if _is_place(value)]
    for key, value in places:
        print_place(key, value)


def print_place(label: str, value: str) -> None:
    """A path or link whole (never cut or folded, for copying): "label: value", or the label on the line above
    when both do not fit the terminal."""
    if len(label) + 2 + len(value) <= console.width:
        console.print(f"{label}: {value}", highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"{label}:\n  {value}", highlight=False, markup=False, soft_wrap=True)


# --- run, resume, validate-data, plan, evaluate, explain, optimize -----------------------------------


def print_pipeline_result(result) -> None:
    """`run` / `resume`: the test figures, split sizes, quarantine count, MLflow run and every place to look."""
    from components.tracking import ui_hint

    m = result.metrics
    counts = result.split_counts
    print_summary(
        "visionflow run finished",
        [
            *([("test mAP (multi-label)", f"{m['test/map']:.4f}")] if "test/map" in m else []),
            ("test accuracy", f"{m.get('test/accuracy', float('nan')):.4f}"),
            ("macro F1", f"{m.get('test/macro_f1', float('nan')):.4f}"),
            (
                "images train / val / test",
                f"{counts.get('train', 0)} / {counts.get('val', 0)} / {counts.get('test', 0)}",
            ),
            ("quarantined files", str(len(result.quarantined))),
            ("MLflow run", f"{result.run_id} (experiment {result.experiment})"),
            ("MLflow UI", ui_hint(result.tracking_uri)),
            ("run directory", result.run_dir),
            ("best checkpoint", result.checkpoint),
            *(
                [
                    ("bundle", result.bundle),
                    ("registered model", f"{result.model_version}: {result.registry_decision}"),
                ]
                if result.bundle
                else []
            ),
            *(
                [("best compressed variant", f"{result.best_variant or 'none accepted'} ({result.comparison})")]
                if result.comparison
                else []
            ),
        ],
    )
    for line in result.quarantined[:20]:
        console.print(f"  quarantined: {line}", highlight=False)


def print_validation(report) -> None:
    """`validate-data`: the validation report, then where it and the quarantine list were written."""
    from components.data.validate import format_report

    console.print(format_report(report), highlight=False)
    console.print(f"report: {report.report_path}\nquarantine list: {report.quarantine_path}", highlight=False)


def print_plan(plan) -> None:
    """`plan`: every decision with its value and reason, as components.planning words it."""
    from components.planning import format_plan

    console.print(format_plan(plan), highlight=False, markup=False, soft_wrap=True)


def print_evaluation(result) -> None:
    """`evaluate`: image count, accuracy, macro F1, quarantine count, the MLflow run and the run directory."""
    m = result.metrics
    print_summary(
        "visionflow evaluation",
        [
            ("images", str(result.num_images)),
            ("accuracy", f"{m['test/accuracy']:.4f}"),
            ("macro F1", f"{m['test/macro_f1']:.4f}"),
            ("quarantined files", str(len(result.quarantined))),
            ("MLflow run", result.run_id),
            ("run directory", result.run_dir),
        ],
    )


def print_explanations(explanations) -> None:
    """`explain`: one line per image, its predicted class and confidence and the PNG written."""
    for item in explanations:
        # soft wrap: the paths are never broken by a newline, so they copy whole from a narrow terminal or a pipe
        console.print(
            f"{item.predicted} ({item.confidence:.2f})  {item.path} -> {item.png}", highlight=False, soft_wrap=True
        )


def print_variants(result) -> None:
    """`optimize`: one row per compressed variant, the best accepted one, the comparison file and the run."""
    table = compact_table("visionflow compression")
    table.add_column("variant", no_wrap=True)
    for column in ("accuracy", "drop", "KB", "params", "b1 ms", "b32 ms", "accepted"):
        table.add_column(column, justify="right", no_wrap=True)
    for v in result.variants:
        table.add_row(
            v.name,
            f"{v.accuracy:.4f}",
            f"{v.accuracy_drop:+.4f}",
            f"{v.size_bytes / 1024:.0f}",
            f"{v.params:,}" if v.params else "-",
            f"{v.latency_b1_ms:.2f}",
            f"{v.latency_b32_ms:.2f}",
            "yes" if v.accepted else "no",
        )
    console.print(table)
    console.print(f"best accepted variant ({result.objective}): {result.best or 'none'}", highlight=False)
    print_place("comparison", str(result.comparison_md))
    console.print(f"MLflow run: {result.run_id}", highlight=False)


# --- serve, the stack, deploy, retrain -------------------------------------------------------------


def print_serving(bundle, settings) -> None:
    """`serve`, before the server blocks: what is served where, and the prediction log's bounds when kept."""
    console.print(f"serving {bundle} on http://{settings.host}:{settings.port} (POST /predict)", highlight=False)
    if settings.prediction_log_dir:
        console.print(
            f"prediction log: {settings.prediction_log_dir} "
            f"(at most {settings.prediction_log_files} x {settings.prediction_log_max_bytes} bytes)",
            highlight=False,
        )


def print_stack(state, started: bool) -> None:
    """`up`: both servers' links, the database, auth and state folder, then the exports for other shells."""
    print_summary(
        "visionflow stack " + ("started" if started else "already running"),
        [
            ("Prefect UI", state.prefect_url),
            ("MLflow UI", state.mlflow_url),
            ("database", state.database),
            ("basic auth", "on (user admin)" if state.auth else "off"),
            ("state", state.state_dir),
            ("stop", "visionflow down"),
        ],
    )
    console.print("Point other shells at it (visionflow commands started here find it by themselves):", highlight=False)
    for line in state.exports():
        console.print(f"  {line}", highlight=False)


def print_stopped(stopped: list[str]) -> None:
    """`down`: the servers stopped, or that none was running."""
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "no visionflow stack was running", highlight=False)


def print_deployments_sent(ids: list[str], pool: str) -> None:
    """`deploy --pool`: how many deployments went to the pool, and how to start a worker."""
    console.print(
        f"{len(ids)} deployments sent to work pool {pool}; start a worker with `prefect worker start --pool {pool}`",
        highlight=False,
    )


def print_deployments_serving(retrain) -> None:
    """`deploy`, before serving blocks: the retrain schedule (RetrainParams) and how to stop."""
    console.print(f"retrain schedule: {retrain.cron} ({retrain.timezone}); Ctrl-C stops serving", highlight=False)


def print_retrain(result) -> None:
    """`retrain`: the outcome and its reason, the model version, challenger and champion figures, the run."""
    print_summary(
        f"visionflow retrain: {result.outcome.replace('_', ' ')}",
        [
            ("decision", result.reason),
            ("model version", result.model_version or "-"),
            (
                f"challenger {result.gate_metric}",
                "-" if result.challenger_accuracy is None else f"{result.challenger_accuracy:.4f}",
            ),
            (
                f"champion {result.gate_metric}",
                "-" if result.champion_accuracy is None else f"{result.champion_accuracy:.4f}",
            ),
            ("challenger macro F1", "-" if result.challenger_macro_f1 is None else f"{result.challenger_macro_f1:.4f}"),
            ("MLflow run", result.run_id or "-"),
        ],
    )


# --- compare, runs, sweep, tune --------------------------------------------------------------------


def print_comparison(runs: list[dict], metric: str | None, title: str, plot: Path | None) -> None:
    """A table of runs (short ids) by status, duration, the params that differ and the metrics; when that table
    would not fit the terminal, one block per run instead (its values as key=value, wrapped). With a metric
    and `plot`, the comparison plot is written there and its path printed."""
    from components.comparison import comparison_plot, metric_columns, varying_params

    if not runs:
        console.print("no runs found", highlight=False)
        return
    params = varying_params(runs)
    metrics = metric_columns(runs, metric)
    header = ["run", "status", "duration", *params, *metrics]
    rows = []
    for r in runs:
        duration = f"{r['duration_s']:.0f} s" if r["duration_s"] is not None else "-"
        values = [str(r["params"].get(p, "-")) for p in params]
        values += [f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for m in metrics]
        rows.append((r["run_id"][:8], r["status"], duration, values))
    cells = [header, *[[run_id, status, duration, *values] for run_id, status, duration, values in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    if sum(widths) + 2 * len(widths) <= console.width:
        table = compact_table(title)
        for column in header:
            table.add_column(column, no_wrap=True)
        for run_id, status, duration, values in rows:
            table.add_row(run_id, status, duration, *values)
        console.print(table)
    else:
        console.print(title, style="bold", highlight=False)
        for run_id, status, duration, values in rows:
            console.print(f"{run_id}  {status}  {duration}", highlight=False)
            pairs = "  ".join(f"{k}={v}" for k, v in zip([*params, *metrics], values, strict=True))
            console.print(Padding(pairs, (0, 0, 0, 2)), highlight=False)
    if metrics and plot is not None:
        print_place("comparison plot", str(comparison_plot(runs, metrics[0], plot)))


def print_runs(found: list[dict], uri: str) -> None:
    """One line per run (short id, status, accuracy, experiment / name), then its Prefect and MLflow links
    whole on their own lines; a local store's MLflow UI command once at the end."""
    from components import tracking

    if not found:
        console.print("no runs found", highlight=False)
        return
    server = uri.startswith(("http://", "https://"))
    console.print("recent runs (newest first)", style="bold", highlight=False)
    console.print(f"{'run':<8}  {'status':<9}  {'accuracy':>8}  experiment / run name", style="bold", highlight=False)
    for r in found:
        accuracy = r["metrics"].get("test/accuracy")
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        console.print(
            f"{r['run_id'][:8]:<8}  {r['status']:<9}  {shown:>8}  {r['experiment']} / {r['run_name'] or '-'}",
            highlight=False,
            markup=False,
        )
        url, flow_run_id = r["tags"].get("prefect.flow_run_url", ""), r["tags"].get("prefect.flow_run_id")
        links = [url] if "://" in url else [f"Prefect flow run {flow_run_id}"] if flow_run_id else []
        links.append(tracking.run_link(r["run_id"], uri) if server else f"MLflow run {r['run_id']}")
        for link in links:
            console.print(f"  {link}", highlight=False, markup=False, soft_wrap=True)
    if not server:
        console.print(f"MLflow UI:\n  {tracking.ui_hint(uri)}", highlight=False, markup=False, soft_wrap=True)


def print_sweep_planned(plan) -> None:
    """`sweep`, before the first combination runs: its id, size and experiment."""
    console.print(
        f"sweep {plan.sweep_id}: {len(plan.params)} combinations in experiment {plan.experiment}", highlight=False
    )


def print_sweep(outcome, runs: list[dict]) -> None:
    """`sweep`: the end state of each combination, then the comparison of its runs (and its plot)."""
    for key, state in outcome.states.items():
        console.print(f"  {state:>10}  {key}", highlight=False)
    print_comparison(
        runs, None, f"sweep {outcome.sweep_id} ({outcome.experiment})", Path("runs") / f"sweep-{outcome.sweep_id}.png"
    )


def print_tune_planned(plan) -> None:
    """`tune`, before the first trial: the study, how many trials at most and the pruner."""
    console.print(f"study {plan.study}: up to {plan.trials} trials, pruner {plan.space.pruner}", highlight=False)


def print_tune(result) -> None:
    """`tune`: trials by state, the best value, trial and params, the best params file and the runs."""
    console.print(
        summary_table(
            f"visionflow tune: study {result.study}",
            [
                ("trials", ", ".join(f"{n} {state.lower()}" for state, n in sorted(result.trials.items()))),
                ("best val/acc", "-" if result.best_value is None else f"{result.best_value:.4f}"),
                ("best trial", "-" if result.best_trial is None else str(result.best_trial)),
                ("best params", ", ".join(f"{k}={v}" for k, v in result.best_params.items()) or "-"),
                ("best params file", result.best_params_file or "-"),
                ("MLflow study run", result.run_id),
                *(
                    [("full run", f"{result.then_run_id} (test/accuracy {result.then_test_accuracy})")]
                    if result.then_run_id
                    else []
                ),
            ],
        )
    )


# --- monitor, package, fit-spec, diff --------------------------------------------------------------


def print_monitor(result) -> None:
    """`monitor`: the verdict, what was compared and computed, live accuracy, the report, run and event."""
    rows = [
        ("verdict", f"DRIFT: {', '.join(result.triggered)}" if result.drift_detected else "no drift detected"),
        ("predictions compared", str(result.window_predictions)),
        ("computed", ", ".join(result.computed) or "nothing"),
        ("not computed", "; ".join(sorted(set(result.not_computed.values()))) or "-"),
        ("live accuracy", "-" if result.live_accuracy is None else f"{result.live_accuracy:.4f}"),
        ("report", f"{result.report_markdown} ({result.report_html})"),
        ("MLflow run", result.run_id),
    ]
    if result.event_id:
        rows.append(("Prefect event", f"visionflow.drift.detected ({result.event_id})"))
    print_summary("visionflow monitor", rows)
    for note in result.notes:
        console.print(f"  note: {note}", highlight=False)


def print_package(result, from_run: str) -> None:
    """`package`: the bundle, the registered version, both accuracies, the gate's reason and the child run."""
    print_summary(
        "visionflow package",
        [
            ("bundle", result.archive),
            ("registered model", f"{result.model_name} v{result.version}"),
            ("challenger accuracy (test split)", f"{result.challenger_accuracy:.4f}"),
            (
                "champion accuracy (same split)",
                "-" if result.champion_accuracy is None else f"{result.champion_accuracy:.4f}",
            ),
            ("registry gate", result.reason),
            ("MLflow run", f"{result.run_id} (child of {from_run})"),
        ],
    )


def print_fit_spec(spec_path: Path, launch_lines: dict[str, str]) -> None:
    """`fit-spec`: the spec file, then one launch line per launcher (torchrun, SLURM)."""
    console.print(f"spec: {spec_path}", highlight=False)
    for name, line in launch_lines.items():
        console.print(f"{name}: {line}", highlight=False, soft_wrap=True)


def print_diff(done, run_a: str, run_b: str) -> None:
    """`diff`: the images scored, each headline metric A → B with its change, the counts, the run and files."""
    result = done.result
    rows = [("images", f"{result.num_images} ({result.source})")]
    for name in ("accuracy", "macro_f1", "ece"):
        if name in result.summary_a and name in result.summary_b:
            a, b = result.summary_a[name], result.summary_b[name]
            rows.append((name, f"{a:.4f} → {b:.4f} ({b - a:+.4f})"))
    rows += [(kind, str(count)) for kind, count in result.counts.items()]
    rows += [("MLflow run", done.run_id), ("summary", result.files["summary.md"]), ("folder", done.out_dir)]
    print_summary(f"visionflow diff {run_a[:8]} → {run_b[:8]}", rows)
