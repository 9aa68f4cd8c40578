"""One function per `visionflow` command: what the command does once its options are parsed.

flows/cli.py parses the options, calls the command's function here inside its error guard and prints what it
returns (flows/cli_output.py). Everything a command decides lives here: the checks of option combinations and
choices, the writable-places check, loading params, choosing where a sweep runs, which flow or stack function
to call. A command that prints before it blocks or while it works (serve, deploy, sweep, tune) takes a
callback for that and is handed the object to print, never text.

Imports of Prefect, MLflow and the flows are inside the functions, as in the CLI: `visionflow --help` and
`serve` stay fast, and flows/cli.py sets the offline defaults before any of them loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, get_args

from components.config import EvaluateParams, load_params
from components.errors import VisionflowError
from flows.warm_start import start_temporary_server, wait_for_server

if TYPE_CHECKING:
    from components.config import PipelineParams, RetrainParams
    from components.data.validate import ValidationReport
    from components.evaluation.explain import Explanation
    from components.planning import Plan
    from components.serving.settings import ServeSettings
    from flows.diff import DiffRun
    from flows.evaluate import EvaluationResult
    from flows.local_stack import StackState
    from flows.monitor import MonitorResult
    from flows.optimize import OptimizeResult
    from flows.package import PackageResult
    from flows.pipeline import PipelineResult
    from flows.retrain import RetrainResult
    from flows.sweep import SweepOutcome, SweepPlan
    from flows.tune import TunePlan, TuneResult

SPLITS = ("all", "train", "val", "test")
EXPLAIN_METHODS = get_args(EvaluateParams.model_fields["explain_method"].annotation)
SWEEP_MODES = ("auto", "local", "deployment")


def check_choice(option: str, value: str | None, choices: tuple[str, ...]) -> None:
    """VisionflowError (one line, exit 2) naming the option and its choices unless `value` is one of them."""
    if value not in choices:
        listed = ", ".join(choices[:-1]) + " or " + choices[-1]
        raise VisionflowError(f"invalid --{option} {value!r}: choose {listed}")


def check_writable(params: PipelineParams | None = None, mlflow: bool = True, prefect: bool = True) -> None:
    """One line naming the first place this command would write (MLflow store when local, params' runs and
    cache folders, Prefect home) that cannot be written, before anything starts (raises NotWritableError)."""
    from components import writable

    tracking_uri = None
    if mlflow:
        from components.tracking import tracking_uri as current_uri

        tracking_uri = current_uri()
    prefect_home = None
    if prefect:
        from prefect.settings import get_current_settings

        prefect_home = get_current_settings().home
    runs_dir, cache_dir = (params.run.output_dir, params.run.cache_dir) if params is not None else (None, None)
    writable.check_writable(writable.places_to_check(tracking_uri, runs_dir, cache_dir, prefect_home))


def check_data(path: str) -> None:
    """One line (DataError) for a data source that cannot be one (components.data.sources.check_source: missing,
    unknown bundled name, no class folders, neither CSV nor archive), before anything starts (ingest asks again)."""
    from components.data.sources import check_source

    check_source(path)


def use_running_stack() -> None:
    """Point this process at the stack `visionflow up` started (its Prefect and MLflow URLs), unless
    PREFECT_API_URL / MLFLOW_TRACKING_URI are set already."""
    import os

    from flows.local_stack import running_stack

    stack = running_stack()
    for key, value in (stack.env() if stack else {}).items():
        os.environ.setdefault(key, value)


def _checkpoint_file(checkpoint: Path) -> str:
    """The checkpoint's absolute path; VisionflowError when it is not a file or not a visionflow checkpoint (checked
    here, before Prefect or a flow starts)."""
    from components.training.checkpoint import check_checkpoint

    if not checkpoint.is_file():
        raise VisionflowError(f"checkpoint not found: {checkpoint}")
    check_checkpoint(str(checkpoint))
    return str(checkpoint.resolve())


# --- run, resume, validate-data, plan, evaluate, explain, optimize -----------------------------------


def run_pipeline(params_file: Path | None, sets: list[str]) -> PipelineResult:
    """`run`: the whole pipeline with the params file and overrides."""
    p = load_params(params_file, sets)
    from flows.warm_start import early_start

    check_writable(p)  # before anything starts
    check_data(p.data.path)
    early_start()  # Prefect's temporary server and the training process start while the flow's modules import
    from flows.pipeline import pipeline

    wait_for_server()
    return pipeline(p, params_file=str(params_file) if params_file else None)


def resume_run(run_id: str, sets: list[str]) -> PipelineResult:
    """`resume`: the same MLflow run again, training from its last checkpoint."""
    from flows.runs import resumable_pipeline_run
    from flows.warm_start import early_start

    check_writable()
    resumable_pipeline_run(run_id)  # a run that cannot resume is one line before anything starts
    early_start()  # as for `run`
    from flows.pipeline import resume_pipeline

    wait_for_server()
    return resume_pipeline(run_id, sets)


def validate_data(path: str, params_file: Path | None, sets: list[str], out: Path | None) -> ValidationReport:
    """`validate-data`: ingest and validate `path` into `out` (default: a new temporary folder); no training."""
    import tempfile

    from components.data.ingest import ingest
    from components.data.validate import validate

    p = load_params(params_file, [*sets, f"data.path={path}"])
    check_writable(p, mlflow=False, prefect=False)
    out_dir = out or Path(tempfile.mkdtemp(prefix="visionflow-validate-"))
    snapshot = ingest(p.data, out_dir / "snapshot", Path(p.run.cache_dir))
    return validate(snapshot, p.data, out_dir)


def plan_data(path: str, params_file: Path | None, sets: list[str]) -> Plan:
    """`plan`: what a run would decide from the data at `path` (ingested and validated in a temporary folder that
    is removed afterwards); nothing is trained."""
    import tempfile

    from components.planning import plan_source

    p = load_params(params_file, [*sets, f"data.path={path}"])
    with tempfile.TemporaryDirectory(prefix="visionflow-plan-") as work:
        return plan_source(p, Path(work))


def evaluate_checkpoint(
    checkpoint: Path, data: str, split: str, params_file: Path | None, sets: list[str]
) -> EvaluationResult:
    """`evaluate`: a checkpoint on `split` of the data set `data`, as an MLflow run."""
    check_choice("split", split, SPLITS)
    ckpt = _checkpoint_file(checkpoint)
    p = load_params(params_file, [*sets, f"data.path={data}"])
    check_writable(p)
    check_data(p.data.path)
    start_temporary_server()  # Prefect's temporary server starts while the flow's modules import (as for `run`)
    from flows.evaluate import evaluate_flow

    wait_for_server()
    return evaluate_flow(ckpt, p.data, split, p.evaluate, p.run.experiment, p.run.output_dir, p.run.cache_dir)


def explain_images(
    images: list[str], run_id: str | None, checkpoint: Path | None, out: Path, method: str
) -> list[Explanation]:
    """`explain`: one PNG per image in `out`, from a run's checkpoint or `checkpoint`."""
    check_choice("method", method, EXPLAIN_METHODS)
    ckpt = str(checkpoint) if checkpoint else None
    if checkpoint and not run_id:  # both given: explain_command says to give one
        ckpt = _checkpoint_file(checkpoint)
    from flows.explain import explain_command  # no flow: Prefect's server is not needed

    return explain_command(run_id, ckpt, images, str(out), method)


