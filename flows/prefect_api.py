"""Small synchronous questions to the Prefect API in use (server from PREFECT_API_URL, or ephemeral)."""

from __future__ import annotations

import os
import time

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


def wait_for_flow_runs(flow_run_ids: list, timeout: float, poll: float = 3.0) -> dict[str, str]:
    """Wait until every flow run is final; returns {flow run id: state name}. Raises VisionflowError on timeout."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        while True:
            pending = 0
            for run_id in flow_run_ids:
                run = client.read_flow_run(run_id)
                states[str(run_id)] = run.state.name if run.state else "Unknown"
                pending += not (run.state and run.state.is_final())
            if not pending:
                return states
            if time.monotonic() > deadline:
                raise VisionflowError(f"{pending} flow run(s) not finished after {timeout:.0f} s: {states}")
            time.sleep(poll)
