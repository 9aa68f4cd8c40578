"""The local stack behind `visionflow up` / `visionflow down`: a Prefect server and an MLflow server
on loopback, with SQLite databases, an artifact folder, logs and a state file in one directory.

`down` stops exactly the processes `up` started: each is recorded with its pid and start time, and
is its own process group (so a server's workers go with it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from pydantic import BaseModel

from components.errors import VisionflowError

HOST = "127.0.0.1"
STATE_FILE = "stack.json"


class StackProcess(BaseModel):
    """One server process started by `up`."""

    name: str
    pid: int
    create_time: float
    url: str
    health_url: str
    log: str


class StackState(BaseModel):
    """What `up` started and how other shells reach it."""

    state_dir: str
    prefect_url: str
    mlflow_url: str
    processes: list[StackProcess]

    def env(self) -> dict[str, str]:
        """The environment that points Prefect and MLflow clients at this stack."""
        return {"PREFECT_API_URL": f"{self.prefect_url}/api", "MLFLOW_TRACKING_URI": self.mlflow_url}


def default_state_dir() -> Path:
    """Where the stack keeps its state: $VISIONFLOW_STACK_DIR, else .visionflow/stack under the cwd."""
    return Path(os.environ.get("VISIONFLOW_STACK_DIR", ".visionflow/stack"))


def _alive(process: StackProcess) -> bool:
    try:
        proc = psutil.Process(process.pid)
        return abs(proc.create_time() - process.create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_state(state_dir: Path) -> StackState | None:
    """The recorded stack in `state_dir`, or None when nothing was started there."""
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    return StackState.model_validate_json(path.read_text())


def running_stack(state_dir: Path | None = None) -> StackState | None:
    """The stack in `state_dir` when every one of its processes is still alive, else None."""
    state = read_state(state_dir or default_state_dir())
    if state is None or not all(_alive(p) for p in state.processes):
        return None
    return state


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something already listens on host:port (or the port cannot be bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def answers(url: str, timeout: float = 2.0) -> bool:
    """True when GET url returns HTTP 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise VisionflowError(f"`{name}` is not installed in this environment (pip install -e . installs it)")
    return found


def _server_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(
        {
            "PREFECT_HOME": str(state_dir / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{state_dir / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
    )
    return env


def _launch(
    name: str, command: list[str], url: str, health_url: str, state_dir: Path, env: dict[str, str] | None = None
) -> StackProcess:
    log = state_dir / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**_server_env(state_dir), **(env or {})},
            cwd=state_dir,
            start_new_session=True,
        )
    return StackProcess(
        name=name,
        pid=process.pid,
        create_time=psutil.Process(process.pid).create_time(),
        url=url,
        health_url=health_url,
        log=str(log),
    )


def _log_tail(process: StackProcess, lines: int = 3) -> str:
    try:
        text = Path(process.log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _wait_until_answering(processes: list[StackProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(processes)
    while waiting:
        for process in list(waiting):
            if answers(process.health_url):
                waiting.remove(process)
            elif not _alive(process):
                raise VisionflowError(
                    f"the {process.name} server exited while starting: {_log_tail(process)} (log: {process.log})"
                )
        if waiting and time.monotonic() > deadline:
            names = ", ".join(p.name for p in waiting)
            raise VisionflowError(f"the {names} server did not answer within {timeout:.0f} s (log: {waiting[0].log})")
        if waiting:
            time.sleep(0.5)


def start_stack(
    state_dir: Path, prefect_port: int = 4200, mlflow_port: int = 5000, timeout: float = 120
) -> tuple[StackState, bool]:
    """Start the Prefect and MLflow servers and wait until both answer.

    Returns (state, started): started is False when the stack in `state_dir` was already running.
    Raises VisionflowError for a port in use or a server that does not come up in `timeout` seconds;
    nothing is left running then.
    """
    state_dir = Path(state_dir).resolve()
    existing = running_stack(state_dir)
    if existing is not None:
        return existing, False
    stop_stack(state_dir)  # a half-dead earlier stack: stop what is left of it
    if prefect_port == mlflow_port:
        raise VisionflowError(f"the Prefect and MLflow ports must differ (both {prefect_port})")
    for port, flag in ((prefect_port, "--prefect-port"), (mlflow_port, "--mlflow-port")):
        if port_in_use(port):
            raise VisionflowError(f"port {port} on {HOST} is in use: stop what holds it or choose another with {flag}")
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "mlartifacts").mkdir(exist_ok=True)
    prefect_url = f"http://{HOST}:{prefect_port}"
    mlflow_url = f"http://{HOST}:{mlflow_port}"
    processes = [
        _launch(
            "prefect",
            [_executable("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
            prefect_url,
            f"{prefect_url}/api/health",
            state_dir,
            env={"PREFECT_UI_API_URL": f"{prefect_url}/api"},
        ),  # else the UI calls the default port 4200
        _launch(
            "mlflow",
            [
                _executable("mlflow"),
                "server",
                "--host",
                HOST,
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{state_dir / 'mlflow.db'}",
                "--artifacts-destination",
                str(state_dir / "mlartifacts"),
                "--workers",
                "1",
            ],
            mlflow_url,
            f"{mlflow_url}/health",
            state_dir,
        ),
    ]
    state = StackState(state_dir=str(state_dir), prefect_url=prefect_url, mlflow_url=mlflow_url, processes=processes)
    (state_dir / STATE_FILE).write_text(state.model_dump_json(indent=2))
    try:
        _wait_until_answering(processes, timeout)
    except BaseException:
        stop_stack(state_dir)
        raise
    return state, True


def _stop_process(process: StackProcess, grace: float) -> bool:
    if not _alive(process):
        return False
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(process):
        time.sleep(0.2)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left, workers included
    except ProcessLookupError:
        pass
    return True


def stop_stack(state_dir: Path, grace: float = 15) -> list[str]:
    """Stop the processes `up` recorded in `state_dir` (and their process groups); returns the names stopped."""
    state = read_state(state_dir)
    if state is None:
        return []
    stopped = [p.name for p in state.processes if _stop_process(p, grace)]
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return stopped
