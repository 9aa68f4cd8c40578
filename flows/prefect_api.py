"""Small synchronous questions to the Prefect API in use (server from PREFECT_API_URL, or ephemeral)."""

from __future__ import annotations

import os

from prefect import get_client
from prefect.exceptions import ObjectNotFound

from components.errors import VisionflowError

# The pipeline's deployment as flows/deploy.py serves it; here so that a command can look it up without importing
# every flow (flows.deploy imports them all: 15 s on 2 busy cores, paid before an error like "--parallel needs …").
PIPELINE_DEPLOYMENT = "visionflow-pipeline/pipeline"


def server_configured() -> bool:
    """True when a Prefect server URL is configured (not the ephemeral per-process API)."""
    from prefect.settings import PREFECT_API_URL

    return bool(os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value())


def read_deployment(name: str):
    """The deployment `flow-name/deployment-name`, or None when it does not exist."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def deployment_exists(name: str = PIPELINE_DEPLOYMENT) -> bool:
    """True when the Prefect API in use knows the deployment `flow-name/deployment-name`."""
    return read_deployment(name) is not None


def work_pool_exists(pool: str) -> bool:
    """True when the work pool `pool` exists on the Prefect API in use."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return True
        except ObjectNotFound:
            return False


def wait_for_flow_runs(flow_run_ids: list, timeout: float) -> dict[str, str]:
    """Wait (Prefect's wait_for_flow_run, all at once) until every flow run is final; returns
    {flow run id: state name}. Raises VisionflowError when one is not final after `timeout` seconds."""
    import asyncio

    from prefect.exceptions import FlowRunWaitTimeout
    from prefect.flow_runs import wait_for_flow_run

    async def wait_all():
        return await asyncio.gather(*(wait_for_flow_run(run_id, timeout=int(timeout)) for run_id in flow_run_ids))

    try:
        runs = asyncio.run(wait_all())
    except FlowRunWaitTimeout as err:
        raise VisionflowError(f"flow runs not finished after {timeout:.0f} s: {err}") from None
    return {str(run.id): run.state.name if run.state else "Unknown" for run in runs}


# --- flow runs whose process died -----------------------------------------------------------------

HEARTBEAT_S = 30  # Prefect's shortest flow-run heartbeat period (PREFECT_FLOWS_HEARTBEAT_FREQUENCY)
ZOMBIE_ENV = "VISIONFLOW_ZOMBIE_AFTER_S"  # seconds without a heartbeat after which a flow run is set Crashed
ZOMBIE_DEFAULT_S = 120
ZOMBIE_AUTOMATION = "visionflow-crash-silent-flow-runs"
HEARTBEAT_TAG = "visionflow-heartbeat"  # on exactly the flow runs started with heartbeats: the rule watches these


def heartbeat_env() -> dict[str, str]:
    """The environment that makes a flow-run process send Prefect's `prefect.flow-run.heartbeat` every HEARTBEAT_S
    seconds (job variables of a work pool's runs: it wins over what the worker itself has set)."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}


def zombie_after_s() -> int:
    """$VISIONFLOW_ZOMBIE_AFTER_S (default 120): seconds a Running flow run may go without a heartbeat before it is
    marked Crashed. Raises VisionflowError unless it is a whole number of at least two heartbeats."""
    raw = os.environ.get(ZOMBIE_ENV, "").strip()
    try:
        value = int(raw) if raw else ZOMBIE_DEFAULT_S
    except ValueError:
        raise VisionflowError(f"${ZOMBIE_ENV} must be whole seconds, not {raw!r}") from None
    if value < 2 * HEARTBEAT_S:
        raise VisionflowError(f"${ZOMBIE_ENV} must be at least {2 * HEARTBEAT_S} s (two heartbeats), not {value}")
    return value


def _zombie_automation(tag: str, after_s: int):
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=(
            f"A Running flow run tagged {tag!r} that sent no heartbeat for {after_s} s (its worker or process was "
            f"killed) is set Crashed. Heartbeats every {HEARTBEAT_S} s; the window is ${ZOMBIE_ENV} at deploy time."
        ),
        trigger=EventTrigger(
            # the window opens at Running too (a server-side event): a process killed before its first heartbeat
            # left the server is caught as well
            after={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"},
            expect={"prefect.flow-run.*"},  # the next heartbeat, or any state change (custom state names too)
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {after_s} s: the worker or the flow-run process was killed",
            )
        ],
    )


def crash_silent_flow_runs(tag: str, after_s: int, replace: bool = True) -> int:
    """Make sure the Prefect automation ZOMBIE_AUTOMATION exists (Prefect's way to end zombie flow runs): a flow
    run tagged `tag` whose heartbeats stop for `after_s` seconds is set Crashed. With `replace` an existing one
    gets `after_s`, else it is kept as it is. Returns the window in force, in seconds."""
    automation = _zombie_automation(tag, after_s)
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if found and not replace:
            return int(found[0].trigger.within.total_seconds())
        if found:
            client.update_automation(found[0].id, automation)
        else:
            client.create_automation(automation)
    return after_s


def tag_waiting_runs(tag: str, new_tag: str) -> int:
    """Add `new_tag` to every flow run tagged `tag` that has not started (Scheduled, Late, Pending, waiting for a
    slot): runs made before the deployments carried `new_tag` start with it, so their heartbeats carry it too.
    Returns how many were tagged."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    waiting = FlowRunFilter(
        tags=FlowRunFilterTags(all_=[tag]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])),
    )
    tagged = 0
    with get_client(sync_client=True) as client:
        offset = 0
        while runs := client.read_flow_runs(flow_run_filter=waiting, limit=200, offset=offset):
            offset += len(runs)
            for run in runs:
                if new_tag not in run.tags:
                    client.update_flow_run(run.id, tags=[*run.tags, new_tag])
                    tagged += 1
    return tagged
