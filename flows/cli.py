"""The `visionflow` command line: run, resume, validate-data, evaluate, explain, optimize, serve, promote, rollback,
up, down, deploy, retrain, compare, diff, runs, sweep, fit-spec.

Expected failures (bad params, bad data, a failed stage) print one line and exit 2.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import typer
from rich.markup import escape

from components.config import load_params
from components.errors import VisionflowError
from components.quiet import set_offline_defaults
from components.serving.settings import ServeSettings
from flows import cli_output
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


def _check_writable(params=None, mlflow: bool = True, prefect: bool = True) -> None:
    """One line naming the first place this command would write (MLflow store when local, params' runs and
    cache folders, Prefect home) that cannot be written, before anything starts (raises NotWritableError)."""
    from components.writable import check_writable, places_to_check

    tracking_uri = None
    if mlflow:
        from components.tracking import tracking_uri as current_uri

        tracking_uri = current_uri()
    prefect_home = None
    if prefect:
        from prefect.settings import get_current_settings

        prefect_home = get_current_settings().home
    runs_dir, cache_dir = (params.run.output_dir, params.run.cache_dir) if params is not None else (None, None)
    check_writable(places_to_check(tracking_uri, runs_dir, cache_dir, prefect_home))


@app.command()
def run(
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Run the whole pipeline (ingest, validate, train, evaluate) and print where to look."""

    def go():
        p = load_params(params, set_ or [])
        from flows.warm_start import early_start, wait_for_server

        _check_writable(p)  # before anything starts
        early_start()  # Prefect's temporary server and the training process start while the flow's modules import
        from flows.pipeline import pipeline

        wait_for_server()
        return pipeline(p, params_file=str(params) if params else None)

    cli_output.print_pipeline_result(_run_guarded(go))