def optimize_model(
    from_run: str | None, checkpoint: Path | None, data: str | None, params_file: Path | None, sets: list[str]
) -> OptimizeResult:
    """`optimize`: compress a finished run's model, or `checkpoint` on the data set `data`."""
    if bool(from_run) == bool(checkpoint):
        raise VisionflowError("give exactly one of --from-run RUN_ID or --checkpoint CKPT (with --data)")
    if from_run:
        from flows.runs import finished_pipeline_run

        check_writable()
        finished_pipeline_run(from_run, "optimize")  # an unknown or unfinished run is one line before torch loads
        from flows.optimize import optimize_from_run

        return optimize_from_run(from_run, sets)
    if not data:
        raise VisionflowError("--checkpoint needs --data (the data set to fine-tune, calibrate and measure on)")
    ckpt = _checkpoint_file(checkpoint)
    p = load_params(params_file, ["optimize.enabled=true", *sets, f"data.path={data}"])
    check_writable(p)
    check_data(p.data.path)
    start_temporary_server()
    from flows.optimize import optimize_from_checkpoint

    wait_for_server()
    return optimize_from_checkpoint(ckpt, p)


# --- serve, registry, the stack, deploy, retrain ---------------------------------------------------


def serve_bundle(source: str, on_start: Callable[[Path, ServeSettings], None], **settings: Any) -> None:
    """`serve`: check the settings (ServeSettings fields), resolve the bundle, call `on_start(bundle, settings)`,
    then serve until stopped. An invalid setting is a VisionflowError naming it."""
    from pydantic import ValidationError

    from components.packaging.resolve import resolve_bundle
    from components.serving.app import serve as run_server
    from components.serving.settings import ServeSettings

    try:
        checked = ServeSettings(**settings)
    except ValidationError as err:
        first = err.errors()[0]
        raise VisionflowError(f"invalid option {first['loc'][0]}: {first['msg']}") from None
    bundle = resolve_bundle(source)
    on_start(bundle, checked)
    run_server(bundle, checked)


