"""The training process started ahead of its spec (flows/warm_start.py, components/training/warm.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from components import tracking
from components.config import EvaluateParams, ParamsError, PipelineParams
from components.data.ingest import read_manifest
from components.evaluation.results import EvalReport
from components.training.fit import FitResult
from components.training.warm import SERVING_LINE, TIMINGS_FILE
from flows import warm_start
from flows.tasks import run_training_process
from tests.helpers.params import planned_fit_spec


def test_a_changed_environment_is_not_handed_over_but_the_run_variables_are():
    waiting = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}
    run = {**waiting, "MLFLOW_RUN_ID": "abc", "MLFLOW_TRACKING_URI": "sqlite:///x.db", "PREFECT__FLOW_RUN_ID": "1"}
    assert warm_start.changed_variables(waiting, run) == []
    assert warm_start.changed_variables(waiting, {**run, "CUDA_VISIBLE_DEVICES": "1"}) == ["CUDA_VISIBLE_DEVICES"]
    assert warm_start.changed_variables(waiting, {**run, "VISIONFLOW_TUNE_TRIAL": "{}"}) == ["VISIONFLOW_TUNE_TRIAL"]
    # what scikit-learn's import sets in the flow's process (the bundled digits): handed over, no new process
    sklearn = {"KMP_DUPLICATE_LIB_OK": "True", "KMP_INIT_AT_FORK": "FALSE"}
    assert warm_start.changed_variables(waiting, {**run, **sklearn}) == []


def test_a_waiting_process_never_handed_a_spec_exits_cleanly():
    warm_start.prestart_training_process()
    process = warm_start._waiting.process
    warm_start.discard_training_process()
    assert process.poll() is not None  # ended with the discard, not left importing after the command's end
    assert warm_start._waiting is None


def test_a_call_runs_in_the_waiting_process_and_brings_back_its_result_or_its_error(tmp_path):
    warm_start.prestart_training_process()
    process = warm_start._waiting.process
    try:
        assert warm_start.call("os:getpid") == process.pid
        params = warm_start.call("components.config:load_params", None, ["train.max_epochs=3"])
        assert isinstance(params, PipelineParams) and params.train.max_epochs == 3
        with pytest.raises(ParamsError, match="params file not found"):  # the function's own error, as if run here
            warm_start.call("components.config:load_params", tmp_path / "missing.yaml")
        assert warm_start._waiting.process is process and process.poll() is None  # still waits for its spec
    finally:
        warm_start.discard_training_process()
    assert warm_start.call("os:getpid") == os.getpid()  # none waiting: the function runs in this process


def test_the_pipeline_imports_neither_torch_nor_lightning_before_training():
    """The command's process draws nothing and plans on the CPU without torch: the waiting training process imports
    it (a second copy in the command cost seconds of CPU while both started). Its package stage and the registry
    gate's diff hand their torch work to the serving training process too."""
    probe = (
        "import sys\n"
        "import flows.pipeline, flows.package, flows.diff\n"
        "from components.config import TrainerParams\n"
        "from components.planning import machine_of\n"
        "machine_of(TrainerParams(accelerator='cpu'))\n"
        "heavy = ('torch', 'torchvision', 'albumentations', 'lightning', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_training_processes_get_the_allocator_settings_unless_the_environment_sets_its_own(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    warm_start.prestart_training_process()
    try:
        assert warm_start.call("os:getenv", "MALLOC_TRIM_THRESHOLD_") == "12345"
        assert (
            warm_start.call("os:getenv", "MALLOC_MMAP_THRESHOLD_") == warm_start.ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]
        )
    finally:
        warm_start.discard_training_process()


