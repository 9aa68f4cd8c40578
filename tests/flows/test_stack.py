"""The daily-life stack on real servers: `up`, `deploy` (served and on a process work pool), runs triggered
through Prefect's REST API that log to the MLflow server, the retrain schedule, a search whose worker is killed
mid-trial (Prefect's zombie rule ends it), and `down`.

Everything talks to the servers over loopback HTTP on free ports with a temp state dir.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import optuna
import psutil
import pytest
import yaml

from components.config import load_params
from tests.helpers.params import tiny_overrides

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env, COLUMNS="200"),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shapes_dir):
    state = tmp_path_factory.mktemp("stack")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(VISIONFLOW_STACK_DIR=str(state), PREFECT_RUNNER_POLL_FREQUENCY="2", PREFECT_WORKER_QUERY_SECONDS="2")
    prefect_port, mlflow_port = _free_port(), _free_port()
    out = _cli(
        "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port), "--timeout", "240", env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    params = load_params(None, tiny_overrides(tmp_path_factory.mktemp("work"), shapes_dir, package__enabled=False))
    params_file = state / "tiny.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    info = {
        "env": env,
        "out": out.stdout,
        "state": state,
        "params": params,
        "params_file": str(params_file),
        "prefect": f"http://127.0.0.1:{prefect_port}",
        "mlflow": f"http://127.0.0.1:{mlflow_port}",
        "pids": [p["pid"] for p in yaml.safe_load((state / "stack.json").read_text())["processes"]],
    }
    yield info
    _cli("down", env=env)


def _api(method: str, url: str, **kwargs) -> httpx.Response:
    """One API call, retried while the server answers 5xx (SQLite "database is locked" under load)."""
    for _ in range(10):
        response = httpx.request(method, url, timeout=30, **kwargs)
        if response.status_code < 500:
            return response
        time.sleep(1)
    return response


def _wait_for_run(prefect: str, flow_run_id: str, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api("GET", f"{prefect}/api/flow_runs/{flow_run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s: {run['state']}")


def _deployment(prefect: str, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = _api("GET", f"{prefect}/api/deployments/name/{name}")
        if response.status_code == 200:
            return response.json()
        time.sleep(1)
    raise AssertionError(f"deployment {name} never registered")


def _mlflow_run_of(mlflow: str, experiment: str, flow_run_id: str) -> dict:
    experiment_id = httpx.get(
        f"{mlflow}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment}
    ).json()["experiment"]["experiment_id"]
    found = httpx.post(
        f"{mlflow}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}'"},
    ).json()
    return found["runs"][0]


def _rendered(url: str) -> str:
    """The DOM of a page after its JavaScript ran, from headless Chromium."""
    out = subprocess.run(
        [
            shutil.which("chromium"),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout


def _form_fields_without_their_description(schema: dict) -> list[str]:
    """The params fields whose description (from components/config.py) is not in the deployment's form schema."""
    from pydantic import BaseModel

    from components.config import PipelineParams

    missing, definitions = [], schema.get("definitions", {})
    assert schema["properties"]["params"]["$ref"] == "#/definitions/PipelineParams"

    def walk(model: type[BaseModel], path: str) -> None:
        properties = definitions.get(model.__name__, {}).get("properties", {})
        for name, field in model.model_fields.items():
            if properties.get(name, {}).get("description") != field.description:
                missing.append(f"{path}{name}")
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{path}{name}.")

    walk(PipelineParams, "")
    return missing


def test_up_answers_and_a_second_up_finds_it(stack):
    assert "export PREFECT_API_URL=" in stack["out"] and "export MLFLOW_TRACKING_URI=" in stack["out"]
    assert httpx.get(f"{stack['prefect']}/api/health").status_code == 200
    assert (
        httpx.get(f"{stack['mlflow']}/api/2.0/mlflow/experiments/search", params={"max_results": 5}).status_code == 200
    )
    for url in (stack["prefect"], stack["mlflow"]):
        page = httpx.get(url + "/", follow_redirects=True)
        assert page.status_code == 200 and "<html" in page.text.lower()
    again = _cli("up", env=stack["env"])
    assert again.returncode == 0 and "already running" in again.stdout


