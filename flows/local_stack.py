"""The stack behind `visionflow up` / `visionflow down`: a Prefect server and an MLflow server on
loopback, with logs, MLflow's artifact root and a state file in one directory.

Alone (no database URL) both servers keep SQLite files in that directory. The team stack
(`up --database-url postgresql://USER:PASS@HOST:PORT`) keeps them in PostgreSQL instead: the
databases `prefect`, `mlflow` and `optuna` on that server (the last one holds `visionflow tune`
studies). Either way MLflow serves the artifacts itself (`--artifacts-destination`): clients upload
and download over HTTP and need no shared disk. `--auth` turns on basic auth on both servers.

`down` stops exactly the processes `up` started: each is recorded with its pid and start time, and
is its own process group (so a server's workers go with it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
from pydantic import BaseModel

from components.errors import VisionflowError

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
DATABASES = ("prefect", "mlflow", "optuna")  # one database per server on the team stack, and one for studies
AUTH_USER = "admin"  # MLflow's basic-auth admin; Prefect's auth string is AUTH_USER:password
PASSWORD_ENV = "VISIONFLOW_STACK_PASSWORD"  # the basic-auth password, for the servers and for every client
TUNE_STORAGE_ENV = "VISIONFLOW_TUNE_STORAGE"  # where `visionflow tune` keeps its Optuna studies


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
    database: str = "sqlite"  # "sqlite", or the PostgreSQL server's URL without its password
    auth: bool = False

    def tune_storage(self) -> str:
        """The Optuna storage of this stack's studies (with the password from the environment, if any)."""
        if self.database == "sqlite":
            return f"sqlite:///{Path(self.state_dir) / 'optuna.db'}"
        return database_url_for(os.environ.get("VISIONFLOW_DATABASE_URL") or self.database, "optuna")

    def env(self) -> dict[str, str]:
        """The environment that points Prefect, MLflow and Optuna clients at this stack.

        With basic auth, the credentials come from $VISIONFLOW_STACK_PASSWORD (never from the state file).
        """
        env = {"PREFECT_API_URL": f"{self.prefect_url}/api", "MLFLOW_TRACKING_URI": self.mlflow_url}
        env[TUNE_STORAGE_ENV] = self.tune_storage()
        password = os.environ.get(PASSWORD_ENV)
        if self.auth and password:
            env.update(
                PREFECT_API_AUTH_STRING=f"{AUTH_USER}:{password}",
                MLFLOW_TRACKING_USERNAME=AUTH_USER,
                MLFLOW_TRACKING_PASSWORD=password,
            )
        return env

    def exports(self) -> list[str]:
        """`export` lines for other shells; secrets are written as references to the variables holding them."""
        lines = [f"export PREFECT_API_URL={self.prefect_url}/api", f"export MLFLOW_TRACKING_URI={self.mlflow_url}"]
        if self.database == "sqlite":
            lines.append(f"export {TUNE_STORAGE_ENV}={self.tune_storage()}")
        else:
            lines.append(f"export {TUNE_STORAGE_ENV}=<the database URL with the database name optuna>")
        if self.auth:
            lines += [
                f'export PREFECT_API_AUTH_STRING="{AUTH_USER}:${PASSWORD_ENV}"',
                f"export MLFLOW_TRACKING_USERNAME={AUTH_USER}",
                f'export MLFLOW_TRACKING_PASSWORD="${PASSWORD_ENV}"',
            ]
        return lines


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