_FAULTS_PER_STEP = """
import resource, torch
nn = torch.nn
model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(64 * 32 * 32, 10))
optimizer = torch.optim.Adam(model.parameters())
x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
def steps(n):
    for _ in range(n):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
steps(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator variables and page-fault counts")
def test_the_allocator_settings_keep_a_training_step_from_faulting_its_memory_in_again():
    base = {k: v for k, v in os.environ.items() if k not in warm_start.ALLOCATOR_ENV}

    def faults_per_step(env):
        done = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.strip())

    default, tuned = faults_per_step(base), faults_per_step(warm_start.process_env(base))
    assert tuned * 5 < default, (tuned, default)  # about 800 against 8,000 for this net


@pytest.mark.slow
def test_the_waiting_process_trains_the_spec_and_its_ddp_ranks_start_from_it(tmp_path, shapes_dir):
    spec = planned_fit_spec(tmp_path, shapes_dir, trainer__strategy="ddp", trainer__devices=2, train__max_epochs=2)
    spec = spec.model_copy(update={"rank_results": True})
    spec_path = tmp_path / "train" / "fit_spec.json"
    spec_path.parent.mkdir(parents=True)
    spec_path.write_text(spec.model_dump_json())
    warm_start.prestart_training_process()
    env = dict(os.environ, MLFLOW_RUN_ID=spec.mlflow_run_id, MLFLOW_TRACKING_URI=tracking.tracking_uri())
    process = warm_start.training_process(spec_path, env, serve=True)
    output = process.stdout.read().decode(errors="replace")  # to its end: a DDP rank zero does not serve calls
    assert SERVING_LINE not in output
    assert process.wait(timeout=300) == 0, output[-3000:]
    timings = json.loads((spec_path.parent / TIMINGS_FILE).read_text())  # the waiting process trained
    assert timings["process_start"] <= timings["imported"] <= timings["spec_read"] <= timings["returned"]
    rank0 = FitResult.model_validate_json(Path(spec.result_path).read_text())
    rank1 = FitResult.model_validate_json(Path(f"{spec.result_path}.rank1").read_text())  # the re-run rank read it too
    assert (rank0.global_rank, rank1.global_rank, rank0.world_size) == (0, 1, 2)
    assert rank0.weights_sha256 == rank1.weights_sha256
    client = MlflowClient(tracking.tracking_uri())
    assert len(client.get_metric_history(spec.mlflow_run_id, "val/acc")) == 2
    assert any(key.startswith("system/") for key in client.get_run(spec.mlflow_run_id).data.metrics)


@pytest.mark.slow
def test_after_its_fit_the_training_process_serves_calls_until_the_pipeline_lets_it_go(tmp_path, shapes_dir):
    spec = planned_fit_spec(tmp_path, shapes_dir, train__max_epochs=1)
    spec_path = tmp_path / "train" / "fit_spec.json"
    spec_path.parent.mkdir(parents=True)
    warm_start.prestart_training_process()
    try:
        result = run_training_process(spec, spec_path, logging.getLogger("test"))
        serving = warm_start._serving.process
        assert result.error is None and Path(result.best_checkpoint).is_file()
        assert serving.poll() is None  # the train stage is over, the process is not
        assert warm_start.call("os:getpid") == serving.pid != os.getpid()
        # the fit's objects (Trainer, data module, optimizer: reference cycles) were freed before it served
        assert warm_start.call("gc:collect") < 300
        report = warm_start.call(
            "components.evaluation.evaluate:evaluate_checkpoint", result.best_checkpoint,
            [row for row in read_manifest(spec.manifest_path) if row["split"] == "val"], tmp_path / "evaluation",
            EvaluateParams(explain=False), spec.params.data.max_pixels,
        )  # fmt: skip
        assert isinstance(report, EvalReport) and Path(report.confusion_png_path).is_file()
    finally:
        warm_start.discard_training_process()
    assert serving.poll() is not None and warm_start._serving is None


_FLOW_ON_EARLY_SERVER = """
import json, os, socket, sys
from components.quiet import set_offline_defaults
set_offline_defaults()
from flows import warm_start
if sys.argv[1] == "taken":  # the server's port is taken: its process exits, Prefect's own start takes over
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    warm_start._free_port = lambda: held.getsockname()[1]
warm_start.early_start()
ours = os.environ.get("PREFECT_API_URL")
server = warm_start._server
warm_start.wait_for_server()
from prefect import flow
answer = flow(lambda: 42, name="probe")()
print(json.dumps({"answer": answer, "ours": ours, "pid": server.pid if server else None,
                  "api": os.environ.get("PREFECT_API_URL"),
                  "server_modules": "prefect.server.api.server" in sys.modules}))
"""


def _run_flow_on_early_server(tmp_path, case: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    done = subprocess.run(
        [sys.executable, "-c", _FLOW_ON_EARLY_SERVER, case], capture_output=True, text=True, timeout=300, env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # the script's one JSON line; Prefect's log lines (the server's stop, at exit) may come after it
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))


def test_the_temporary_server_started_early_runs_the_flow_and_stops_with_the_command(tmp_path):
    out = _run_flow_on_early_server(tmp_path, "free")
    assert out["answer"] == 42
    assert out["ours"] and out["api"] == out["ours"]  # Prefect used the server started before the imports
    assert not out["server_modules"]  # so this process never imported the server's modules
    assert not psutil.pid_exists(out["pid"]) or psutil.Process(out["pid"]).status() == psutil.STATUS_ZOMBIE


def test_a_temporary_server_that_cannot_start_gives_way_to_prefects_own(tmp_path):
    out = _run_flow_on_early_server(tmp_path, "taken")
    assert out["answer"] == 42  # the flow still ran, on Prefect's own temporary server
    assert out["ours"] and out["api"] is None
    assert out["server_modules"]
