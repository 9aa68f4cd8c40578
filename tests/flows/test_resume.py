"""What `visionflow resume` accepts: FAILED, KILLED and crashed RUNNING runs; a FINISHED run or one whose
process still runs is refused with one line and nothing logged (real MLflow store, real processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from components import tracking
from components.config import load_params
from components.errors import StageError, VisionflowError
from flows.pipeline import pipeline, resume_pipeline
from flows.runs import PID_STARTED_TAG, PID_TAG, resumable_pipeline_run
from tests.helpers.params import tiny_overrides


def _visionflow(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture(scope="module")
def failed_then_resumed(tmp_path_factory, shapes_dir, prefect_harness):
    """A 1-epoch run that fails at packaging (an impossible ONNX parity limit), resumed with a sane limit."""
    tmp = tmp_path_factory.mktemp("resume")
    params = load_params(None, tiny_overrides(tmp, shapes_dir, train__max_epochs=1, package__parity_max_abs_diff=1e-12))
    with pytest.raises(StageError, match="stage package failed"):
        pipeline(params)
    client = MlflowClient(tracking.tracking_uri())
    experiment_id = client.get_experiment_by_name(params.run.experiment).experiment_id
    (failed,) = client.search_runs([experiment_id], filter_string="tags.`mlflow.parentRunId` IS NULL")
    result = resume_pipeline(failed.info.run_id, ["package.parity_max_abs_diff=0.001"])
    return params, failed, result


def _registry_state(client: MlflowClient, experiment_id: str, name: str) -> dict:
    runs = client.search_runs([experiment_id])
    return {
        "runs": sorted((r.info.run_id, r.info.status, r.info.end_time) for r in runs),
        "versions": sorted(v.version for v in client.search_model_versions(f"name='{name}'")),
        "aliases": dict(client.get_registered_model(name).aliases),
    }


@pytest.mark.slow
def test_a_failed_run_resumes_into_the_same_runs(failed_then_resumed):
    params, failed, result = failed_then_resumed
    assert failed.info.status == "FAILED" and failed.data.tags[tracking.FAILED_STAGE_TAG] == "package"
    client = MlflowClient(tracking.tracking_uri())
    assert result.run_id == failed.info.run_id and client.get_run(result.run_id).info.status == "FINISHED"
    train_runs = client.search_runs([failed.info.experiment_id], filter_string=f"tags.`{tracking.STAGE_TAG}` = 'train'")
    assert [r.info.run_id for r in train_runs] == [result.train_run_id]  # re-attached, not a second one
    assert result.model_version == f"{params.package.model_name} v1" and result.promoted


@pytest.mark.slow
def test_a_finished_run_is_refused_with_one_line_and_nothing_logged(failed_then_resumed):
    params, failed, result = failed_then_resumed
    client = MlflowClient(tracking.tracking_uri())
    before = _registry_state(client, failed.info.experiment_id, params.package.model_name)
    out = _visionflow("resume", result.run_id)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert f"run {result.run_id} is FINISHED" in lines[0]
    assert f"visionflow run --params {result.run_dir}/params.yaml" in lines[0]
    assert "temporary server" not in out.stdout + out.stderr, out.stdout  # refused before anything starts
    assert _registry_state(client, failed.info.experiment_id, params.package.model_name) == before


def test_a_running_run_resumes_only_when_its_process_is_gone(tmp_path, shapes_dir):
    params = load_params(None, tiny_overrides(tmp_path, shapes_dir))
    run_dir = tmp_path / "runs" / "crashed"
    run_dir.mkdir(parents=True)
    (run_dir / "params.yaml").write_text("train:\n  max_epochs: 1\n")
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        import psutil

        run_id = tracking.start_run(
            params.run.experiment,
            "pipeline",
            {
                tracking.RUN_DIR_TAG: str(run_dir),
                PID_TAG: str(worker.pid),
                PID_STARTED_TAG: f"{psutil.Process(worker.pid).create_time():.3f}",
            },
        )
        out = _visionflow("resume", run_id)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].endswith(f"run {run_id} is still running in pid {worker.pid}")
        assert len(out.stderr.strip().splitlines()) == 1
        assert tracking.get_run(run_id).info.status == "RUNNING"
    finally:
        worker.kill()
        worker.wait()
    _, resumable_dir = resumable_pipeline_run(run_id)  # the process is gone: a crash, which resume continues
    assert resumable_dir == run_dir
    tracking.set_tags(run_id, {PID_STARTED_TAG: "12.000"})  # a pid reused by another process is not the run's
    tracking.set_tags(run_id, {PID_TAG: str(os.getpid())})
    assert resumable_pipeline_run(run_id)[1] == run_dir
    tracking.set_tags(run_id, {tracking.PARENT_TAG: "0123abcd"})
    with pytest.raises(VisionflowError, match="a stage of pipeline run 0123abcd: resume that run instead"):
        resumable_pipeline_run(run_id)
