"""The `visionflow` command line: run, resume, validate-data, evaluate, optimize, serve, promote, rollback,
up, down, deploy, retrain, compare, runs, sweep, fit-spec.

Expected failures (bad params, bad data, a failed stage) print one line and exit 2.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# Offline-safe defaults, set before prefect / mlflow / albumentations are imported.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}.items():
    os.environ.setdefault(_key, _value)

import typer
from rich.console import Console
from rich.table import Table

from components.config import load_params
from components.errors import VisionflowError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="visionflow: tracked, compressed, deployable image classifiers.",
)
console = Console()
err_console = Console(stderr=True)

PARAMS_OPTION = typer.Option(None, "--params", "-p", help="Params YAML (default: built-in defaults).")
SET_OPTION = typer.Option(
    None, "--set", "-s", help="Override one parameter, e.g. --set train.max_epochs=5 (repeatable)."
)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _is_interrupt(err: BaseException) -> bool:
    from prefect.exceptions import TerminationSignal

    return isinstance(err, (KeyboardInterrupt, TerminationSignal))


def _run_guarded(fn):
    """Call fn(); VisionflowError → one line on stderr and exit 2; SIGTERM ends runs as KILLED."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return fn()
    except VisionflowError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except BaseException as err:
        if not _is_interrupt(err):
            raise
        err_console.print(
            "[bold red]interrupted[/]: the MLflow run is marked KILLED; `visionflow resume RUN_ID` continues it"
        )
        raise typer.Exit(130) from None


