"""Sweeps: one pipeline per combination of a parameter grid, all in one MLflow experiment and
marked with one sweep tag so `visionflow compare --sweep ID` lines them up.

Here (no server) the combinations run one after another as subflows of one `visionflow-sweep` flow
run. With a Prefect server whose `visionflow-pipeline/pipeline` deployment is served or on a work
pool, each combination is a separate flow run of that deployment (so a pool's workers run them in
parallel) and the sweep waits for them.
"""

from __future__ import annotations

import uuid

from prefect import flow, get_run_logger
from pydantic import BaseModel

from components.comparison import grid_combinations
from components.config import PipelineParams, load_params
from flows.pipeline import pipeline

SWEEP_TAG = "visionflow.sweep"


class SweepPlan(BaseModel):
    """The validated combinations of a sweep."""

    sweep_id: str
    experiment: str
    overrides: list[list[str]]
    params: list[PipelineParams]


class SweepOutcome(BaseModel):
    """How each combination ended."""

    sweep_id: str
    experiment: str
    states: dict[str, str]


def plan_sweep(params_file: str | None, sets: list[str], grid: list[str], experiment: str | None) -> SweepPlan:
    """Expand the grid and validate every combination before anything runs.

    Raises ParamsError (naming the combination's field) or ValueError for a malformed grid.
    """
    combinations = grid_combinations(grid)
    if not combinations:
        raise ValueError("a sweep needs at least one --grid KEY=V1,V2")
    sweep_id = uuid.uuid4().hex[:8]
    base = load_params(params_file, sets)
    experiment = experiment or base.run.experiment
    params = [
        load_params(params_file, [*sets, *combo, f"run.experiment={experiment}", f"run.run_name=sweep-{sweep_id}-{i}"])
        for i, combo in enumerate(combinations)
    ]
    return SweepPlan(sweep_id=sweep_id, experiment=experiment, overrides=combinations, params=params)


@flow(name="visionflow-sweep", log_prints=True)
def sweep(plan: SweepPlan) -> SweepOutcome:
    """Run one pipeline per combination, one after another; a failed combination does not stop the rest.

    Returns the final state name of each combination (keyed by its overrides).
    """
    logger = get_run_logger()
    states: dict[str, str] = {}
    for overrides, params in zip(plan.overrides, plan.params, strict=False):
        key = " ".join(overrides)
        logger.info("sweep %s: %s", plan.sweep_id, key)
        state = pipeline(params, tags={SWEEP_TAG: plan.sweep_id}, return_state=True)
        states[key] = state.name
    return SweepOutcome(sweep_id=plan.sweep_id, experiment=plan.experiment, states=states)


def submit_sweep(plan: SweepPlan, deployment: str, timeout: float) -> SweepOutcome:
    """Start each combination as a flow run of the pipeline deployment, wait for all; returns their states."""
    from prefect.deployments import run_deployment

    from flows.prefect_api import wait_for_flow_runs

    runs = {}
    for overrides, params in zip(plan.overrides, plan.params, strict=False):
        run = run_deployment(
            deployment,
            parameters={"params": params.model_dump(mode="json"), "tags": {SWEEP_TAG: plan.sweep_id}},
            timeout=0,
            as_subflow=False,
            tags=["visionflow", f"sweep-{plan.sweep_id}"],
        )
        runs[" ".join(overrides)] = run.id
    states = wait_for_flow_runs(list(runs.values()), timeout)
    return SweepOutcome(
        sweep_id=plan.sweep_id,
        experiment=plan.experiment,
        states={key: states[str(run_id)] for key, run_id in runs.items()},
    )
