"""The compression stage in the pipeline and alone: every variant measured, gated and compared."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from components import tracking
from components.config import load_params
from flows.optimize import optimize_from_run
from flows.pipeline import pipeline
from tests.flows.conftest import tiny_overrides

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
    optimize__tolerance=1.0,
)


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
    from components.config import ParamsError

    with pytest.raises(ParamsError, match="optimize.prune.ratio"):
        optimize_from_run(result.run_id, ["optimize.prune.ratio=1.5"])
