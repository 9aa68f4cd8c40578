"""The training process's MLflow logger: asynchronous, buffered so the flush that ends a fit returns at once, and
nothing logged is lost."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS

from components.training.fit import async_logger


@pytest.fixture(autouse=True)
def _session_tracking_uri():
    """Lightning's MLflow logger sets MLflow's process-wide tracking URI to its own: the next tests in this worker
    must find the session's store again."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def test_the_async_logger_buffers_and_every_metric_reaches_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv(MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS.name, raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("async")).info.run_id
    logger = async_logger("async", uri, run_id)
    # MLflow's own parser reads the setting (a value it cannot read stops its logging thread for good)
    assert MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS.get() >= 1
    for step in range(5):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    logger.finalize("success")  # flushes the queue and ends the run, as at the end of a fit
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, round(m.value, 4)) for m in history] == [(s, round(1.0 / (s + 1), 4)) for s in range(5)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_buffering_interval_set_in_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS.name, "3")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    async_logger("async", uri, client.create_run(client.create_experiment("async")).info.run_id)
    assert MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS.get() == 3


@pytest.mark.parametrize("value", ["0.5", "-1", "²"])  # int() stops MLflow's thread on two, "-1" makes it spin
def test_a_value_mlflow_cannot_use_is_replaced_and_said(tmp_path, monkeypatch, capsys, value):
    monkeypatch.setenv(MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS.name, value)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    async_logger("async", uri, client.create_run(client.create_experiment("async")).info.run_id)
    assert MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS.get() == 1
    assert f"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS={value} is not a whole number" in capsys.readouterr().out


def test_a_resume_on_other_devices_keeps_the_first_batch_params_says_so_and_loses_no_metric(tmp_path, capsys):
    from types import SimpleNamespace

    from components.config import load_params
    from components.training.devices import plan_devices
    from components.training.fit import _announce

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("async")).info.run_id
    logger = async_logger("async", uri, run_id)
    params = load_params(None, ["train.lr=0.01", "trainer.accelerator=cpu"])
    plan, rank_zero = plan_devices(params.trainer), SimpleNamespace(is_global_zero=True)
    _announce(rank_zero, logger, params, plan, 1, 64, 0.01, 64)
    logger.log_metrics({"val/acc": 0.5}, 0)
    _announce(rank_zero, logger, params, plan, 1, 128, 0.02, 128)  # resumed on other devices: MLflow refuses
    logger.log_metrics({"val/acc": 0.75}, 1)
    logger.finalize("success")
    assert "batch/lr params of the first attempt kept in MLflow" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.data.params["trainer.effective_batch_size"] == "64" and run.data.params["train.lr_effective"] == "0.01"
    assert [m.value for m in sorted(client.get_metric_history(run_id, "val/acc"), key=lambda m: m.step)] == [0.5, 0.75]