def test_a_port_in_use_is_one_clear_error_and_leaves_nothing(stack, tmp_path):
    port = int(stack["prefect"].rsplit(":", 1)[1])
    env = dict(stack["env"], VISIONFLOW_STACK_DIR=str(tmp_path / "other"))
    out = _cli("up", "--prefect-port", str(port), "--mlflow-port", str(_free_port()), env=env)
    assert out.returncode == 2 and f"port {port}" in out.stderr and "in use" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "other" / "stack.json").exists()


def test_bad_cron_is_refused_before_anything_runs(stack):
    out = _cli("deploy", "--set", "retrain.cron=every monday", env=stack["env"])
    assert out.returncode == 2 and "retrain.cron" in out.stderr and "Traceback" not in out.stderr


def test_served_deployments_run_from_the_api_and_log_to_the_mlflow_server(stack):
    prefect, env = stack["prefect"], stack["env"]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "deploy",
            "--params",
            stack["params_file"],
            "--set",
            "retrain.cron=30 4 * * 2",
            "--set",
            "retrain.timezone=Europe/Berlin",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        pipeline = _deployment(prefect, "visionflow-pipeline/pipeline")
        retrain = _deployment(prefect, "visionflow-retrain/retrain")
        for name in ("visionflow-evaluate/evaluate", "visionflow-optimize-run/optimize", "visionflow-package/package"):
            _deployment(prefect, name)
        monitor = _deployment(prefect, "visionflow-monitor/monitor")
        assert monitor["schedules"][0]["schedule"]["cron"] == stack["params"].monitor.cron
        automations = _api("POST", f"{prefect}/api/automations/filter", json={}).json()
        assert any(
            a["trigger"]["expect"] == ["visionflow.drift.detected"]
            and any(action.get("deployment_id") == retrain["id"] for action in a["actions"])
            for a in automations
        ), automations
        assert _form_fields_without_their_description(pipeline["parameter_openapi_schema"]) == []
        cron = retrain["schedules"][0]["schedule"]
        assert cron["cron"] == "30 4 * * 2" and cron["timezone"] == "Europe/Berlin"
        assert retrain["concurrency_limit"] == 1 or retrain["global_concurrency_limit"]["limit"] == 1
        assert retrain["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

        flow_run = _api("POST", f"{prefect}/api/deployments/{pipeline['id']}/create_flow_run", json={}).json()
        late = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)).isoformat()
        late_run = _api(
            "POST",
            f"{prefect}/api/deployments/{retrain['id']}/create_flow_run",
            json={"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": late}}},
        )
        assert late_run.status_code == 201, late_run.text
        late_run = late_run.json()
        finished = _wait_for_run(prefect, flow_run["id"])
        assert finished["state"]["type"] == "COMPLETED", finished["state"]
        run = _mlflow_run_of(stack["mlflow"], stack["params"].run.experiment, flow_run["id"])
        assert run["info"]["status"] == "FINISHED"
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["prefect.flow_run_url"].startswith(prefect)
        skipped = _wait_for_run(prefect, late_run["id"])
        assert skipped["state"]["type"] == "COMPLETED" and skipped["state"]["name"] == "Skipped"

        sweep = _cli(
            "sweep",
            "--params",
            stack["params_file"],
            "--grid",
            "train.optimizer=sgd,adam",
            "--mode",
            "deployment",
            "--timeout",
            "600",
            env=env,
            timeout=900,
        )
        assert sweep.returncode == 0, sweep.stdout + sweep.stderr
        assert sweep.stdout.count("Completed") == 2 and "train.optimizer=sgd" in sweep.stdout
        assert "adam" in sweep.stdout.split("sweep ")[-1]  # the comparison table lists both runs
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_both_uis_show_a_deployment_and_a_run_in_a_browser(stack):
    """Its own deployment, flow run and MLflow run, made through the servers' REST APIs (no other test's state)."""
    prefect, mlflow = stack["prefect"], stack["mlflow"]
    flow = _api("POST", f"{prefect}/api/flows/", json={"name": "visionflow-browser-check"}).json()
    deployment = _api("POST", f"{prefect}/api/deployments/", json={"name": "shown", "flow_id": flow["id"]})
    assert deployment.status_code in (200, 201), deployment.text
    flow_run = _api("POST", f"{prefect}/api/deployments/{deployment.json()['id']}/create_flow_run", json={}).json()
    experiment = httpx.post(f"{mlflow}/api/2.0/mlflow/experiments/create", json={"name": "browser-check"}).json()
    created = httpx.post(
        f"{mlflow}/api/2.0/mlflow/runs/create",
        json={"experiment_id": experiment["experiment_id"], "run_name": "browser-check-run"},
    ).json()["run"]["info"]
    assert shutil.which("chromium"), "Debian's chromium is missing: `make test` installs it (apt-get, as root)"
    assert "visionflow-browser-check" in _rendered(f"{prefect}/deployments")
    assert flow_run["name"] in _rendered(f"{prefect}/runs/flow-run/{flow_run['id']}")
    page = _rendered(f"{mlflow}/#/experiments/{created['experiment_id']}/runs/{created['run_id']}")
    assert "browser-check-run" in page