def _summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _print_pipeline_result(result) -> None:
    from components.tracking import ui_hint

    m = result.metrics
    counts = result.split_counts
    console.print(
        _summary_table(
            "visionflow run finished",
            [
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
    )
    for line in result.quarantined[:20]:
        console.print(f"  quarantined: {line}", highlight=False)


@app.command()
def run(
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Run the whole pipeline (ingest, validate, train, evaluate) and print where to look."""

    def go():
        p = load_params(params, set_ or [])
        from flows.pipeline import pipeline

        return pipeline(p, params_file=str(params) if params else None)

    _print_pipeline_result(_run_guarded(go))


@app.command()
def resume(
    run_id: str = typer.Argument(..., help="MLflow run id of the failed or killed pipeline run."),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Resume a failed, killed or crashed pipeline run: same MLflow run, training from its last checkpoint."""

    def go():
        from flows.pipeline import resume_pipeline

        return resume_pipeline(run_id, set_ or [])

    _print_pipeline_result(_run_guarded(go))


@app.command("validate-data")
def validate_data(
    path: str = typer.Argument(..., help="Folder, CSV manifest, archive, bundled:digits or torchvision:NAME."),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
    out: Path | None = typer.Option(None, help="Where to write manifest and report (default: a temp folder)."),
) -> None:
    """Check every image of a data set and print the validation report (no training)."""

    def go():
        import tempfile

        from components.data.ingest import ingest
        from components.data.validate import format_report, validate

        p = load_params(params, [*(set_ or []), f"data.path={path}"])
        out_dir = out or Path(tempfile.mkdtemp(prefix="visionflow-validate-"))
        snapshot = ingest(p.data, out_dir / "snapshot", Path(p.run.cache_dir))
        report = validate(snapshot, p.data, out_dir)
        console.print(format_report(report), highlight=False)
        console.print(f"report: {report.report_path}\nquarantine list: {report.quarantine_path}", highlight=False)

    _run_guarded(go)


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A visionflow checkpoint (.ckpt)."),
    data: str = typer.Option(..., "--data", "-d", help="Data set to evaluate on (any source `run` accepts)."),
    split: str = typer.Option("all", help="all, train, val or test."),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Evaluate an existing checkpoint on a data set; logs an MLflow run and prints the figures."""

    def go():
        if split not in ("all", "train", "val", "test"):
            raise VisionflowError(f"invalid --split {split!r}: choose all, train, val or test")
        if not checkpoint.is_file():
            raise VisionflowError(f"checkpoint not found: {checkpoint}")
        p = load_params(params, [*(set_ or []), f"data.path={data}"])
        from flows.evaluate import evaluate_flow

        return evaluate_flow(
            str(checkpoint.resolve()), p.data, split, p.evaluate, p.run.experiment, p.run.output_dir, p.run.cache_dir
        )

    result = _run_guarded(go)
    m = result.metrics
    console.print(
        _summary_table(
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
    )


@app.command()
def optimize(
    from_run: str | None = typer.Option(None, "--from-run", help="MLflow run id of a finished pipeline run."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c", help="A visionflow checkpoint (with --data)."),
    data: str | None = typer.Option(None, "--data", "-d", help="Data set for --checkpoint (any source `run` accepts)."),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Compress a trained model (distill, prune, quantize); every variant measured and gated."""

    def go():
@app.command("plan")
def plan_command(
    path: str = typer.Argument(..., help="Folder, CSV manifest, archive, bundled:digits or torchvision:NAME."),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Show what a run would decide from the data (every `auto` param, its value and why); nothing is trained."""

    def go():
        import tempfile

        from components.planning import format_plan, plan_source

        p = load_params(params, [*(set_ or []), f"data.path={path}"])
        plan = plan_source(p, Path(tempfile.mkdtemp(prefix="visionflow-plan-")))
        console.print(format_plan(plan), highlight=False, markup=False, soft_wrap=True)

    _run_guarded(go)


        from flows.optimize import optimize_from_checkpoint, optimize_from_run

        if bool(from_run) == bool(checkpoint):
            raise VisionflowError("give exactly one of --from-run RUN_ID or --checkpoint CKPT (with --data)")
        if from_run:
            return optimize_from_run(from_run, set_ or [])
        if not data:
            raise VisionflowError("--checkpoint needs --data (the data set to fine-tune, calibrate and measure on)")
        if not checkpoint.is_file():
            raise VisionflowError(f"checkpoint not found: {checkpoint}")
        p = load_params(params, ["optimize.enabled=true", *(set_ or []), f"data.path={data}"])
        return optimize_from_checkpoint(str(checkpoint.resolve()), p)

    result = _run_guarded(go)
    _print_variants(result)


def _print_variants(result) -> None:
    table = Table(title="visionflow compression", title_justify="left")
    for column in ("variant", "accuracy", "drop", "size KB", "params", "b1 ms", "b32 ms", "accepted"):
        table.add_column(column)
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
    console.print(f"comparison: {result.comparison_md}\nMLflow run: {result.run_id}", highlight=False)


@app.command()
def serve(
    source: str = typer.Argument(
        ..., help="A bundle folder, a bundle .tar.gz, or a registry URI like models:/NAME@champion."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1 by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, help="Port."),
    max_body_bytes: int = typer.Option(10_000_000, help="Largest request body."),
    max_pixels: int = typer.Option(40_000_000, help="Largest image (width x height)."),
    max_images: int = typer.Option(32, help="Most images in one request."),
    top_k: int = typer.Option(3, help="Labels returned per image."),
    prediction_log: Path | None = typer.Option(
        None,
        "--prediction-log",
        help="Log every prediction's statistics (and failed requests) here for `visionflow monitor`.",
    ),
    prediction_log_max_bytes: int = typer.Option(10_000_000, help="Largest prediction log file before it rotates."),
    prediction_log_files: int = typer.Option(5, help="Most prediction log files kept (the oldest is deleted)."),
    store_images: bool = typer.Option(
        False, "--store-images", help="Also store each predicted image in the prediction log (off by default)."
    ),
) -> None:
    """Serve a model bundle over HTTP: POST /predict, GET /health /ready /metadata /metrics."""

    def go():
        from pydantic import ValidationError

        from components.packaging.resolve import resolve_bundle
        from components.serving.app import ServeSettings
        from components.serving.app import serve as run_server

        try:
            settings = ServeSettings(
                host=host,
                port=port,
                max_body_bytes=max_body_bytes,
                max_pixels=max_pixels,
                max_images=max_images,
                top_k=top_k,
                prediction_log_dir=str(prediction_log) if prediction_log else None,
                prediction_log_max_bytes=prediction_log_max_bytes,
                prediction_log_files=prediction_log_files,
                store_images=store_images,
            )
        except ValidationError as err:
            first = err.errors()[0]
            raise VisionflowError(f"invalid option {first['loc'][0]}: {first['msg']}") from None
        bundle = resolve_bundle(source)
        console.print(f"serving {bundle} on http://{host}:{port} (POST /predict)", highlight=False)
        if prediction_log:
            console.print(
                f"prediction log: {prediction_log} (at most {prediction_log_files} x {prediction_log_max_bytes} bytes)",
                highlight=False,
            )
        run_server(bundle, settings)

    _run_guarded(go)


@app.command()
def promote(
    version: str = typer.Argument(..., help="Registered model version to make champion."),
    name: str = typer.Option("visionflow-classifier", "--name", help="Registered model name (package.model_name)."),
) -> None:
    """Make a registered model version the champion (recorded in the registry history)."""

    def go():
        from flows.package import promote_version

        return promote_version(name, version)

    console.print(_run_guarded(go), highlight=False)


@app.command()
def rollback(
    name: str = typer.Option("visionflow-classifier", "--name", help="Registered model name (package.model_name)."),
) -> None:
    """Give the champion alias back to the version that held it before the last promotion."""

    def go():
        from flows.package import rollback_champion

        return rollback_champion(name)

    console.print(_run_guarded(go), highlight=False)


# --- the local stack, deployments, retraining, comparison ------------------------------------------

STATE_DIR_OPTION = typer.Option(
    None, "--state-dir", help="Stack state folder (default: $VISIONFLOW_STACK_DIR or .visionflow/stack)."
)


@app.callback()
def _use_local_stack(ctx: typer.Context) -> None:
    """Point commands at the stack `visionflow up` started, unless PREFECT_API_URL / MLFLOW_TRACKING_URI are set."""
    if ctx.invoked_subcommand in ("up", "down"):
        return
    from flows.local_stack import running_stack

    stack = running_stack()
    if stack is None:
        return
    for key, value in stack.env().items():
        os.environ.setdefault(key, value)


@app.command()
def up(
    state_dir: Path | None = STATE_DIR_OPTION,
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server (UI and API)."),
    mlflow_port: int = typer.Option(5000, help="Port of the MLflow server."),
    timeout: float = typer.Option(120, help="Seconds to wait for both servers to answer."),
) -> None:
    """Start a local Prefect server and MLflow server (SQLite, loopback only) and print how to reach them."""
    from flows.local_stack import default_state_dir, start_stack

    def go():
        return start_stack(state_dir or default_state_dir(), prefect_port, mlflow_port, timeout)

    state, started = _run_guarded(go)
    console.print(
        _summary_table(
            "visionflow stack " + ("started" if started else "already running"),
            [
                ("Prefect UI", state.prefect_url),
                ("MLflow UI", state.mlflow_url),
                ("state", state.state_dir),
                ("stop", "visionflow down"),
            ],
        )
    )
    console.print("Point other shells at it (visionflow commands started here find it by themselves):", highlight=False)
    for key, value in state.env().items():
        console.print(f"  export {key}={value}", highlight=False)


@app.command()
def down(state_dir: Path | None = STATE_DIR_OPTION) -> None:
    """Stop the servers `visionflow up` started (exactly those processes)."""
    from flows.local_stack import default_state_dir, stop_stack

    stopped = _run_guarded(lambda: stop_stack(state_dir or default_state_dir()))
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "no visionflow stack was running", highlight=False)


@app.command()
def deploy(
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
    pool: str | None = typer.Option(
        None, "--pool", help="Send the deployments to this Prefect work pool instead of serving them here."
    ),
    limit: int | None = typer.Option(None, help="Most flow runs this process runs at once (serve only)."),
) -> None:
    """Serve the deployments (pipeline, retrain on its cron schedule, evaluate, optimize, package, monitor) for the Prefect UI."""

    def go():
        from flows.deploy import build_deployments, deploy_to_pool, serve_deployments
        from flows.prefect_api import server_configured

        p = load_params(params, set_ or [])
        if not server_configured():
            raise VisionflowError("deploy needs a Prefect server: run `visionflow up` first (or set PREFECT_API_URL)")
        deployments = build_deployments(p)
        if pool:
            ids = deploy_to_pool(deployments, pool)
            console.print(
                f"{len(ids)} deployments sent to work pool {pool}; start a worker with "
                f"`prefect worker start --pool {pool}`",
                highlight=False,
            )
            return
        console.print(
            f"retrain schedule: {p.retrain.cron} ({p.retrain.timezone}); Ctrl-C stops serving", highlight=False
        )
        serve_deployments(deployments, limit)

    _run_guarded(go)


@app.command("retrain")
def retrain_command(
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
    force: bool = typer.Option(False, help="Train a challenger even when the data did not change."),
) -> None:
    """Retrain now: no new data → stop; else train a challenger and promote it only if it beats the champion."""

    def go():
        from flows.retrain import retrain

        p = load_params(params, set_ or [])
        return retrain(p, force=force)

    result = _run_guarded(go)
    console.print(
        _summary_table(
            f"visionflow retrain: {result.outcome.replace('_', ' ')}",
            [
                ("decision", result.reason),
                ("model version", result.model_version or "-"),
                (
                    "challenger accuracy",
                    "-" if result.challenger_accuracy is None else f"{result.challenger_accuracy:.4f}",
                ),
                ("champion accuracy", "-" if result.champion_accuracy is None else f"{result.champion_accuracy:.4f}"),
                ("MLflow run", result.run_id or "-"),
            ],
        )
    )


def _print_comparison(runs: list[dict], metric: str | None, title: str, plot: Path | None) -> None:
    from components.comparison import comparison_plot, metric_columns, varying_params

    if not runs:
        console.print("no runs found", highlight=False)
        return
    params = varying_params(runs)
    metrics = metric_columns(runs, metric)
    table = Table(title=title, title_justify="left")
    for column in ("run", "status", "duration", *params, *metrics):
        table.add_column(column)
    for r in runs:
        duration = f"{r['duration_s']:.0f} s" if r["duration_s"] is not None else "-"
        table.add_row(
            f"{r['run_name'] or ''} {r['run_id'][:8]}",
            r["status"],
            duration,
            *[str(r["params"].get(p, "-")) for p in params],
            *[f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for m in metrics],
        )
    console.print(table)
    if metrics and plot is not None:
        console.print(f"comparison plot: {comparison_plot(runs, metrics[0], plot)}", highlight=False)


@app.command()
def compare(
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="MLflow experiment (default: all)."),
    last: int = typer.Option(10, "--last", "-n", min=1, help="How many of the newest runs."),
    metric: str | None = typer.Option(
        None, "--metric", "-m", help="Metric to compare first and plot (default test/accuracy)."
    ),
    sweep_id: str | None = typer.Option(None, "--sweep", help="Only the runs of this sweep."),
    plot: Path = typer.Option(Path("runs/comparison.png"), "--plot", help="Where to write the comparison plot."),
) -> None:
    """Compare runs: the params that differ, metrics, duration and status, and a comparison plot."""
    from components import tracking
    from flows.sweep import SWEEP_TAG

    runs = _run_guarded(lambda: tracking.recent_runs(experiment, last, tag=(SWEEP_TAG, sweep_id) if sweep_id else None))
    _print_comparison(runs, metric, f"runs of {experiment or 'all experiments'} (newest first)", plot)


@app.command()
def runs(
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="MLflow experiment (default: all)."),
    last: int = typer.Option(10, "--last", "-n", min=1, help="How many of the newest runs."),
) -> None:
    """List recent runs with their status and their Prefect and MLflow links."""
    from components import tracking

    found = _run_guarded(lambda: tracking.recent_runs(experiment, last))
    table = Table(title="recent runs (newest first)", title_justify="left")
    for column in ("run", "experiment", "status", "test/accuracy", "Prefect flow run", "MLflow"):
        table.add_column(column, overflow="fold")
    for r in found:
        accuracy = r["metrics"].get("test/accuracy")
        table.add_row(
            f"{r['run_name'] or ''} {r['run_id'][:8]}",
            r["experiment"],
            r["status"],
            "-" if accuracy is None else f"{accuracy:.4f}",
            r["tags"].get("prefect.flow_run_url") or r["tags"].get("prefect.flow_run_id") or "-",
            tracking.run_link(r["run_id"]),
        )
    console.print(table)


@app.command()
def sweep(
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
    grid: list[str] = typer.Option(..., "--grid", "-g", help="KEY=V1,V2 (repeatable); one pipeline per combination."),
    experiment: str | None = typer.Option(
        None, "--experiment", "-e", help="MLflow experiment for all runs (default: run.experiment)."
    ),
    mode: str = typer.Option(
        "auto",
        help="local (one after another here), deployment (flow runs of the served/pooled "
        "pipeline deployment) or auto (deployment when a server has it).",
    ),
    timeout: float = typer.Option(24 * 3600, help="Seconds to wait for deployment runs."),
) -> None:
    """Run one pipeline per combination of the grid in one MLflow experiment, then print the comparison."""

    def go():
        from flows.deploy import PIPELINE_DEPLOYMENT, deployment_exists
        from flows.prefect_api import server_configured
        from flows.sweep import plan_sweep, submit_sweep
        from flows.sweep import sweep as sweep_flow

        if mode not in ("auto", "local", "deployment"):
            raise VisionflowError(f"invalid --mode {mode!r}: choose auto, local or deployment")
        try:
            plan = plan_sweep(str(params) if params else None, set_ or [], grid, experiment)
        except ValueError as err:
            raise VisionflowError(str(err)) from None
        console.print(
            f"sweep {plan.sweep_id}: {len(plan.params)} combinations in experiment {plan.experiment}", highlight=False
        )
        remote = mode == "deployment" or (
            mode == "auto" and server_configured() and deployment_exists(PIPELINE_DEPLOYMENT)
        )
        if mode == "deployment" and not (server_configured() and deployment_exists(PIPELINE_DEPLOYMENT)):
            raise VisionflowError(
                f"no {PIPELINE_DEPLOYMENT} deployment: run `visionflow up` and `visionflow deploy` first"
            )
        return submit_sweep(plan, PIPELINE_DEPLOYMENT, timeout) if remote else sweep_flow(plan)

    outcome = _run_guarded(go)
    from components import tracking
    from flows.sweep import SWEEP_TAG

    for key, state in outcome.states.items():
        console.print(f"  {state:>10}  {key}", highlight=False)
    found = tracking.recent_runs(outcome.experiment, len(outcome.states), tag=(SWEEP_TAG, outcome.sweep_id))
    _print_comparison(
        found, None, f"sweep {outcome.sweep_id} ({outcome.experiment})", Path("runs") / f"sweep-{outcome.sweep_id}.png"
    )


@app.command()
def monitor(
    log: Path | None = typer.Option(
        None, "--log", "-l", help="Prediction log folder (serve --prediction-log); default monitor.log_dir."
    ),
    bundle: str | None = typer.Option(
        None, "--bundle", "-b", help="Reference bundle: folder, .tar.gz or models:/NAME@ALIAS; default the champion."
    ),
    feedback: Path | None = typer.Option(
        None, "--feedback", "-f", help="CSV of id,label for the logged predictions (live accuracy)."
    ),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Compare a window of the prediction log with the bundle's reference profile (drift report; Prefect event on drift)."""

    def go():
        p = load_params(params, set_ or [])
        from flows.monitor import monitor_flow

        return monitor_flow(str(log) if log else None, bundle, str(feedback) if feedback else None, p)

    result = _run_guarded(go)
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
    console.print(_summary_table("visionflow monitor", rows))
    for note in result.notes:
        console.print(f"  note: {note}", highlight=False)


@app.command()
def package(
    from_run: str = typer.Option(..., "--from-run", help="MLflow run id of a finished pipeline run."),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Package a finished run's model again: ONNX export + parity, bundle, register, champion/challenger gate."""

    def go():
        from flows.package import package_flow

        return package_flow(from_run, set_ or [])

    result = _run_guarded(go)
    console.print(
        _summary_table(
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
    )


@app.command("fit-spec")
def fit_spec(
    out: Path = typer.Argument(
        ..., help="Folder for the data snapshot, the spec and the training outputs (shared by all nodes)."
    ),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Prepare a training run for torchrun or SLURM: ingest, validate, open the MLflow train run, write
    OUT/fit_spec.json, and print the launch lines for trainer.num_nodes × trainer.devices processes."""

    def go():
        from components.training.launch import launch_commands, prepare_fit_spec

        p = load_params(params, set_ or [])
        spec_path = prepare_fit_spec(p, out)
        console.print(f"spec: {spec_path}", highlight=False)
        for name, line in launch_commands(spec_path, p).items():
            console.print(f"{name}: {line}", highlight=False, soft_wrap=True)

    _run_guarded(go)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="visionflow")


if __name__ == "__main__":
    sys.exit(main())
