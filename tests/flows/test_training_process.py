"""The training entry point as its own process: DDP over 2 CPU processes, kill and resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from components import tracking
from components.config import load_params
from components.data.ingest import read_manifest
from components.quiet import LOG_FILE_ENV
from components.training.checkpoint import read_checkpoint
from components.training.fit import FitResult, FitSpec, state_dict_sha256
from components.training.launch import prepare_fit_spec
from components.training.module import load_classifier
from tests.helpers.params import planned_fit_spec, tiny_overrides

pytestmark = pytest.mark.slow


def test_ddp_on_two_cpu_processes_logs_one_run(tmp_path, shapes_dir):
    spec = planned_fit_spec(
        tmp_path, shapes_dir, trainer__strategy="ddp", trainer__devices=2, train__max_epochs=2
    )  # no `auto` reaches fit
    params, run_id = spec.params, spec.mlflow_run_id
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    log_file = tmp_path / "fit.log"  # as the CLI hands it down: Lightning's INFO lines go there
    out = subprocess.run(
        [sys.executable, "-m", "components.training.fit", str(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, LOG_FILE_ENV: str(log_file)},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = FitResult.model_validate_json((tmp_path / "result.json").read_text())
    assert result.error is None and Path(result.best_checkpoint).is_file()
    assert load_classifier(result.best_checkpoint).classes == spec.classes
    # written by rank zero's background thread: the last checkpoint holds the weights the fit ended with
    last = read_checkpoint(result.last_checkpoint)
    assert last["epoch"] == 1 and state_dict_sha256(last["state_dict"]) == result.weights_sha256
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(params.run.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the other rank created no run
    assert len(client.get_metric_history(run_id, "val/acc")) == 2  # logged by rank zero only
    assert "distributed_backend=gloo" in log_file.read_text()  # Lightning really started 2 gloo processes
    # Each process saw its half of the train split per epoch; the margins of both were summed before ranking.
    train_rows = [row for row in read_manifest(spec.manifest_path) if row["split"] == "train"]
    assert result.suspicious_labels is not None and result.suspicious_labels.scored == len(train_rows)
    assert "suspicious_labels.csv" in {Path(a.path).name for a in client.list_artifacts(run_id, "suspicious_labels")}


def _wait_for(predicate, timeout: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"process ended ({process.returncode}) before {what}: {process.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_marks_runs_killed_and_resume_finishes_the_same_run(tmp_path, shapes_dir):
    overrides = tiny_overrides(tmp_path, shapes_dir, train__max_epochs=60, train__early_stopping_patience=0)
    experiment = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.experiment="))
    args = [a for o in overrides for a in ("--set", o)]
    env = dict(os.environ, COLUMNS="200")
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    runs_dir = tmp_path / "runs"
    last = lambda: list(runs_dir.glob("*/train/checkpoints/last.ckpt"))  # noqa: E731
    try:
        _wait_for(lambda: bool(last()), 240, "the first checkpoint", process)
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output[-3000:]
    client = MlflowClient(tracking.tracking_uri())
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([experiment_id], filter_string="tags.`mlflow.parentRunId` IS NULL")
    assert parent.info.status == "KILLED"
    assert parent.data.tags[tracking.FAILED_STAGE_TAG] == "train"
    train_run_id = tracking.child_run(parent.info.run_id, "train")
    assert client.get_run(train_run_id).info.status == "KILLED"
    epochs_before = len(client.get_metric_history(train_run_id, "val/acc"))
    checkpoint_epoch = torch.load(last()[0], weights_only=True)["epoch"]  # 0-based epoch of the last save
    # Every epoch up to the checkpoint was logged, and at most the one after it (killed before its save).
    assert epochs_before in (checkpoint_epoch + 1, checkpoint_epoch + 2), (epochs_before, checkpoint_epoch)

    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "resume", parent.info.run_id],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["visionflow.resumed"] == "true"
    assert tracking.child_run(parent.info.run_id, "train") == train_run_id  # the same train run, re-attached
    assert client.get_run(train_run_id).info.status == "FINISHED"
    # The epochs done before the kill are not repeated (at most the interrupted one is).
    assert 60 <= len(client.get_metric_history(train_run_id, "val/acc")) <= 61
    resumed_epochs = [int(n) for n in re.findall(r"epoch (\d+)/60", out.stdout + out.stderr)]
    assert resumed_epochs and min(resumed_epochs) >= epochs_before


def test_torchrun_two_cpu_processes_one_run_identical_weights(tmp_path, shapes_dir):
    """The entry point under torchrun (2 gloo processes): one MLflow run, the same final weights on both ranks
    (mobilenet_v3_small has BatchNorm: on CPUs DDP keeps its running statistics in step by broadcasting rank zero's)."""
    params = load_params(
        None,
        tiny_overrides(
            tmp_path,
            shapes_dir,
            trainer__strategy="ddp",
            trainer__devices=2,
            train__max_epochs=2,
            model__name="mobilenet_v3_small",
            train__num_workers=0,
        ),
    )
    spec_path = prepare_fit_spec(params, tmp_path / "job")  # what `visionflow fit-spec` writes
    spec = FitSpec.model_validate_json(spec_path.read_text())
    spec_path.write_text(spec.model_copy(update={"rank_results": True}).model_dump_json())
    run_id = spec.mlflow_run_id
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "-m",
            "components.training.fit",
            str(spec_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rank0 = FitResult.model_validate_json(Path(spec.result_path).read_text())
    rank1 = FitResult.model_validate_json(Path(f"{spec.result_path}.rank1").read_text())
    assert (rank0.global_rank, rank1.global_rank, rank0.world_size) == (0, 1, 2)
    assert rank0.effective_batch_size == 2 * params.train.batch_size
    assert rank0.weights_sha256 and rank0.weights_sha256 == rank1.weights_sha256
    assert "torchrun" in out.stdout + out.stderr  # the launcher was detected, Lightning did not re-launch
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(params.run.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert len(client.get_metric_history(run_id, "val/acc")) == 2
    assert client.get_run(run_id).data.params["trainer.effective_batch_size"] == str(2 * params.train.batch_size)