def test_deployments_on_a_process_work_pool_run_by_a_worker(stack):
    prefect, env = (
        stack["prefect"],
        dict(stack["env"], PREFECT_API_URL=stack["prefect"] + "/api", MLFLOW_TRACKING_URI=stack["mlflow"]),
    )
    missing = _cli("deploy", "--pool", "nope", env=env)
    assert missing.returncode == 2 and "no Prefect work pool 'nope'" in missing.stderr
    created = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "work-pool", "create", "vf-pool", "--type", "process"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    out = _cli("deploy", "--pool", "vf-pool", "--params", stack["params_file"], env=env)
    assert out.returncode == 0 and "sent to work pool vf-pool" in out.stdout, out.stdout + out.stderr
    pipeline = _deployment(prefect, "visionflow-pipeline/pipeline")
    assert pipeline["work_pool_name"] == "vf-pool"
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "vf-pool"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        flow_run = _api("POST", f"{prefect}/api/deployments/{pipeline['id']}/create_flow_run", json={}).json()
        finished = _wait_for_run(prefect, flow_run["id"])
        assert finished["state"]["type"] == "COMPLETED", finished["state"]
        assert (
            _mlflow_run_of(stack["mlflow"], stack["params"].run.experiment, flow_run["id"])["info"]["status"]
            == "FINISHED"
        )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and everything under it, as a dead machine would: frozen first (SIGSTOP, until no new
    child shows up) so nothing spawns while the tree is killed. Prefect starts each flow run in its own session,
    so the worker's process group alone would not reach them."""
    frozen: dict[int, psutil.Process] = {}
    while True:
        found = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        new = [p for p in found if p.pid not in frozen]
        if not new:
            break
        for proc in new:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGSTOP)
                frozen[proc.pid] = proc
    for proc in frozen.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(list(frozen.values()), timeout=30)
    return list(frozen)


