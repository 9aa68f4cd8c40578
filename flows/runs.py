"""The MLflow pipeline runs a command works on: look one up, read a finished one's result, tell whether one may
resume, and the tags naming the process that runs one. Light on purpose (MLflow, no torch): the CLI asks these
before it starts Prefect's server or a training process, so a wrong run id is one line at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

from components import tracking
from components.errors import VisionflowError


def pipeline_run(run_id: str):
    """The MLflow run `run_id` (an mlflow Run); raises VisionflowError when the store has no such run."""
    try:
        return tracking.get_run(run_id)
    except Exception:
        raise VisionflowError(f"no MLflow run {run_id} in {tracking.tracking_uri()}") from None


def finished_pipeline_run(run_id: str, purpose: str) -> tuple[Path, dict]:
    """The run directory and result.json contents of a finished pipeline run, for a stage run on it later
    (`purpose` names that stage in the error). Raises VisionflowError for an unknown or unfinished run."""
    run = pipeline_run(run_id)
    run_dir = Path(run.data.tags.get(tracking.RUN_DIR_TAG, ""))
    result_file = run_dir / "result.json"
    if not result_file.is_file():
        raise VisionflowError(f"run {run_id} has no finished pipeline result in {run_dir} to {purpose}")
    return run_dir, json.loads(result_file.read_text())


PID_TAG = "visionflow.pid"
PID_STARTED_TAG = "visionflow.pid_started"
HOST_TAG = "visionflow.host"


def process_tags() -> dict[str, str]:
    """Tags naming the process that runs a pipeline (pid, its start time, host): `resume` checks them to
    tell a crashed RUNNING run from one still in progress."""
    import socket

    import psutil

    return {
        PID_TAG: str(os.getpid()),
        PID_STARTED_TAG: f"{psutil.Process().create_time():.3f}",
        HOST_TAG: socket.gethostname(),
    }


def _live_process(tags: dict[str, str]) -> str | None:
    """Why a RUNNING run's recorded process may still be at work ("pid N", "pid N on host H"), or None
    when it is gone: no such pid here, or a pid reused by a process started at another time."""
    import socket

    import psutil

    if PID_TAG not in tags:
        return None  # recorded by an older visionflow, which left runs RUNNING only when it crashed
    pid, host = int(tags[PID_TAG]), tags.get(HOST_TAG, "")
    if host and host != socket.gethostname():
        return f"pid {pid} on host {host} (it cannot be checked from here: resume it there)"
    try:
        started = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return f"pid {pid}" if abs(started - float(tags.get(PID_STARTED_TAG, "nan"))) < 1.0 else None


def resumable_pipeline_run(run_id: str) -> tuple[object, Path]:
    """The run and run directory of a pipeline run `visionflow resume` may continue: FAILED or KILLED, or
    RUNNING with its process gone (crashed, killed -9). Raises VisionflowError, one line saying what to
    do instead, for an unknown run, a stage run, a FINISHED run or one whose process is still running."""
    run = pipeline_run(run_id)
    tags, status = run.data.tags, run.info.status
    if tracking.PARENT_TAG in tags:
        parent = tags[tracking.PARENT_TAG]
        raise VisionflowError(f"run {run_id} is a stage of pipeline run {parent}: resume that run instead")
    run_dir = Path(tags.get(tracking.RUN_DIR_TAG) or "")
    if not tags.get(tracking.RUN_DIR_TAG) or not (run_dir / "params.yaml").is_file():
        raise VisionflowError(f"run {run_id} has no run directory with params.yaml to resume from")
    if status == tracking.RunStatus.FINISHED:
        raise VisionflowError(
            f"run {run_id} is FINISHED: there is nothing to resume; for a new run with its params: "
            f"visionflow run --params {run_dir / 'params.yaml'}"
        )
    if status == tracking.RunStatus.RUNNING and (alive := _live_process(tags)):
        raise VisionflowError(f"run {run_id} is still running in {alive}")
    if status not in (tracking.RunStatus.FAILED, tracking.RunStatus.KILLED, tracking.RunStatus.RUNNING):
        raise VisionflowError(f"run {run_id} is {status}: only FAILED, KILLED or crashed RUNNING runs resume")
    return run, run_dir
