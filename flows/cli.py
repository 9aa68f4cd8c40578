"""The `visionflow` command line: run, resume, validate-data, plan, evaluate, explain, optimize, serve, promote,
rollback, up, down, deploy, retrain, compare, runs, sweep, tune, monitor, package, fit-spec, diff.

Each command parses its options, calls its one function in flows/commands.py inside `_run_guarded` and prints
the result with flows/cli_output.py. Expected failures (bad params, bad data, a failed stage) print one line and
exit 2; any other error exits 1 with its traceback; an interrupt exits 130.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import typer
from rich.markup import escape

from components import fast_exit
from components.config import EvaluateParams, PackageParams
from components.errors import VisionflowError
from components.quiet import set_offline_defaults
from components.serving.settings import ServeSettings
from flows import cli_output, commands
from flows.cli_output import err_console

# Offline-safe defaults and output routing, set before prefect / mlflow / albumentations are imported (lazily).
set_offline_defaults(terminal=True)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="visionflow: tracked, compressed, deployable image classifiers.",
)

PARAMS_OPTION = typer.Option(None, "--params", "-p", help="Params YAML (default: built-in defaults).")
SET_OPTION = typer.Option(
    None, "--set", "-s", help="Override one parameter, e.g. --set train.max_epochs=5 (repeatable)."
)
MODEL_NAME_OPTION = typer.Option(
    PackageParams.model_fields["model_name"].default, "--name", help="Registered model name (package.model_name)."
)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _is_interrupt(err: BaseException) -> bool:
    from prefect.exceptions import TerminationSignal

    return isinstance(err, (KeyboardInterrupt, TerminationSignal))


_LOG_FILE: Path | None = None  # this command's log file (set by the app callback)


def _run_guarded(fn):
    """Call fn(); VisionflowError → one line on stderr and exit 2 (its traceback in the log file); any other
    error → its traceback and the log file's path, exit 1; SIGTERM ends runs as KILLED."""
    from components.quiet import log_only

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return fn()
    except VisionflowError as err:
        log_only(f"error: {err}", err)
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except BaseException as err:
        if not _is_interrupt(err):
            import traceback

            log_only(f"unexpected error: {err!r}", err)
            traceback.print_exception(err, file=sys.stderr)
            where = f"; the log: {_LOG_FILE}" if _LOG_FILE else ""
            err_console.print(
                f"[bold red]unexpected error[/] {escape(type(err).__name__)}: {escape(str(err))}{escape(where)}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        err_console.print(
            "[bold red]interrupted[/]: the MLflow run is marked KILLED; `visionflow resume RUN_ID` continues it"
        )
        raise typer.Exit(130) from None