def promote(name: str, version: str) -> str:
    """`promote`: make `version` of the registered model `name` the champion; returns what was done."""
    from flows.package import promote_version

    check_writable(prefect=False)
    return promote_version(name, version)


def rollback(name: str) -> str:
    """`rollback`: give the champion alias back to the version that held it before; returns what was done."""
    from flows.package import rollback_champion

    check_writable(prefect=False)
    return rollback_champion(name)


def stack_up(
    state_dir: Path | None,
    prefect_port: int,
    mlflow_port: int,
    timeout: float,
    database_url: str | None,
    auth: bool,
) -> tuple[StackState, bool]:
    """`up`: start (or find running) the Prefect and MLflow servers; returns their state and whether started."""
    from flows.local_stack import default_state_dir, start_stack

    return start_stack(state_dir or default_state_dir(), prefect_port, mlflow_port, timeout, database_url, auth)


def stack_down(state_dir: Path | None) -> list[str]:
    """`down`: stop the servers `up` started; returns the names of those stopped."""
    from flows.local_stack import default_state_dir, stop_stack

    return stop_stack(state_dir or default_state_dir())


def deploy_flows(
    params_file: Path | None,
    sets: list[str],
    pool: str | None,
    limit: int | None,
    on_serving: Callable[[RetrainParams], None],
) -> list[str] | None:
    """`deploy`: build the deployments; send them to work pool `pool` (returns their ids), or call
    `on_serving(params.retrain)` and serve them here until stopped (returns None)."""
    from flows.prefect_api import server_configured

    p = load_params(params_file, sets)
    check_writable(p)
    if not server_configured():
        raise VisionflowError("deploy needs a Prefect server: run `visionflow up` first (or set PREFECT_API_URL)")
    from flows.deploy import build_deployments, deploy_to_pool, serve_deployments  # every flow: after the checks

    deployments = build_deployments(p)
    if pool:
        return deploy_to_pool(deployments, pool)
    on_serving(p.retrain)
    serve_deployments(deployments, limit)
    return None


def retrain_now(params_file: Path | None, sets: list[str], force: bool) -> RetrainResult:
    """`retrain`: retrain now when the data changed (or `force`), promoting only a better challenger."""
    p = load_params(params_file, sets)
    check_writable(p)
    check_data(p.data.path)
    start_temporary_server()
    from flows.retrain import retrain

    wait_for_server()
    return retrain(p, force=force)


# --- compare, runs, sweep, tune --------------------------------------------------------------------


def compare_runs(experiment: str | None, last: int, sweep_id: str | None) -> list[dict]:
    """`compare`: the `last` newest runs of `experiment` (all when None), only those of `sweep_id` when given."""
    from components import tracking
    from flows.sweep import SWEEP_TAG

    return tracking.recent_runs(experiment, last, tag=(SWEEP_TAG, sweep_id) if sweep_id else None)


def list_runs(experiment: str | None, last: int) -> tuple[list[dict], str]:
    """`runs`: the `last` newest runs of `experiment` (all when None) and the tracking URI their links use."""
    from components import tracking

    return tracking.recent_runs(experiment, last), tracking.tracking_uri()


class SweepReport(NamedTuple):
    """How a sweep's combinations ended, and their MLflow runs (for the comparison)."""

    outcome: SweepOutcome
    runs: list[dict]


def _sweep_on_deployment(mode: str) -> bool:
    """Whether a sweep's combinations run as flow runs of the pipeline deployment (else here, one after
    another): `deployment` requires that deployment, `auto` uses it when a server has it."""
    from flows.prefect_api import PIPELINE_DEPLOYMENT, deployment_exists, server_configured

    if mode == "local":
        return False
    available = server_configured() and deployment_exists(PIPELINE_DEPLOYMENT)
    if mode == "deployment" and not available:
        raise VisionflowError(f"no {PIPELINE_DEPLOYMENT} deployment: run `visionflow up` and `visionflow deploy` first")
    return available


