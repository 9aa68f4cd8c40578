"""Sweeps and comparison: one pipeline per grid combination in one experiment, compared from MLflow."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from components import tracking
from components.errors import VisionflowError
from flows.cli import app
from flows.sweep import SWEEP_TAG, plan_sweep, sweep
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
