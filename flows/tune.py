"""Hyperparameter search (`visionflow tune`): an Optuna study (TPE sampler, median or successive-halving
pruner) whose trials are pipeline runs, each an MLflow child run of one study run.

The study lives in the stack's database ($VISIONFLOW_TUNE_STORAGE: an SQLite file beside a local stack,
the `optuna` database of the team stack), so the same study name resumes a killed search: trials left
RUNNING by a killed search are marked FAIL (study and MLflow) and the search continues up to `trials`
ended trials. Alone, trials run one after another in this process; with `parallel` > 1 they are flow
runs of the pipeline deployment on a work pool, `parallel` at a time. The training process of each
trial reports val/acc per epoch to the study and stops when the pruner says so (components.tuning).

A pooled trial whose worker or flow-run process is killed never keeps the search waiting: its flow run sends
heartbeats, and Prefect's zombie automation (flows/deploy.py `crash_silent_runs`, made here if missing) sets it
Crashed after $VISIONFLOW_ZOMBIE_AFTER_S seconds of silence; the trial then ends FAIL in the study and in MLflow.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from components import tracking
from components.config import PipelineParams, load_params
from components.errors import VisionflowError
from components.tuning.space import OBJECTIVE_METRIC, SearchSpace, load_space, overrides_for

STUDY_TAG = "visionflow.tune.study"
TRIAL_TAG = "visionflow.tune.trial"
STORAGE_ENV = "VISIONFLOW_TUNE_STORAGE"


class TunePlan(BaseModel):
    """A validated search: nothing has run yet."""

    study: str
    storage: str
    space: SearchSpace
    params_file: str | None = None
    sets: list[str] = []
    experiment: str
    trials: int
    parallel: int = 1
    timeout_min: float | None = None
    then_run: bool = False
    output: str


class TuneResult(BaseModel):
    """How a search ended."""

    study: str
    run_id: str
    trials: dict[str, int]  # ended trials by state (COMPLETE, PRUNED, FAIL)
    best_params: dict[str, Any] = {}
    best_value: float | None = None
    best_trial: int | None = None
    best_params_file: str | None = None
    then_run_id: str | None = None
    then_test_accuracy: float | None = None


def default_storage() -> str:
    """$VISIONFLOW_TUNE_STORAGE (set by a running stack), else an SQLite file under .visionflow/."""
    return os.environ.get(STORAGE_ENV) or f"sqlite:///{Path('.visionflow/optuna.db').resolve()}"


def _has_password(url: str) -> bool:
    return urlsplit(url).password is not None


def plan_tune(
    params_file: str | None,
    sets: list[str],
    space_file: str,
    trials: int,
    parallel: int = 1,
    timeout_min: float | None = None,
    study: str | None = None,
    storage: str | None = None,
    then_run: bool = False,
    output: str | None = None,
) -> TunePlan:
    """Validate everything before a trial starts: params, the space against PipelineParams, the counts, the
    study database and (for an existing study) its space. Raises VisionflowError (one line)."""
    from components.tuning.study import check_study

    base = load_params(params_file, sets)
    space = load_space(space_file, params_file, sets)
    if trials < 1 or parallel < 1:
        raise VisionflowError(f"--trials and --parallel must be at least 1 (got {trials} and {parallel})")
    if timeout_min is not None and timeout_min <= 0:
        raise VisionflowError(f"--timeout must be positive minutes (got {timeout_min:g})")
    name = study or space.study or f"{base.run.experiment}-tune"
    url = storage or default_storage()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        check_study(url, name, space)
    except VisionflowError:
        raise
    except Exception as err:  # SQLAlchemy: unreachable database, bad URL, no driver
        reason = " ".join(str(err).split())[:200]
        raise VisionflowError(f"cannot open the study database {_redacted(url)}: {reason}") from None
    out = output or str(Path(base.run.output_dir) / f"{name}-best.yaml")
    return TunePlan(
        study=name,
        storage=url,
        space=space,
        params_file=params_file,
        sets=sets,
        experiment=base.run.experiment,
        trials=trials,
        parallel=parallel,
        timeout_min=timeout_min,
        then_run=then_run,
        output=out,
    )


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url


def trial_params(plan: TunePlan, values: dict[str, Any], number: int) -> PipelineParams:
    """The params of trial `number`: the base params, the sampled values, no packaging or compression."""
    return load_params(
        plan.params_file,
        [
            *plan.sets,
            *overrides_for(values),
            "package.enabled=false",
            "optimize.enabled=false",
            f"run.experiment={plan.experiment}",
            f"run.run_name={plan.study}-trial-{number}",
        ],
    )


def _trial_run(plan: TunePlan, number: int):
    """The MLflow run of trial `number` (newest), or None."""
    experiment = tracking.client().get_experiment_by_name(plan.experiment)
    if experiment is None:
        return None
    found = tracking.client().search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{STUDY_TAG}` = '{plan.study}' and tags.`{TRIAL_TAG}` = '{number}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def _fail_run(run, flow_state: str | None = None) -> None:
    """End a trial's MLflow run FAILED if it is still RUNNING (its process was killed), with its stage runs;
    `flow_state` (e.g. Crashed) is kept as a tag."""
    if run is not None:
        tags = {"visionflow.tune.state": "FAIL"} | ({"visionflow.tune.flow_state": flow_state} if flow_state else {})
        tracking.set_tags(run.info.run_id, tags)
        tracking.fail_stale_runs(run.info.run_id)


def settle_trial(plan: TunePlan, study, trial, flow_state: str) -> str:
    """Tell the study how trial `trial` ended (from its MLflow run and the pruning mark the training process
    left), tag its MLflow run accordingly; returns COMPLETE, PRUNED or FAIL."""
    import optuna

    from components.tuning.study import PRUNED_EPOCH_ATTR

    run = _trial_run(plan, trial.number)
    attrs = study._storage.get_trial_user_attrs(trial._trial_id)
    train_run = tracking.child_run(run.info.run_id, "train") if run is not None else None
    value = tracking.get_run(train_run).data.metrics.get(OBJECTIVE_METRIC) if train_run else None
    if flow_state != "Completed" or value is None:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _fail_run(run, flow_state)
        return "FAIL"
    if PRUNED_EPOCH_ATTR in attrs:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        tags = {"visionflow.tune.state": "PRUNED", "visionflow.tune.pruned": "true"}
        tracking.set_tags(run.info.run_id, {**tags, "visionflow.tune.pruned_epoch": attrs[PRUNED_EPOCH_ATTR]})
        return "PRUNED"
    study.tell(trial, value)
    tracking.set_tags(run.info.run_id, {"visionflow.tune.state": "COMPLETE"})
    return "COMPLETE"


def _trial_tags(plan: TunePlan, parent_run_id: str, number: int) -> dict[str, str]:
    return {tracking.PARENT_TAG: parent_run_id, STUDY_TAG: plan.study, TRIAL_TAG: str(number)}


def _context(plan: TunePlan, trial):
    from components.tuning.study import TrialContext

    # a password never travels in a flow run's job variables: such workers read $VISIONFLOW_TUNE_STORAGE
    storage = "" if _has_password(plan.storage) and plan.parallel > 1 else plan.storage
    return TrialContext(
        storage=storage, study=plan.study, trial_id=trial._trial_id, number=trial.number, space=plan.space
    )


def run_trials_here(plan: TunePlan, trials: list, parent_run_id: str) -> list[str]:
    """Run the trials one after another as pipeline subflows of this flow run; returns their state names."""
    from components.tuning.study import TRIAL_ENV
    from flows.pipeline import pipeline

    states = []
    for trial in trials:
        params = trial_params(plan, trial.params, trial.number)
        os.environ[TRIAL_ENV] = _context(plan, trial).model_dump_json()
        try:
            state = pipeline(params, tags=_trial_tags(plan, parent_run_id, trial.number), return_state=True)
        finally:
            os.environ.pop(TRIAL_ENV, None)
        states.append(state.name)
    return states


def run_trials_on_pool(plan: TunePlan, trials: list, parent_run_id: str, timeout: float) -> list[str]:
    """Start each trial as a flow run of the pipeline deployment (on a work pool, the trial's identity and the
    heartbeat setting in the run's environment), wait for all; returns their state names (Crashed for a run
    whose process was killed: the zombie rule ends it)."""
    from prefect.deployments import run_deployment

    from flows.prefect_api import HEARTBEAT_TAG, PIPELINE_DEPLOYMENT, heartbeat_env, wait_for_flow_runs

    ids = []
    for trial in trials:
        params = trial_params(plan, trial.params, trial.number)
        run = run_deployment(
            PIPELINE_DEPLOYMENT,
            parameters={
                "params": params.model_dump(mode="json"),
                "tags": _trial_tags(plan, parent_run_id, trial.number),
            },
            timeout=0,
            as_subflow=False,
            job_variables={"env": {**_context(plan, trial).env(), **heartbeat_env()}},
            tags=["visionflow", HEARTBEAT_TAG, f"tune-{plan.study}"],
        )
        ids.append(run.id)
    try:
        states = wait_for_flow_runs(ids, timeout)
    except VisionflowError:
        return ["TimedOut"] * len(ids)
    return [states[str(i)] for i in ids]


def _search(plan: TunePlan, study, run_id: str) -> dict[str, int]:
    """Ask, run and tell trials until `trials` ended or the time is up; returns this call's states."""
    import optuna

    from components.tuning.study import distributions, finished_count

    logger = get_run_logger()
    space = distributions(plan.space)
    deadline = time.monotonic() + plan.timeout_min * 60 if plan.timeout_min else None
    counts: dict[str, int] = {}
    while finished_count(study) < plan.trials and (deadline is None or time.monotonic() < deadline):
        batch = [study.ask(space) for _ in range(min(plan.parallel, plan.trials - finished_count(study)))]
        told: set[int] = set()
        try:
            if plan.parallel > 1:
                left = (deadline - time.monotonic()) if deadline else 24 * 3600
                states = run_trials_on_pool(plan, batch, run_id, max(left, 60))
            else:
                states = run_trials_here(plan, batch, run_id)
            for trial, state in zip(batch, states, strict=True):
                outcome = settle_trial(plan, study, trial, state)
                told.add(trial.number)
                counts[outcome] = counts.get(outcome, 0) + 1
                logger.info("trial %d: %s %s", trial.number, outcome, trial.params)
        finally:  # interrupted: the trials not told yet end FAIL in the study and in MLflow, never RUNNING
            for trial in batch:
                if trial.number not in told:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    _fail_run(_trial_run(plan, trial.number))
    return counts


