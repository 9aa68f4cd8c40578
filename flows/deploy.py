"""Deployments of the visionflow flows, served by `visionflow deploy` (Prefect's `serve`) or sent to a
work pool (`visionflow deploy --pool NAME`, Prefect's `deploy`).

Every deployment's parameters are the flow's own typed parameters (PipelineParams and friends), so
the Prefect UI shows a form with descriptions and defaults. The retrain deployment runs on the cron
schedule of `retrain.cron` / `retrain.timezone`, never overlaps itself (a run that would collide with
a running one is cancelled) and skips slots it starts too late for (see flows/retrain.py).

A killed worker or flow-run process cannot report its flow run's end: the runs of these deployments send
Prefect's flow-run heartbeat every 30 s and carry the tag `visionflow-heartbeat`, and a Prefect automation (made
here, `visionflow-crash-silent-flow-runs`) sets such a run Crashed once it has been Running for
$VISIONFLOW_ZOMBIE_AFTER_S seconds (120 by default) without a heartbeat, so nothing waits on it forever
(flows/prefect_api.py). Runs without the tag (started some other way, without heartbeats) are left alone.
"""

from __future__ import annotations

import os

from prefect import flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from components.config import PipelineParams
from components.errors import VisionflowError
from flows.evaluate import evaluate_flow
from flows.monitor import monitor_deployment, retrain_trigger
from flows.optimize import optimize_from_run
from flows.package import package_flow
from flows.pipeline import pipeline
from flows.prefect_api import PIPELINE_DEPLOYMENT
from flows.retrain import retrain
from flows.tune import tune_form

TAGS = ["visionflow"]


@flow(name="visionflow-optimize-run", log_prints=True)
def optimize_run(source_run_id: str, overrides: list[str] = []) -> dict:  # noqa: B006 - Prefect needs a JSON default
    """Compress the model of a finished pipeline run (MLflow run id); `overrides` like optimize.prune.ratio=0.3.

    Returns the comparison's summary (best variant, table path, MLflow run id).
    """
    result = optimize_from_run(source_run_id, overrides)
    return {"best": result.best, "comparison": result.comparison_md, "run_id": result.run_id}


def build_deployments(params: PipelineParams) -> list[RunnerDeployment]:
    """The deployments `visionflow deploy` serves: pipeline, retrain (cron), evaluate, optimize, package, monitor,
    tune.

    `params` become the default parameters of the pipeline and retrain deployments and give the schedules.
    """
    defaults = {"params": params.model_dump(mode="json")}
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": TAGS}
    deployments = [
        pipeline.to_deployment(
            name=PIPELINE_DEPLOYMENT.split("/", 1)[1],  # the name the commands look it up by
            parameters=defaults,
            description="Ingest, validate, train, evaluate, [optimize], package.",
            **common,
        ),
        retrain.to_deployment(
            name="retrain",
            parameters=defaults,
            schedules=[Cron(params.retrain.cron, timezone=params.retrain.timezone)],
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            # Prefect creates (and owns) an automation: a drift event of this model starts a retrain run.
            triggers=[retrain_trigger(params.package.model_name)],
            description=(
                "Retrain when the data changed; promote the challenger only when it beats the champion by the margin."
            ),
            **common,
        ),
        evaluate_flow.to_deployment(name="evaluate", description="Evaluate a checkpoint on any data set.", **common),
        optimize_run.to_deployment(
            name="optimize", description="Compress a finished run's model: distill, prune, quantize.", **common
        ),
    ]
    deployments.append(
        package_flow.to_deployment(name="package", description="Re-package a finished run's model.", **common)
    )
    deployments.append(monitor_deployment(params))
    deployments.append(
        tune_form.to_deployment(
            name="tune",
            parameters=defaults,
            description="Hyperparameter search (Optuna TPE, pruning per epoch) over a space of PipelineParams fields.",
            **common,
        )
    )
    return deployments


def crash_silent_runs(replace: bool = True) -> int:
    """The zombie rule for the flow runs started with heartbeats (tag HEARTBEAT_TAG): Crashed after
    $VISIONFLOW_ZOMBIE_AFTER_S seconds without a heartbeat. `replace` sets the window from the environment, else an
    existing rule is kept. Returns the window in force (s)."""
    from flows.prefect_api import HEARTBEAT_TAG, crash_silent_flow_runs, tag_waiting_runs, zombie_after_s

    window = crash_silent_flow_runs(HEARTBEAT_TAG, zombie_after_s(), replace=replace)
    # Runs scheduled before the deployments carried the tag: a state change's event carries the deployment's tags,
    # a heartbeat only the run's own, so such a run would open the rule's window and never close it.
    tag_waiting_runs(TAGS[0], HEARTBEAT_TAG)
    return window


def _with_heartbeats(deployments: list[RunnerDeployment], job_env: bool) -> None:
    """Tag the deployments' runs as heartbeat senders (the zombie rule watches that tag) and, with `job_env`, put
    the heartbeat setting in their job variables (a work pool's runs); served runs inherit it from the process."""
    from flows.prefect_api import HEARTBEAT_TAG, heartbeat_env

    for deployment in deployments:
        deployment.tags = [*dict.fromkeys([*deployment.tags, HEARTBEAT_TAG])]
        if job_env:
            env = {**deployment.job_variables.get("env", {}), **heartbeat_env()}
            deployment.job_variables = {**deployment.job_variables, "env": env}


def serve_deployments(deployments: list[RunnerDeployment], limit: int | None = None) -> None:
    """Register the deployments and run their flow runs in this process until interrupted (Prefect's serve); the
    flow runs send heartbeats and the zombie rule is in place."""
    from prefect import serve
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.prefect_api import HEARTBEAT_S, heartbeat_env

    crash_silent_runs()
    _with_heartbeats(deployments, job_env=False)
    os.environ.update(heartbeat_env())  # the flow runs' processes inherit it, however the runner starts them
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_S}):
        serve(*deployments, limit=limit, print_starting_message=True)


def deploy_to_pool(deployments: list[RunnerDeployment], pool: str) -> list[str]:
    """Register the deployments on work pool `pool` (its workers run them); returns the deployment ids.

    The pool must exist (`prefect work-pool create NAME --type process`); its workers must have
    visionflow installed (the flows load by module path, e.g. flows.pipeline.pipeline). The runs' job variables
    turn on the heartbeats the zombie rule (set here too) watches; workers need no setting for it.
    """
    from prefect import deploy

    from flows.prefect_api import work_pool_exists

    if not work_pool_exists(pool):
        raise VisionflowError(
            f"no Prefect work pool {pool!r}: create it with `prefect work-pool create {pool} --type process`"
        )
    crash_silent_runs()
    _with_heartbeats(deployments, job_env=True)
    ids = deploy(*deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False)
    return [str(i) for i in ids]