@app.command()
def resume(
    run_id: str = typer.Argument(..., help="MLflow run id of the failed or killed pipeline run."),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Resume a failed, killed or crashed pipeline run: same MLflow run, training from its last checkpoint."""

    def go():
        from flows.warm_start import early_start, wait_for_server

        _check_writable()
        early_start()  # as for `run`
        from flows.pipeline import resume_pipeline

        wait_for_server()
        return resume_pipeline(run_id, set_ or [])

    cli_output.print_pipeline_result(_run_guarded(go))


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
        from components.data.validate import validate

        p = load_params(params, [*(set_ or []), f"data.path={path}"])
        _check_writable(p, mlflow=False, prefect=False)
        out_dir = out or Path(tempfile.mkdtemp(prefix="visionflow-validate-"))
        snapshot = ingest(p.data, out_dir / "snapshot", Path(p.run.cache_dir))
        return validate(snapshot, p.data, out_dir)

    cli_output.print_validation(_run_guarded(go))


@app.command("plan")
def plan_command(
    path: str = typer.Argument(..., help="Folder, CSV manifest, archive, bundled:digits or torchvision:NAME."),
    params: Path | None = PARAMS_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Show what a run would decide from the data (every `auto` param, its value and why); nothing is trained."""

    def go():
        import tempfile

        from components.planning import plan_source

        p = load_params(params, [*(set_ or []), f"data.path={path}"])
        return plan_source(p, Path(tempfile.mkdtemp(prefix="visionflow-plan-")))

    cli_output.print_plan(_run_guarded(go))


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
        _check_writable(p)
        from flows.evaluate import evaluate_flow

        return evaluate_flow(
            str(checkpoint.resolve()), p.data, split, p.evaluate, p.run.experiment, p.run.output_dir, p.run.cache_dir
        )

    cli_output.print_evaluation(_run_guarded(go))


@app.command()
def explain(
    images: list[str] = typer.Argument(None, help="Image files to explain."),
    run: str | None = typer.Option(None, "--run", help="MLflow run id of a finished pipeline run (its checkpoint)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c", help="A visionflow checkpoint (.ckpt)."),
    out: Path = typer.Option(Path("explanations"), "--out", "-o", help="Folder for the PNGs (created)."),
    method: str = typer.Option("auto", help="auto, gradcam or integrated_gradients (evaluate.explain_method)."),
) -> None:
    """Show where the model looked: one PNG per image, overlay titled with the predicted class and confidence."""

    def go():
        from flows.explain import explain_command

        if method not in ("auto", "gradcam", "integrated_gradients"):
            raise VisionflowError(f"invalid --method {method!r}: choose auto, gradcam or integrated_gradients")
        return explain_command(run, str(checkpoint) if checkpoint else None, images or [], str(out), method)

    cli_output.print_explanations(_run_guarded(go))


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
        from flows.optimize import optimize_from_checkpoint, optimize_from_run

        if bool(from_run) == bool(checkpoint):
            raise VisionflowError("give exactly one of --from-run RUN_ID or --checkpoint CKPT (with --data)")
        if from_run:
            _check_writable()
            return optimize_from_run(from_run, set_ or [])
        if not data:
            raise VisionflowError("--checkpoint needs --data (the data set to fine-tune, calibrate and measure on)")
        if not checkpoint.is_file():
            raise VisionflowError(f"checkpoint not found: {checkpoint}")
        p = load_params(params, ["optimize.enabled=true", *(set_ or []), f"data.path={data}"])
        _check_writable(p)
        return optimize_from_checkpoint(str(checkpoint.resolve()), p)

    cli_output.print_variants(_run_guarded(go))


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

    def go():
        from pydantic import ValidationError

        from components.packaging.resolve import resolve_bundle
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
        cli_output.print_serving(bundle, settings)
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

        _check_writable(prefect=False)
        return promote_version(name, version)

    cli_output.say(_run_guarded(go))


@app.command()
def rollback(
    name: str = typer.Option("visionflow-classifier", "--name", help="Registered model name (package.model_name)."),
) -> None:
    """Give the champion alias back to the version that held it before the last promotion."""

    def go():
        from flows.package import rollback_champion

        _check_writable(prefect=False)
        return rollback_champion(name)

    cli_output.say(_run_guarded(go))


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
        from flows.local_stack import running_stack

        stack = running_stack()
        for key, value in (stack.env() if stack else {}).items():
            os.environ.setdefault(key, value)
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
    from flows.local_stack import default_state_dir, start_stack

    def go():
        return start_stack(state_dir or default_state_dir(), prefect_port, mlflow_port, timeout, database_url, auth)

    cli_output.print_stack(*_run_guarded(go))


@app.command()
def down(state_dir: Path | None = STATE_DIR_OPTION) -> None:
    """Stop the servers `visionflow up` started (exactly those processes)."""
    from flows.local_stack import default_state_dir, stop_stack

    stopped = _run_guarded(lambda: stop_stack(state_dir or default_state_dir()))
    cli_output.print_stopped(stopped)


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

    def go():
        from flows.deploy import build_deployments, deploy_to_pool, serve_deployments
        from flows.prefect_api import server_configured

        p = load_params(params, set_ or [])
        _check_writable(p)
        if not server_configured():
            raise VisionflowError("deploy needs a Prefect server: run `visionflow up` first (or set PREFECT_API_URL)")
        deployments = build_deployments(p)
        if pool:
            cli_output.print_deployments_sent(deploy_to_pool(deployments, pool), pool)
            return
        cli_output.print_deployments_serving(p.retrain)
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
        _check_writable(p)
        return retrain(p, force=force)

    cli_output.print_retrain(_run_guarded(go))


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
    cli_output.print_comparison(runs, metric, f"runs of {experiment or 'all experiments'} (newest first)", plot)


@app.command()
def runs(
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="MLflow experiment (default: all)."),
    last: int = typer.Option(10, "--last", "-n", min=1, help="How many of the newest runs."),
) -> None:
    """List recent runs with their status and their Prefect and MLflow links."""
    from components import tracking

    found = _run_guarded(lambda: tracking.recent_runs(experiment, last))
    cli_output.print_runs(found, tracking.tracking_uri())


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
        _check_writable(load_params(params, set_ or []))
        try:
            plan = plan_sweep(str(params) if params else None, set_ or [], grid, experiment)
        except ValueError as err:
            raise VisionflowError(str(err)) from None
        cli_output.print_sweep_planned(plan)
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

    found = tracking.recent_runs(outcome.experiment, len(outcome.states), tag=(SWEEP_TAG, outcome.sweep_id))
    cli_output.print_sweep(outcome, found)


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

    def go():
        from flows.tune import check_pool_deployment, plan_tune
        from flows.tune import tune as tune_flow

        plan = plan_tune(
            str(params) if params else None,
            set_ or [],
            str(space),
            trials,
            parallel,
            timeout,
            study,
            storage,
            then_run,
            str(output) if output else None,
        )
        if parallel > 1:
            check_pool_deployment()
        cli_output.print_tune_planned(plan)
        return tune_flow(plan)

    cli_output.print_tune(_run_guarded(go))


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

    def go():
        p = load_params(params, set_ or [])
        _check_writable(p)
        from flows.monitor import monitor_flow

        return monitor_flow(str(log) if log else None, bundle, str(feedback) if feedback else None, p)

    cli_output.print_monitor(_run_guarded(go))


@app.command()
def package(
    from_run: str = typer.Option(..., "--from-run", help="MLflow run id of a finished pipeline run."),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Package a finished run's model again: ONNX export + parity, bundle, register, champion/challenger gate."""

    def go():
        from flows.package import package_flow

        _check_writable()
        return package_flow(from_run, set_ or [])

    cli_output.print_package(_run_guarded(go), from_run)


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
        _check_writable(p, prefect=False)
        spec_path = prepare_fit_spec(p, out)
        cli_output.print_fit_spec(spec_path, launch_commands(spec_path, p))

    _run_guarded(go)


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

    def go():
        if split not in (None, "all", "train", "val", "test"):
            raise VisionflowError(f"invalid --split {split!r}: choose all, train, val or test")
        from flows.diff import check_pair, diff_flow

        check_pair(run_a, run_b)  # an unknown run, a run without a model, other label sets: before any flow starts
        _check_writable()
        return diff_flow(run_a, run_b, data, split, str(out.resolve()) if out else None, grid)

    cli_output.print_diff(_run_guarded(go), run_a, run_b)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="visionflow")


if __name__ == "__main__":
    sys.exit(main())
