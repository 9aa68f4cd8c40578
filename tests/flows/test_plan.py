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
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = _visionflow(
        "plan",
        str(shapes_dir),
        "--set",
        f"run.cache_dir={tmp_path / 'cache'}",
        "--set",
        "augment.image_size=24",
        env={"TMPDIR": str(scratch)},
    )
    assert out.returncode == 0, out.stderr
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("visionflow-plan-")]  # its work folder went
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


def test_weights_for_another_architecture_stop_the_plan_in_one_line(tmp_path, shapes_dir):
    import torch
    import torchvision

    weights = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), weights)
    out = _visionflow(
        "plan",
        str(shapes_dir),
        "--set",
        f"run.cache_dir={tmp_path / 'cache'}",
        "--set",
        "model.name=resnet18",
        "--set",
        f"model.weights={weights}",
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "does not fit resnet18" in out.stderr and str(weights) in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def _tuner_spec(tmp_path, shapes_dir):
    from tests.helpers.params import planned_fit_spec

    return planned_fit_spec(tmp_path, shapes_dir, train__max_epochs=1)


@pytest.mark.slow
def test_the_tuner_finds_batch_size_and_lr_in_the_training_process(tmp_path, shapes_dir):
    from components.training.fit import FitResult, main

    spec = _tuner_spec(tmp_path, shapes_dir)
    train = spec.params.train.model_copy(update={"find": ["batch_size", "lr"], "batch_size": 4, "batch_size_max": 16})
    spec = spec.model_copy(update={"params": spec.params.model_copy(update={"train": train})})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    assert main([str(tmp_path / "spec.json")]) == 0
    result = FitResult.model_validate_json((tmp_path / "result.json").read_text())
    assert result.effective_batch_size == 16  # CPU memory never runs out: the power search stops at the bound
    assert result.lr > 0  # lr_find's suggestion, or train.lr when its curve (here: 3 batches an epoch) gives none
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(spec.mlflow_run_id)
    assert run.data.params["tuner.batch_size"] == "16" and float(run.data.params["tuner.lr"]) == result.lr
    assert "tuner/lr_find.png" in [a.path for a in client.list_artifacts(spec.mlflow_run_id, "tuner")]


def test_the_tuner_refuses_ddp_in_one_line_instead_of_hanging(tmp_path, shapes_dir):
    from components.training.fit import FitResult, main

    spec = _tuner_spec(tmp_path, shapes_dir)
    params = spec.params
    trainer = params.trainer.model_copy(update={"strategy": "ddp", "devices": 2})
    train = params.train.model_copy(update={"find": ["lr"]})
    spec = spec.model_copy(update={"params": params.model_copy(update={"trainer": trainer, "train": train})})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    assert main([str(tmp_path / "spec.json")]) == 3
    error = FitResult.model_validate_json((tmp_path / "result.json").read_text()).error
    assert "needs one training process" in error and "\n" not in error