@app.command()
def run(
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Run the whole pipeline (ingest, validate, train, evaluate) and print where to look."""
    cli_output.print_pipeline_result(_run_guarded(lambda: commands.run_pipeline(params, set_ or [])))


@app.command()
def resume(
    run_id: str = typer.Argument(..., help="MLflow run id of the failed or killed pipeline run."),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Resume a failed, killed or crashed pipeline run: same MLflow run, training from its last checkpoint."""
    cli_output.print_pipeline_result(_run_guarded(lambda: commands.resume_run(run_id, set_ or [])))


@app.command("validate-data")
def validate_data(
    path: str = typer.Argument(..., help="Folder, CSV manifest, archive, bundled:digits or torchvision:NAME."),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
    out: Path | None = typer.Option(None, help="Where to write manifest and report (default: a temp folder)."),
) -> None:
    """Check every image of a data set and print the validation report (no training)."""
    cli_output.print_validation(_run_guarded(lambda: commands.validate_data(path, params, set_ or [], out)))


@app.command("plan")
def plan_command(
    path: str = typer.Argument(..., help="Folder, CSV manifest, archive, bundled:digits or torchvision:NAME."),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Show what a run would decide from the data (every `auto` param, its value and why); nothing is trained."""
    cli_output.print_plan(_run_guarded(lambda: commands.plan_data(path, params, set_ or [])))


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A visionflow checkpoint (.ckpt)."),
    data: str = typer.Option(..., "--data", "-d", help="Data set to evaluate on (any source `run` accepts)."),
    split: str = typer.Option("all", help="all, train, val or test."),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Evaluate an existing checkpoint on a data set; logs an MLflow run and prints the figures."""
    result = _run_guarded(lambda: commands.evaluate_checkpoint(checkpoint, data, split, params, set_ or []))
    cli_output.print_evaluation(result)


@app.command()
def explain(
    images: list[str] = typer.Argument(None, help="Image files to explain."),
    run: str | None = typer.Option(None, "--run", help="MLflow run id of a finished pipeline run (its checkpoint)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c", help="A visionflow checkpoint (.ckpt)."),
    out: Path = typer.Option(Path("explanations"), "--out", "-o", help="Folder for the PNGs (created)."),
    method: str = typer.Option(
        EvaluateParams.model_fields["explain_method"].default,
        help="auto, gradcam or integrated_gradients (evaluate.explain_method).",
    ),
) -> None:
    """Show where the model looked: one PNG per image, overlay titled with the predicted class and confidence."""
    cli_output.print_explanations(
        _run_guarded(lambda: commands.explain_images(images or [], run, checkpoint, out, method))
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
    result = _run_guarded(lambda: commands.optimize_model(from_run, checkpoint, data, params, set_ or []))
    cli_output.print_variants(result)


def _serve_option(name: str, *flags: str, help: str | None = None):
    """A `serve` option whose default and help come from ServeSettings (one definition of each limit)."""
    field = ServeSettings.model_fields[name]
    return typer.Option(field.default, *flags, help=help or field.description)


@app.command()
def serve(
    source: str = typer.Argument(
        ..., help="A bundle folder, a bundle .tar.gz, or a registry URI like models:/NAME@champion."
    ),
    host: str = _serve_option("host"),
    port: int = _serve_option("port"),
    max_body_bytes: int = _serve_option("max_body_bytes"),
    max_pixels: int = _serve_option("max_pixels"),
    max_images: int = _serve_option("max_images"),
    top_k: int = _serve_option("top_k"),
    prediction_log: Path | None = _serve_option("prediction_log_dir", "--prediction-log"),
    prediction_log_max_bytes: int = _serve_option("prediction_log_max_bytes"),
    prediction_log_files: int = _serve_option("prediction_log_files"),
    store_images: bool = _serve_option("store_images", "--store-images"),
) -> None:
    """Serve a model bundle over HTTP: POST /predict, GET /health /ready /metadata /metrics."""
    settings = dict(
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
    _run_guarded(lambda: commands.serve_bundle(source, cli_output.print_serving, **settings))


@app.command()
def promote(
    version: str = typer.Argument(..., help="Registered model version to make champion."),
    name: str = MODEL_NAME_OPTION,
) -> None:
    """Make a registered model version the champion (recorded in the registry history)."""
    cli_output.say(_run_guarded(lambda: commands.promote(name, version)))


@app.command()
def rollback(
    name: str = MODEL_NAME_OPTION,
) -> None:
    """Give the champion alias back to the version that held it before the last promotion."""
    cli_output.say(_run_guarded(lambda: commands.rollback(name)))


# --- the local stack, deployments, retraining, comparison ------------------------------------------

STATE_DIR_OPTION = typer.Option(
    None, "--state-dir", help="Stack state folder (default: $VISIONFLOW_STACK_DIR or .visionflow/stack)."
)


@app.callback()
def _use_local_stack(
    ctx: typer.Context,
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Also show tracebacks and third-party messages on the terminal (they always go to the log file, "
        ".visionflow/logs/COMMAND-TIME-PID.log).",
    ),
) -> None:
    """Point commands at the stack `visionflow up` started, unless PREFECT_API_URL / MLFLOW_TRACKING_URI are set;
    then route this command's output (log file, terminal)."""
    if ctx.invoked_subcommand not in ("up", "down"):
        commands.use_running_stack()
    _route_output(ctx.invoked_subcommand or "visionflow", verbose)


_WITHOUT_PREFECT = {"serve", "up", "down"}  # commands that never import Prefect (serve starts fast and light)


def _route_output(command: str, verbose: bool) -> None:
    """Everything to this command's log file (handed to the training process too); to the terminal progress,
    results and warnings that matter (components.quiet), or everything with --verbose."""
    global _LOG_FILE
    if command not in _WITHOUT_PREFECT:
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()  # Prefect's console handler first (on the root logger): route_output then filters it
    from components.quiet import LOG_FILE_ENV, VERBOSE_ENV, log_file_for, route_output

    _LOG_FILE = log_file_for(command)
    if _LOG_FILE:
        os.environ[LOG_FILE_ENV] = str(_LOG_FILE)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    route_output(_LOG_FILE, verbose or os.environ.get(VERBOSE_ENV) == "1")


@app.command()
def up(
    state_dir: Path | None = STATE_DIR_OPTION,
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server (UI and API)."),
    mlflow_port: int = typer.Option(5000, help="Port of the MLflow server."),
    timeout: float = typer.Option(120, help="Seconds to wait for both servers to answer."),
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        envvar="VISIONFLOW_DATABASE_URL",
        help="Team stack: postgresql://USER:PASSWORD@HOST:PORT, whose databases prefect, mlflow and optuna "
        "hold the runs (default: SQLite files in the state folder). Prefer the environment variable.",
    ),
    auth: bool = typer.Option(
        False, "--auth", help="Basic auth on both servers: user admin, password from $VISIONFLOW_STACK_PASSWORD."
    ),
) -> None:
    """Start a Prefect server and an MLflow server (loopback only; SQLite, or PostgreSQL with --database-url)."""
    started = _run_guarded(lambda: commands.stack_up(state_dir, prefect_port, mlflow_port, timeout, database_url, auth))
    cli_output.print_stack(*started)


@app.command()
def down(state_dir: Path | None = STATE_DIR_OPTION) -> None:
    """Stop the servers `visionflow up` started (exactly those processes)."""
    cli_output.print_stopped(_run_guarded(lambda: commands.stack_down(state_dir)))


@app.command()
def deploy(
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
    pool: str | None = typer.Option(
        None, "--pool", help="Send the deployments to this Prefect work pool instead of serving them here."
    ),
    limit: int | None = typer.Option(None, help="Most flow runs this process runs at once (serve only)."),
) -> None:
    """Serve the deployments (pipeline, retrain on its cron schedule, evaluate, optimize, package, monitor) for
    the Prefect UI."""
    ids = _run_guarded(
        lambda: commands.deploy_flows(params, set_ or [], pool, limit, cli_output.print_deployments_serving)
    )
    if ids is not None:
        cli_output.print_deployments_sent(ids, pool)


@app.command("retrain")
def retrain_command(
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
    force: bool = typer.Option(False, help="Train a challenger even when the data did not change."),
) -> None:
    """Retrain now: no new data → stop; else train a challenger and promote it only if it beats the champion."""
    cli_output.print_retrain(_run_guarded(lambda: commands.retrain_now(params, set_ or [], force)))


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
    runs = _run_guarded(lambda: commands.compare_runs(experiment, last, sweep_id))
    cli_output.print_comparison(runs, metric, f"runs of {experiment or 'all experiments'} (newest first)", plot)


@app.command()
def runs(
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="MLflow experiment (default: all)."),
    last: int = typer.Option(10, "--last", "-n", min=1, help="How many of the newest runs."),
) -> None:
    """List recent runs with their status and their Prefect and MLflow links."""
    cli_output.print_runs(*_run_guarded(lambda: commands.list_runs(experiment, last)))


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
    report = _run_guarded(
        lambda: commands.run_sweep(params, set_ or [], grid, experiment, mode, timeout, cli_output.print_sweep_planned)
    )
    cli_output.print_sweep(report.outcome, report.runs)


@app.command()
def tune(
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
    space: Path = typer.Option(..., "--space", help="Search space YAML: PipelineParams fields and their ranges."),
    trials: int = typer.Option(20, "--trials", "-n", help="Ended trials the study should have (resume counts)."),
    parallel: int = typer.Option(
        1, "--parallel", help="Trials at once, as flow runs of the pipeline deployment on its work pool."
    ),
    timeout: float | None = typer.Option(None, "--timeout", help="Minutes after which no new trial starts."),
    study: str | None = typer.Option(None, "--study", help="Study name (default: the space's, else EXPERIMENT-tune)."),
    storage: str | None = typer.Option(
        None, "--storage", help="Optuna database URL (default: $VISIONFLOW_TUNE_STORAGE, else .visionflow/optuna.db)."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Best params file (default: in run.output_dir)."),
    then_run: bool = typer.Option(False, "--then-run", help="Train the full pipeline with the best params."),
) -> None:
    """Search hyperparameters with Optuna (TPE, pruning hopeless trials per epoch); write the best params file."""
    result = _run_guarded(
        lambda: commands.tune_study(
            params,
            set_ or [],
            space,
            trials,
            parallel,
            timeout,
            study,
            storage,
            output,
            then_run,
            cli_output.print_tune_planned,
        )
    )
    cli_output.print_tune(result)


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
    """Compare a window of the prediction log with the bundle's reference profile (drift report; Prefect event on
    drift)."""
    cli_output.print_monitor(
        _run_guarded(lambda: commands.monitor_predictions(log, bundle, feedback, params, set_ or []))
    )


@app.command()
def package(
    from_run: str = typer.Option(..., "--from-run", help="MLflow run id of a finished pipeline run."),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Package a finished run's model again: ONNX export + parity, bundle, register, champion/challenger gate."""
    cli_output.print_package(_run_guarded(lambda: commands.package_run(from_run, set_ or [])), from_run)


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
    cli_output.print_fit_spec(*_run_guarded(lambda: commands.fit_spec(out, params, set_ or [])))


@app.command()
def diff(
    run_a: str = typer.Argument(..., help="MLflow run id of the earlier model (A, before)."),
    run_b: str = typer.Argument(..., help="MLflow run id of the later model (B, after)."),
    data: str | None = typer.Option(
        None, "--data", "-d", help="Score on this data set (any source `run` accepts) instead of a run's split."
    ),
    split: str | None = typer.Option(
        None, help="all, train, val or test (default: the newer run's test split; all of --data)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for the diff's files (default runs/diff-<time>-<A>-<B>)."
    ),
    grid: int = typer.Option(25, min=0, max=100, help="Images drawn per grid of fixed and of broken images."),
) -> None:
    """What changed between two runs' models on the same images: per-class deltas, confusion difference, fixed and
    broken images, calibration curves; logged to a new MLflow run tagged with both run ids."""
    done = _run_guarded(lambda: commands.diff_runs(run_a, run_b, data, split, out, grid))
    cli_output.print_diff(done, run_a, run_b)


def main() -> None:
    """Console-script entry point. The process ends after the atexit handlers, without Python's module teardown
    (3.3 s after a `run`, components/fast_exit.py)."""
    fast_exit.arm()
    try:
        app(prog_name="visionflow")
    except SystemExit as done:
        fast_exit.exit_with(done.code)


if __name__ == "__main__":
    sys.exit(main())
