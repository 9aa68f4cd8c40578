"""The plan as users meet it: `visionflow plan` (a real subprocess) and the plan stage of a pipeline run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from components import tracking
from tests.flows.test_cli import _visionflow


def test_plan_command_prints_the_decisions_and_marks_explicit_values(tmp_path, shapes_dir):
    out = _visionflow(
        "plan", str(shapes_dir), "--set", f"run.cache_dir={tmp_path / 'cache'}", "--set", "augment.image_size=24"
    )
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}
    assert lines["data.channels"][1:3] == ["3", "plan"]  # the shapes are RGB
    assert lines["augment.image_size"][1:3] == ["24", "explicit"]
    assert lines["augment.hflip_p"][1:3] == ["0.5", "plan"]  # circles, squares, triangles survive a mirror
    assert lines["model.name"][1:3] == ["cnn", "plan"]


def test_a_plan_that_cannot_fit_the_machine_exits_2_in_one_line(tmp_path, shapes_dir):
    out = _visionflow(
        "plan",
        str(shapes_dir),
        "--set",
        f"run.cache_dir={tmp_path / 'cache'}",
        "--set",
        "augment.image_size=1024",
        "--set",
        "train.batch_size=1000000",
    )
    assert out.returncode == 2
    assert "does not fit this machine" in out.stderr and "train.batch_size 1000000" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.mark.slow
def test_the_pipeline_plans_before_training_and_records_the_plan(shapes_run):
    params, result = shapes_run
    assert params.data.channels == "auto"  # left to the plan
    run_dir = Path(result.run_dir)
    plan = json.loads((run_dir / "plan.json").read_text())
    decided = {d["field"]: d for d in plan["decisions"]}
    assert decided["data.channels"]["value"] == 3 and decided["data.channels"]["source"] == "plan"
    assert decided["train.max_epochs"]["source"] == "explicit"
    resolved = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert resolved["data"]["channels"] == 3 and resolved["augment"]["mean"] == [0.5, 0.5, 0.5]
    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(result.run_id)
    assert parent.data.params["plan.data.channels"] == "3" and parent.data.params["plan.augment.hflip_p"] == "0.5"
    assert "plan.json" in [a.path for a in client.list_artifacts(result.run_id)]
    train = client.get_run(result.train_run_id)
    assert train.data.params["data.channels"] == "3"  # the training process got resolved params