def resume_stale(plan: TunePlan, study) -> list[int]:
    """Trials a killed search left RUNNING: FAIL in the study and in MLflow. Returns their numbers."""
    from components.tuning.study import fail_stale_trials

    stale = fail_stale_trials(study)
    for number in stale:
        _fail_run(_trial_run(plan, number))
    return stale


@flow(name="visionflow-tune-study", log_prints=True)
def tune(plan: TunePlan) -> TuneResult:
    """Search the plan's space: trials (pipeline runs, pruned early when hopeless) until `trials` ended, then
    the best params file, the optimization history and parameter importance plots, a Prefect markdown
    artifact and, with `then_run`, a full pipeline run with the best params. Returns a TuneResult."""
    from components.tuning.study import RUN_ATTR, open_study

    study = open_study(plan.storage, plan.study, plan.space)
    stale = resume_stale(plan, study)
    if stale:
        get_run_logger().warning("trials %s of a killed search marked FAIL", stale)
    if plan.parallel > 1:  # the deployment's rule, or one made now: a trial whose worker dies ends Crashed
        from flows.deploy import crash_silent_runs

        window = crash_silent_runs(replace=False)
        get_run_logger().info("a trial's flow run silent for %d s (worker killed) is marked Crashed", window)
    earlier = study.user_attrs.get(RUN_ATTR)
    with tracking.run_scope(
        plan.experiment, f"tune-{plan.study}", {STUDY_TAG: plan.study, "visionflow.tune": "study"}, reopen=earlier
    ) as run:
        study.set_user_attr(RUN_ATTR, run.run_id)
        if earlier is None:  # MLflow params never change: a resumed study keeps its first run's
            tracking.log_params(run.run_id, {"tune.pruner": plan.space.pruner, "tune.space": plan.space.fingerprint()})
        tracking.set_tags(run.run_id, {"visionflow.tune.trials": plan.trials})
        _search(plan, study, run.run_id)
        result = summarize(plan, study, run.run_id)
    if plan.then_run and result.best_params_file:
        from flows.pipeline import pipeline

        final = pipeline(load_params(result.best_params_file), tags={STUDY_TAG: plan.study, "visionflow.tune": "best"})
        result.then_run_id = final.run_id
        result.then_test_accuracy = final.metrics.get("test/accuracy")
    return result


