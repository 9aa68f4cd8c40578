"""The run diff and calibrated probabilities on the shared shapes run: `visionflow diff` scores two runs' models on
the same test rows and logs what changed to a new MLflow run tagged with both; the pipeline fits a temperature on
the validation split and carries it into the bundle."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from prefect.artifacts import Artifact
from typer.testing import CliRunner

from components import tracking
from components.bundle_format import verify_bundle
from flows.cli import app
from flows.diff import RUN_A_TAG, RUN_B_TAG, diff_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _bundle_dir(result) -> Path:
    return Path(result.bundle).with_suffix("").with_suffix("")


def _fake_run(experiment: str, run_dir: Path, source_dir: Path) -> str:
    """A finished MLflow run whose run directory holds a copy of `source_dir`'s params and validated manifest."""
    (run_dir / "data").mkdir(parents=True)
    shutil.copy(source_dir / "params.yaml", run_dir / "params.yaml")
    shutil.copy(source_dir / "data" / "manifest.clean.csv", run_dir / "data" / "manifest.clean.csv")
    with tracking.run_scope(experiment, run_dir.name, {tracking.RUN_DIR_TAG: str(run_dir)}) as run:
        return run.run_id


def _invoke(*args: str):
    return CliRunner().invoke(app, ["diff", *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def nudged_run(shapes_run, tmp_path_factory) -> str:
    """A second run without a bundle: the shared run's checkpoint with its 'circle' logit raised by 3, so some
    answers change (a cheap second model, no training)."""
    params, result = shapes_run
    run_dir = tmp_path_factory.mktemp("nudged") / "run"
    checkpoint = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    bias = [k for k, v in checkpoint["state_dict"].items() if k.endswith(".bias") and v.shape == (3,)][-1]
    checkpoint["state_dict"][bias][0] += 3.0
    run_id = _fake_run(params.run.experiment, run_dir, Path(result.run_dir))
    (run_dir / "train" / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, run_dir / "train" / "checkpoints" / "best.ckpt")
    return run_id


def test_the_pipeline_fits_a_temperature_and_the_bundle_carries_it(shapes_run):
    params, result = shapes_run
    calibration = json.loads((Path(result.run_dir) / "evaluation" / "calibration.json").read_text())
    assert calibration["num_fitted"] == result.split_counts["val"] and calibration["temperature"] > 0
    assert verify_bundle(_bundle_dir(result))["temperature"] == pytest.approx(calibration["temperature"])
    evaluate_run = tracking.get_run(result.evaluate_run_id)
    assert evaluate_run.data.metrics["calibration/temperature"] == pytest.approx(calibration["temperature"])
    assert evaluate_run.data.metrics["calibration/ece_after"] == pytest.approx(evaluate_run.data.metrics["test/ece"])
    artifacts = {Path(a.path).name for a in tracking.client().list_artifacts(result.evaluate_run_id, "evaluation")}
    assert {"reliability.png", "calibration.json"} <= artifacts


def test_a_run_against_itself_on_a_data_set_changes_nothing(shapes_run, shapes_dir, tmp_path):
    _, result = shapes_run
    out = _invoke(result.run_id, result.run_id, "--data", str(shapes_dir), "--out", str(tmp_path / "same"))
    assert out.exit_code == 0, out.output
    done = json.loads((tmp_path / "same" / "diff.json").read_text())
    assert done["counts"] == {"fixed": 0, "broken": 0, "changed": 0}
    assert done["num_images"] == sum(result.split_counts.values())  # all of --data (its bad files quarantined)
    assert done["summary_a"] == done["summary_b"] and "fixed.png" not in done["files"]
    assert Path(done["files"]["confusion_diff.png"]).is_file()
    assert "broken" in out.output and f"{done['summary_a']['accuracy']:.4f} → " in out.output


def test_diff_of_two_runs_writes_what_changed_to_a_run_tagged_with_both(shapes_run, nudged_run, tmp_path):
    _, result = shapes_run
    done = diff_flow(result.run_id, nudged_run, out_dir=str(tmp_path / "diff"))
    diff = done.result
    with open(diff.files["changed.csv"], newline="") as handle:
        changed = list(csv.DictReader(handle))
    assert changed and all(row["answer_b"] == "circle" != row["answer_a"] for row in changed)
    assert diff.counts["broken"] + diff.counts["fixed"] + diff.counts["changed"] == len(changed)
    gained = (diff.summary_b["accuracy"] - diff.summary_a["accuracy"]) * diff.num_images
    assert diff.counts["fixed"] - diff.counts["broken"] == pytest.approx(gained)
    with open(diff.files["per_class_deltas.csv"], newline="") as handle:
        per_class = {row["class"]: row for row in csv.DictReader(handle)}
    assert set(per_class) == {"circle", "square", "triangle"} and float(per_class["circle"]["recall_delta"]) >= 0
    for kind in ("fixed", "broken"):
        assert (kind + ".png" in diff.files) == (diff.counts[kind] > 0)
    assert {"confusion_diff.png", "reliability.png", "summary.md", "diff.json"} <= set(diff.files)
    assert f"{diff.counts['broken']} broken" in Path(diff.files["summary.md"]).read_text()

    run = tracking.get_run(done.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.STAGE_TAG] == "diff"
    assert run.data.tags[RUN_A_TAG] == result.run_id and run.data.tags[RUN_B_TAG] == nudged_run
    assert run.data.metrics["diff/broken"] == diff.counts["broken"]
    logged = {Path(a.path).name for a in tracking.client().list_artifacts(done.run_id, "diff")}
    assert {Path(path).name for path in diff.files.values()} == logged
    assert nudged_run[:8] in Artifact.get("run-diff").data


def test_diff_command_refuses_unknown_runs_runs_without_a_model_and_other_label_sets(shapes_run, tmp_path):
    from components.packaging.bundle import write_bundle
    from components.packaging.model_card import model_card
    from tests.components.packaging.test_bundle import preprocess_16, tiny_onnx_model

    params, result = shapes_run
    unknown = _invoke(result.run_id, "0123456789abcdef")
    assert unknown.exit_code == 2 and "no MLflow run 0123456789abcdef" in unknown.output

    empty = _fake_run(params.run.experiment, tmp_path / "empty", Path(result.run_dir))
    no_model = _invoke(empty, result.run_id)
    assert no_model.exit_code == 2 and f"run {empty} has no bundle or checkpoint" in no_model.output

    other_dir = tmp_path / "other"
    other = _fake_run(params.run.experiment, other_dir, Path(result.run_dir))
    onnx = tiny_onnx_model(tmp_path / "model.onnx")
    card = model_card("pets", "generated", "fp", {"test": 1}, {})
    write_bundle(other_dir / "package" / "bundle", onnx, ["cat", "dog", "circle"], preprocess_16()[1], {}, card)
    labels = _invoke(result.run_id, other)
    assert labels.exit_code == 2 and "label sets differ (only A has: square, triangle; only B has: cat, dog)" in (
        labels.output
    )
    for out in (unknown, no_model, labels):
        assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
