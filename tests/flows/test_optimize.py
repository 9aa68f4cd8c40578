"""The compression stage in the pipeline and alone: every variant measured, gated and compared."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components import tracking
from components.config import load_params
from components.packaging.bundle import verify_bundle
from flows.optimize import optimize_from_run
from flows.pipeline import pipeline
from tests.helpers.params import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

COMPRESS = dict(
    optimize__enabled=True,
    optimize__latency_repeats=3,
    optimize__distill__enabled=True,
    optimize__distill__epochs=2,
    optimize__prune__enabled=True,
    optimize__prune__finetune_epochs=1,
    optimize__prune__unstructured_amount=0.5,
    optimize__quantize__dynamic=True,
    optimize__quantize__calibration_images=16,
    optimize__tolerance=0.1,  # about one test image of the ~12 in the shapes' test split
)
TOLERANCE = COMPRESS["optimize__tolerance"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, shapes_dir, prefect_harness):
    tmp = tmp_path_factory.mktemp("optimize")
    params = load_params(None, tiny_overrides(tmp, shapes_dir, **COMPRESS))
    return params, pipeline(params)


def test_every_variant_has_a_child_run_and_a_row(compressed):
    params, result = compressed
    names = {
        "fp32",
        "int8-static",
        "int8-dynamic",
        "pruned-50",
        "sparse-50",
        "student-cnn-distilled",
        "student-cnn-baseline",
    }
    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(result.run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.run_id}' and tags.`visionflow.stage` = 'optimize'",
    )
    assert {r.data.tags["visionflow.variant"] for r in runs} == names
    assert all(r.info.status == "FINISHED" for r in runs)
    table = Path(result.comparison).read_text()
    assert all(name in table for name in names)
    assert {"comparison.csv", "comparison.md", "tradeoff.png"} <= {
        Path(a.path).name for a in client.list_artifacts(result.run_id, "optimize")
    }
    assert parent.data.tags["visionflow.best_variant"] == result.best_variant != "fp32"


def test_the_gate_rejects_a_variant_that_lost_accuracy(compressed):
    """90 % of the channels pruned at random and no fine-tuning: near chance, far past the tolerance."""
    _, result = compressed
    bad = optimize_from_run(
        result.run_id,
        [
            "optimize.latency_repeats=3",
            "optimize.distill.enabled=false",
            "optimize.quantize.static=false",
            "optimize.quantize.dynamic=false",
            "optimize.prune.enabled=true",
            "optimize.prune.ratio=0.9",
            "optimize.prune.importance=random",
            "optimize.prune.finetune_epochs=0",
            "optimize.prune.unstructured_amount=0",
            f"optimize.tolerance={TOLERANCE}",
        ],
    )
    variants = {v.name: v for v in bad.variants}
    assert set(variants) == {"fp32", "pruned-90"}
    assert variants["pruned-90"].accuracy_drop > TOLERANCE and not variants["pruned-90"].accepted
    assert bad.best is None  # nothing accepted besides the reference


def test_a_model_that_cannot_be_pruned_is_a_row_and_the_stage_goes_on(compressed, monkeypatch):
    """torch-pruning refusing the network (as it refuses cross-stitch multi-task ones) fails only the pruning
    variant's run: its row says why, int8 is still made and the stage's run finishes."""

    def refuse(*args, **kwargs):
        raise ValueError("torch-pruning cannot prune Net: a graph it does not understand")

    monkeypatch.setattr("flows.optimize.pruned_variant", refuse)
    _, result = compressed
    partial = optimize_from_run(
        result.run_id,
        [
            "optimize.latency_repeats=3",
            "optimize.distill.enabled=false",
            "optimize.quantize.dynamic=false",
            "optimize.prune.enabled=true",
            "optimize.prune.unstructured_amount=0",
        ],
    )
    variants = {v.name: v for v in partial.variants}
    assert set(variants) == {"fp32", "int8-static", "pruned-50"}
    assert not variants["pruned-50"].accepted and "not made: torch-pruning cannot prune" in variants["pruned-50"].note
    assert partial.best == "int8-static" or variants["int8-static"].note  # int8 made; best unless slower than fp32
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(partial.run_id).info.status == "FINISHED"
    assert _variant_runs(client, partial.run_id)["pruned-50"].info.status == "FAILED"
    assert "not made: torch-pruning cannot prune" in Path(partial.comparison_md).read_text()


def _variant_runs(client: MlflowClient, run_id: str) -> dict:
    return {
        r.data.tags["visionflow.variant"]: r
        for r in client.search_runs(
            [client.get_run(run_id).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`visionflow.stage` = 'optimize'",
        )
    }


def _comparison(md_path: str) -> dict[str, dict]:
    with (Path(md_path).parent / "comparison.csv").open(newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_each_variant_is_gated_on_its_accuracy_against_the_fp32_reference(compressed):
    params, result = compressed
    rows = _comparison(result.comparison)
    runs = _variant_runs(MlflowClient(tracking.tracking_uri()), result.run_id)
    reference = float(rows["fp32"]["accuracy"])
    # The fp32 ONNX reference is the trained model on the same test split: the pipeline's own figure.
    assert reference == pytest.approx(result.metrics["test/accuracy"])
    for name, row in rows.items():
        accuracy = runs[name].data.metrics["accuracy"]  # what the variant's own run measured
        assert float(row["accuracy"]) == pytest.approx(accuracy)
        assert float(row["accuracy_drop"]) == pytest.approx(reference - accuracy)
        assert row["accepted"] == str(reference - accuracy <= TOLERANCE + 1e-9), row
    # int8 of this small CNN keeps its predictions (within one test image): it is accepted and named in the bundle
    assert reference - float(rows["int8-static"]["accuracy"]) <= TOLERANCE
    assert rows[result.best_variant]["accepted"] == "True"


def test_the_accepted_int8_model_enters_the_bundle(compressed):
    _, result = compressed
    bundle = Path(result.bundle).with_suffix("").with_suffix("")
    contents = verify_bundle(bundle)
    assert "model.int8.onnx" in contents["files"]
    int8_artifact = Path(_comparison(result.comparison)["int8-static"]["artifact"])
    assert (
        hashlib.sha256((bundle / "model.int8.onnx").read_bytes()).hexdigest()
        == hashlib.sha256(int8_artifact.read_bytes()).hexdigest()
    )
    names = {Path(a.path).name for a in MlflowClient(tracking.tracking_uri()).list_artifacts(result.run_id, "bundle")}
    assert "model.int8.onnx" in names


def test_pruned_model_is_really_smaller(compressed):
    _, result = compressed
    client = MlflowClient(tracking.tracking_uri())
    runs = {
        r.data.tags["visionflow.variant"]: r
        for r in client.search_runs(
            [client.get_run(result.run_id).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{result.run_id}' and tags.`visionflow.stage` = 'optimize'",
        )
    }
    assert runs["pruned-50"].data.metrics["params"] < 0.8 * runs["fp32"].data.metrics["params"]
    assert runs["int8-static"].data.metrics["size_bytes"] < runs["fp32"].data.metrics["size_bytes"]
    assert runs["student-cnn-distilled"].data.metrics["params"] < runs["fp32"].data.metrics["params"]
    # MACs are counted for the reference and the students too, so the table compares them with pruning.
    assert runs["pruned-50"].data.metrics["macs"] < 0.8 * runs["fp32"].data.metrics["macs"]
    assert runs["student-cnn-distilled"].data.metrics["macs"] < runs["fp32"].data.metrics["macs"]
    assert "macs" not in runs["int8-static"].data.metrics


def test_optimize_alone_from_a_finished_run_and_bad_ratio(compressed):
    _, result = compressed
    alone = optimize_from_run(
        result.run_id,
        [
            "optimize.latency_repeats=3",
            "optimize.distill.enabled=false",
            "optimize.prune.enabled=false",
            "optimize.prune.unstructured_amount=0",
            "optimize.quantize.dynamic=false",
        ],
    )
    assert [v.name for v in alone.variants] == ["fp32", "int8-static"]
    assert MlflowClient(tracking.tracking_uri()).get_run(alone.run_id).info.status == "FINISHED"
    table = Path(alone.comparison_md).read_text()
    assert "fp32" in table and "int8-static" in table and "pruned" not in table
    from components.config import ParamsError

    with pytest.raises(ParamsError, match="optimize.prune.ratio"):
        optimize_from_run(result.run_id, ["optimize.prune.ratio=1.5"])