def summarize(plan: TunePlan, study, run_id: str) -> TuneResult:
    """Best params file, plots and metrics in the study run, the Prefect markdown artifact; the TuneResult."""
    from components.tuning.report import study_report
    from components.tuning.study import best_values

    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    result = TuneResult(study=plan.study, run_id=run_id, trials=counts)
    out_dir = Path(plan.output).parent / f"{plan.study}-report"
    best = best_values(study)
    if best is not None:
        result.best_params, result.best_value, result.best_trial = best
        params = load_params(plan.params_file, [*plan.sets, *overrides_for(result.best_params)])
        Path(plan.output).parent.mkdir(parents=True, exist_ok=True)
        Path(plan.output).write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        result.best_params_file = str(Path(plan.output).resolve())
        tracking.log_metrics(run_id, {"best_val_acc": result.best_value, "best_trial": result.best_trial})
        tracking.set_tags(run_id, {f"visionflow.tune.best.{k}": v for k, v in result.best_params.items()})
    files, markdown = study_report(study, out_dir)
    tracking.log_metrics(run_id, {f"trials_{k.lower()}": v for k, v in counts.items()})
    tracking.log_artifacts(run_id, [*files, result.best_params_file], artifact_path="tune")
    create_markdown_artifact(
        key=f"tune-{plan.study}".lower().replace("_", "-")[:60],
        markdown=markdown + (f"\n\nBest params file: `{result.best_params_file}`" if result.best_params_file else ""),
        description=f"visionflow tune: study {plan.study}",
    )
    return result