def database_url_for(server_url: str, database: str, driver: str = "") -> str:
    """The URL of `database` on the PostgreSQL server of `server_url` (its own database name replaced).

    `driver` picks SQLAlchemy's driver, e.g. "asyncpg" gives postgresql+asyncpg://... for Prefect.
    """
    parts = urlsplit(server_url)
    scheme = "postgresql" + (f"+{driver}" if driver else "")
    return urlunsplit((scheme, parts.netloc, f"/{database}", parts.query, ""))


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc and ":" in netloc.split("@", 1)[0]:
        user, host = netloc.split("@", 1)
        netloc = f"{user.split(':', 1)[0]}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def check_database_url(url: str, timeout: float = 5) -> None:
    """Raise VisionflowError (one line) unless `url` is a PostgreSQL server URL on which every database in
    DATABASES accepts a connection. Runs before anything starts."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise VisionflowError(f"--database-url must be postgresql://USER:PASSWORD@HOST:PORT, not {parts.scheme!r}")
    if parts.path not in ("", "/"):
        raise VisionflowError(
            f"--database-url names the server only (no database {parts.path.lstrip('/')!r}): "
            f"visionflow uses the databases {', '.join(DATABASES)} on it"
        )
    import psycopg  # the driver MLflow and Optuna use for postgresql:// (SQLAlchemy 2.1's default)

    for database in DATABASES:
        try:
            psycopg.connect(database_url_for(url, database), connect_timeout=int(timeout)).close()
        except psycopg.Error as err:
            reason = " ".join(str(err).split())[:300]
            raise VisionflowError(
                f"cannot use database {database!r} on {_without_password(url)}: {reason} "
                f"(create the databases once: CREATE DATABASE {'; CREATE DATABASE '.join(DATABASES)};)"
            ) from None


def _server_env(state_dir: Path, database_url: str | None, password: str | None) -> dict[str, str]:
    drop = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        {
            "PREFECT_HOME": str(state_dir / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": (
                database_url_for(database_url, "prefect", "asyncpg")
                if database_url
                else f"sqlite+aiosqlite:///{state_dir / 'prefect.db'}"
            ),
            # the store URI goes by environment, so the password never shows in the process list
            "MLFLOW_BACKEND_STORE_URI": (
                database_url_for(database_url, "mlflow") if database_url else f"sqlite:///{state_dir / 'mlflow.db'}"
            ),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
    )
    if password:
        env["PREFECT_SERVER_API_AUTH_STRING"] = f"{AUTH_USER}:{password}"
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_auth_config(state_dir))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = _secret_key(state_dir)
    return env


def _secret_key(state_dir: Path) -> str:
    """MLflow's CSRF secret: made once per state folder, kept readable by its owner only."""
    path = state_dir / "mlflow-secret-key"
    if not path.is_file():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def _auth_config(state_dir: Path) -> Path:
    """MLflow's basic-auth settings: users in a SQLite file of the state dir, read-only by default."""
    path = state_dir / "mlflow-basic-auth.ini"
    path.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{state_dir / 'mlflow-auth.db'}\n"
        f"admin_username = {AUTH_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def _launch(
    name: str, command: list[str], url: str, health_url: str, state_dir: Path, env: dict[str, str]
) -> StackProcess:
    log = state_dir / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
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


def _server_processes(
    state_dir: Path, prefect_port: int, mlflow_port: int, database_url: str | None, password: str | None
) -> list[StackProcess]:
    env = _server_env(state_dir, database_url, password)
    prefect_url = f"http://{HOST}:{prefect_port}"
    mlflow_url = f"http://{HOST}:{mlflow_port}"
    mlflow_command = [_executable("mlflow"), "server", "--host", HOST, "--port", str(mlflow_port)]
    mlflow_command += ["--artifacts-destination", str(state_dir / "mlartifacts"), "--workers", "1"]
    if password:
        mlflow_command += ["--app-name", "basic-auth"]
    return [
        _launch(
            "prefect",
            [_executable("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
            prefect_url,
            f"{prefect_url}/api/health",
            state_dir,
            {**env, "PREFECT_UI_API_URL": f"{prefect_url}/api"},  # else the UI calls the default port 4200
        ),
        _launch("mlflow", mlflow_command, mlflow_url, f"{mlflow_url}/health", state_dir, env),
    ]


def start_stack(
    state_dir: Path,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    timeout: float = 120,
    database_url: str | None = None,
    auth: bool = False,
) -> tuple[StackState, bool]:
    """Start the Prefect and MLflow servers and wait until both answer.

    `database_url` (postgresql://USER:PASS@HOST:PORT) puts both servers on PostgreSQL (the team stack),
    else SQLite files in `state_dir`. `auth` turns on basic auth on both, with user AUTH_USER and the
    password in $VISIONFLOW_STACK_PASSWORD. Returns (state, started): started is False when the stack in
    `state_dir` was already running. Raises VisionflowError for a port in use, an unusable database URL,
    a missing password or a server that does not come up in `timeout` seconds; nothing is left running then.
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
    password = os.environ.get(PASSWORD_ENV) if auth else None
    if auth and len(password or "") < 12:  # MLflow refuses shorter admin passwords
        raise VisionflowError(f"--auth needs a password of 12+ characters in ${PASSWORD_ENV} (user {AUTH_USER!r})")
    if database_url:
        check_database_url(database_url)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "mlartifacts").mkdir(exist_ok=True)
    processes = _server_processes(state_dir, prefect_port, mlflow_port, database_url, password)
    state = StackState(
        state_dir=str(state_dir),
        prefect_url=processes[0].url,
        mlflow_url=processes[1].url,
        processes=processes,
        database=_without_password(database_url) if database_url else "sqlite",
        auth=auth,
    )
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