def run_sweep(
    params_file: Path | None,
    sets: list[str],
    grid: list[str],
    experiment: str | None,
    mode: str,
    timeout: float,
    on_planned: Callable[[SweepPlan], None],
) -> SweepReport:
    """`sweep`: plan (every combination validated), call `on_planned(plan)`, run here or on the deployment as
    `mode` says, then look up the sweep's runs."""
    from components import tracking
    from flows.prefect_api import PIPELINE_DEPLOYMENT
    from flows.sweep import SWEEP_TAG, plan_sweep, submit_sweep
    from flows.sweep import sweep as sweep_flow

    check_choice("mode", mode, SWEEP_MODES)
    check_writable(load_params(params_file, sets))
    try:
        plan = plan_sweep(str(params_file) if params_file else None, sets, grid, experiment)
    except ValueError as err:
        raise VisionflowError(str(err)) from None
    on_planned(plan)
    if _sweep_on_deployment(mode):
        outcome = submit_sweep(plan, PIPELINE_DEPLOYMENT, timeout)
    else:
        outcome = sweep_flow(plan)
    runs = tracking.recent_runs(outcome.experiment, len(outcome.states), tag=(SWEEP_TAG, outcome.sweep_id))
    return SweepReport(outcome, runs)


def tune_study(
    params_file: Path | None,
    sets: list[str],
    space: Path,
    trials: int,
    parallel: int,
    timeout: float | None,
    study: str | None,
    storage: str | None,
    output: Path | None,
    then_run: bool,
    on_planned: Callable[[TunePlan], None],
) -> TuneResult:
    """`tune`: plan the search (everything validated, a work pool checked for `parallel` > 1), call
    `on_planned(plan)`, then search."""
    from flows.tune import check_pool_deployment, plan_tune
    from flows.tune import tune as tune_flow

    plan = plan_tune(
        str(params_file) if params_file else None,
        sets,
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
    on_planned(plan)
    return tune_flow(plan)


# --- monitor, package, fit-spec, diff --------------------------------------------------------------


def monitor_predictions(
    log: Path | None, bundle: str | None, feedback: Path | None, params_file: Path | None, sets: list[str]
) -> MonitorResult:
    """`monitor`: compare the prediction log's window with the bundle's reference profile."""
    p = load_params(params_file, sets)
    check_writable(p)
    start_temporary_server()
    from components.packaging.resolve import resolve_bundle
    from flows.monitor import default_bundle_source, monitor_flow

    # a bundle that cannot be found is one line while the server starts, before a flow run is made for it
    resolve_bundle(bundle or default_bundle_source(p), p.run.cache_dir)
    wait_for_server()
    return monitor_flow(str(log) if log else None, bundle, str(feedback) if feedback else None, p)


def package_run(from_run: str, sets: list[str]) -> PackageResult:
    """`package`: package a finished run's model again (export, bundle, register, gate)."""
    from flows.runs import finished_pipeline_run

    check_writable()
    finished_pipeline_run(from_run, "package")  # an unknown or unfinished run is one line before anything starts
    start_temporary_server()
    from flows.package import package_flow

    wait_for_server()
    return package_flow(from_run, sets)


def fit_spec(out: Path, params_file: Path | None, sets: list[str]) -> tuple[Path, dict[str, str]]:
    """`fit-spec`: prepare a training run in `out` for torchrun or SLURM; returns the spec file and the launch
    line of each launcher."""
    from components.training.launch import launch_commands, prepare_fit_spec

    p = load_params(params_file, sets)
    check_writable(p, prefect=False)
    spec_path = prepare_fit_spec(p, out)
    return spec_path, launch_commands(spec_path, p)


def diff_runs(run_a: str, run_b: str, data: str | None, split: str | None, out: Path | None, grid: int) -> DiffRun:
    """`diff`: what changed between two runs' models on the same images, as a new MLflow run."""
    if split is not None:
        check_choice("split", split, SPLITS)
    from flows.diff import check_pair, diff_flow

    check_pair(run_a, run_b)  # an unknown run, a run without a model, other label sets: before any flow starts
    check_writable()
    start_temporary_server()  # check_pair imported the flow's modules: the server's start is still 2.4 s sooner
    wait_for_server()
    return diff_flow(run_a, run_b, data, split, str(out.resolve()) if out else None, grid)