def check_pool_deployment() -> None:
    """Raise VisionflowError unless the pipeline deployment is on a work pool (parallel trials need one)."""
    from flows.prefect_api import PIPELINE_DEPLOYMENT, read_deployment, server_configured

    deployment = read_deployment(PIPELINE_DEPLOYMENT) if server_configured() else None
    if deployment is None or not deployment.work_pool_name:
        raise VisionflowError(
            f"--parallel needs the {PIPELINE_DEPLOYMENT} deployment on a work pool: `visionflow up`, "
            "`prefect work-pool create NAME --type process`, `visionflow deploy --pool NAME`, start workers"
        )


@flow(name="visionflow-tune", log_prints=True)
def tune_form(
    params: PipelineParams,
    space: SearchSpace,
    trials: int = 20,
    parallel: int = 1,
    timeout_min: float | None = None,
    study: str | None = None,
    then_run: bool = False,
) -> TuneResult:
    """The `tune` deployment: search `space` (PipelineParams fields and their ranges) on top of `params`.

    `trials` counts ended trials of the study (the same study name resumes a search); `parallel` > 1 runs
    trials as flow runs of the pipeline deployment on its work pool. Returns the TuneResult.
    """
    folder = Path(params.run.output_dir) / "tune-inputs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    params_file, space_file = folder / f"{stamp}-params.yaml", folder / f"{stamp}-space.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    space_file.write_text(yaml.safe_dump(space.model_dump(mode="json", exclude_none=True), sort_keys=False))
    if parallel > 1:
        check_pool_deployment()
    plan = plan_tune(str(params_file), [], str(space_file), trials, parallel, timeout_min, study, then_run=then_run)
    return tune(plan)
