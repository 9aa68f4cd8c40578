"""Small synchronous questions to the Prefect API in use (server from PREFECT_API_URL, or ephemeral)."""

from __future__ import annotations

import os

from prefect import get_client
from prefect.exceptions import ObjectNotFound

from components.errors import VisionflowError


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
