"""Sweeps and comparison: one pipeline per grid combination in one experiment, compared from MLflow."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from components import tracking
from components.errors import VisionflowError
from flows.cli import app
from flows.sweep import SWEEP_TAG, plan_sweep, sweep
from tests.helpers.importtime import visionflow_importtime
from tests.helpers.params import tiny_overrides

runner = CliRunner()


def test_every_combination_is_validated_before_anything_runs(tmp_path, shapes_dir):
    sets = tiny_overrides(tmp_path, shapes_dir)
    with pytest.raises(VisionflowError, match="train.optimizer"):
        plan_sweep(None, sets, ["train.optimizer=sgd,rmsprop"], None)


def test_invalid_grid_exits_2_without_a_traceback():
    result = runner.invoke(app, ["sweep", "--grid", "train.optimizer"])
    assert result.exit_code == 2
    assert "expected KEY=V1,V2" in result.output and "Traceback" not in result.output


def test_without_a_server_a_deployment_sweep_or_pool_search_exits_2_before_importing_every_flow(tmp_path):
    """Both need the pipeline deployment; with no Prefect server configured the answer comes before flows.deploy,
    which imports every flow, is imported (it took 15 s of a 20 s error on 2 busy cores)."""
    (tmp_path / "space.yaml").write_text("params:\n  train.lr: {low: 0.001, high: 0.1}\n")
    for args, error in (
        (["sweep", "--grid", "train.lr=0.001,0.002", "--mode", "deployment"], "error: no visionflow-pipeline/pipeline"),
        (["tune", "--space", "space.yaml", "--parallel", "2"], "error: --parallel needs the visionflow-pipeline"),
    ):
        answer = visionflow_importtime(*args, cwd=tmp_path, drop_env=("PREFECT_API_URL",))
        assert answer.returncode == 2 and len(answer.said) == 1 and answer.said[0].startswith(error), answer.said
        assert "flows.deploy" not in answer.imported and "flows.retrain" not in answer.imported


@pytest.mark.slow
def test_sweep_runs_each_combination_in_one_experiment_and_compares(tmp_path, shapes_dir, prefect_harness):
    sets = tiny_overrides(tmp_path, shapes_dir, train__max_epochs=2, package__enabled=False)
    plan = plan_sweep(None, sets, ["train.optimizer=sgd,adam"], None)
    outcome = sweep(plan)
    assert list(outcome.states.values()) == ["Completed", "Completed"]
    runs = tracking.recent_runs(plan.experiment, 10, tag=(SWEEP_TAG, plan.sweep_id))
    assert sorted(r["params"]["train.optimizer"] for r in runs) == ["adam", "sgd"]
    assert all("test/accuracy" in r["metrics"] for r in runs)

    plot = tmp_path / "cmp.png"
    result = runner.invoke(
        app,
        ["compare", "--experiment", plan.experiment, "--sweep", plan.sweep_id, "--plot", str(plot)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "train.optimizer" in result.output and "test/accuracy" in result.output
    assert "adam" in result.output and "sgd" in result.output and plot.is_file()

    listed = runner.invoke(app, ["runs", "--experiment", plan.experiment], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and runs[0]["run_id"][:8] in listed.output

    unknown = runner.invoke(app, ["compare", "--experiment", "no-such-experiment"])
    assert unknown.exit_code == 2 and "no MLflow experiment 'no-such-experiment'" in unknown.output