def _runs_of(mlflow: str, experiment: str) -> list[dict]:
    found = httpx.get(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment})
    experiment_id = found.json()["experiment"]["experiment_id"]
    return (
        httpx.post(
            f"{mlflow}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment_id], "max_results": 1000}
        )
        .json()
        .get("runs", [])
    )


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _worker_on_a_pool_with_the_zombie_rule(prefect: str, env: dict, params_file: str) -> subprocess.Popen:
    """A process pool `zombie-pool` with a worker (its own session), the deployments sent to it by `visionflow
    deploy` with the zombie window of $VISIONFLOW_ZOMBIE_AFTER_S: heartbeats in the job variables, the rule set."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    pool = {"name": "zombie-pool", "type": "process", "base_job_template": template}
    created = _api("POST", f"{prefect}/api/work_pools/", json=pool)
    assert created.status_code == 201, created.text
    worker = subprocess.Popen(  # starts while the deployments are sent
        [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "zombie-pool"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        waiting = _bare_running_flow_run(prefect, ["visionflow"], "SCHEDULED")  # made before the rule existed
        out = _cli("deploy", "--pool", "zombie-pool", "--params", params_file, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        # it starts with the tag, so its heartbeats carry it like its state changes (which get the deployment's)
        assert "visionflow-heartbeat" in _api("GET", f"{prefect}/api/flow_runs/{waiting}").json()["tags"]
        _api("POST", f"{prefect}/api/flow_runs/{waiting}/set_state", json={"state": {"type": "CANCELLED"}})
        pipeline = _deployment(prefect, "visionflow-pipeline/pipeline")
        assert pipeline["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        assert "visionflow-heartbeat" in pipeline["tags"]
        rules = _api("POST", f"{prefect}/api/automations/filter", json={}).json()
        rule = next((a for a in rules if a["name"] == "visionflow-crash-silent-flow-runs"), None)
        assert rule, f"`visionflow deploy` made no zombie automation: {[a['name'] for a in rules]}"
        assert rule["trigger"]["within"] == int(env["VISIONFLOW_ZOMBIE_AFTER_S"])
        assert rule["actions"][0]["state"] == "CRASHED"
    except BaseException:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
        raise
    return worker


def test_a_worker_killed_mid_trial_leaves_the_trials_failed_never_running(stack, tmp_path):
    """`tune --parallel 2` on a process pool; the worker and its flow-run processes are SIGKILLed while the trials
    train. Prefect's zombie automation (60 s here, through $VISIONFLOW_ZOMBIE_AFTER_S) marks their flow runs
    Crashed, so the search ends with both trials FAIL in the study and FAILED in MLflow, nothing RUNNING. A flow run
    that died before its first heartbeat is Crashed too; one without the heartbeat tag is left alone."""
    prefect, mlflow = stack["prefect"], stack["mlflow"]
    env = dict(
        stack["env"], PREFECT_API_URL=prefect + "/api", MLFLOW_TRACKING_URI=mlflow, VISIONFLOW_ZOMBIE_AFTER_S="60"
    )
    untagged = _bare_running_flow_run(prefect, ["visionflow"])  # running without heartbeats: deploy leaves it
    worker = _worker_on_a_pool_with_the_zombie_rule(prefect, env, stack["params_file"])
    experiment, study = f"zombie-{uuid.uuid4().hex[:8]}", f"zombie-{uuid.uuid4().hex[:8]}"
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.lr: {low: 0.001, high: 0.01, log: true}\n")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    silent = _bare_running_flow_run(prefect, ["visionflow", "visionflow-heartbeat"])  # no heartbeat ever
    tune = None
    try:
        tune = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "tune", "--params", stack["params_file"], "--space", str(space)]
            + ["--trials", "2", "--parallel", "2", "--study", study, "--storage", storage]
            + ["--set", f"run.experiment={experiment}", "--set", "train.max_epochs=300"],
            env=dict(env, COLUMNS="200"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        _wait_until_both_trials_train(prefect, mlflow, experiment, study, tune)
        assert len(_kill_tree(worker.pid)) >= 3  # the worker and at least the two flow-run processes
        try:  # the test's deadline: without the zombie rule the search would wait for 24 h
            output, _ = tune.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "the search still waits 240 s after its worker was killed: the trials' flow runs were never "
                f"marked Crashed (no heartbeat rule?); flow-run events: {_flow_run_events(prefect)}"
            ) from None
    finally:
        for proc in (tune, worker):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    assert tune.returncode == 0 and "2 fail" in output, output
    states = [t.state for t in optuna.load_study(study_name=study, storage=storage).get_trials()]
    assert states == [optuna.trial.TrialState.FAIL] * 2
    flow_runs = _api(
        "POST", f"{prefect}/api/flow_runs/filter", json={"flow_runs": {"tags": {"all_": [f"tune-{study}"]}}}
    ).json()
    assert [r["state"]["type"] for r in flow_runs] == ["CRASHED"] * 2
    assert all("no heartbeat for 60 s" in r["state"]["message"] for r in flow_runs), flow_runs
    assert _api("GET", f"{prefect}/api/flow_runs/{silent}").json()["state"]["type"] == "CRASHED"
    left = _api("GET", f"{prefect}/api/flow_runs/{untagged}").json()
    assert left["state"]["type"] == "RUNNING" and "visionflow-heartbeat" not in left["tags"]
    _api("POST", f"{prefect}/api/flow_runs/{untagged}/set_state", json={"state": {"type": "CANCELLED"}, "force": True})
    runs = _runs_of(mlflow, experiment)
    trials = [r for r in runs if "visionflow.tune.trial" in _tags(r)]
    assert len(trials) == 2 and all(_tags(r)["visionflow.tune.flow_state"] == "Crashed" for r in trials)
    assert {r["info"]["status"] for r in trials} == {"FAILED"}
    trained = [r for r in runs if _tags(r).get("visionflow.stage") == "train"]  # killed while training
    assert trained and {r["info"]["status"] for r in trained} == {"FAILED"}
    assert [r["info"]["run_name"] for r in runs if r["info"]["status"] == "RUNNING"] == []


def _flow_run_events(prefect: str) -> list:
    """The last 50 flow-run events (time, event, end of the flow run id), for a failure message."""
    body = {"filter": {"event": {"prefix": ["prefect.flow-run."]}}, "limit": 50}
    found = _api("POST", f"{prefect}/api/events/filter", json=body).json().get("events", [])
    return [(e["occurred"][11:19], e["event"], e["resource"]["prefect.resource.id"][-6:]) for e in found]


def _bare_running_flow_run(prefect: str, tags: list[str], state_type: str = "RUNNING") -> str:
    """A flow run set Running (or `state_type`) through the API that never sends a heartbeat: a process killed
    before its first heartbeat left it. Returns its id."""
    flow = _api("POST", f"{prefect}/api/flows/", json={"name": "zombie-check"}).json()
    run = _api("POST", f"{prefect}/api/flow_runs/", json={"flow_id": flow["id"], "tags": tags}).json()
    state = {"state": {"type": state_type}, "force": True}
    assert _api("POST", f"{prefect}/api/flow_runs/{run['id']}/set_state", json=state).status_code in (200, 201)
    return run["id"]


def _wait_until_both_trials_train(prefect: str, mlflow: str, experiment: str, study: str, tune, timeout=240):
    """Both trials' flow runs Running and a training run of theirs RUNNING in MLflow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert tune.poll() is None, tune.stdout.read()
        flow_runs = _api(
            "POST", f"{prefect}/api/flow_runs/filter", json={"flow_runs": {"tags": {"all_": [f"tune-{study}"]}}}
        ).json()
        running = [r for r in flow_runs if r["state"]["type"] == "RUNNING"]
        with contextlib.suppress(KeyError, ValueError):
            training = [
                r
                for r in _runs_of(mlflow, experiment)
                if _tags(r).get("visionflow.stage") == "train" and r["info"]["status"] == "RUNNING"
            ]
            if len(running) == 2 and training:
                return
        time.sleep(1)
    raise AssertionError(f"the trials did not start training within {timeout} s")


def test_down_stops_exactly_what_up_started(stack):
    pids = stack["pids"]
    assert all(psutil.pid_exists(pid) for pid in pids)
    out = _cli("down", env=stack["env"])
    assert out.returncode == 0 and "stopped: prefect, mlflow" in out.stdout
    time.sleep(1)
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert "no visionflow stack was running" in _cli("down", env=stack["env"]).stdout
