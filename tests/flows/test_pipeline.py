"""The whole pipeline flow on generated shapes: real Prefect, real MLflow, real Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components import tracking
from components.config import load_params
from components.errors import StageError
from flows.evaluate import evaluate_flow
from flows.pipeline import pipeline
from tests.helpers.params import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _children(client: MlflowClient, parent) -> dict[str, object]:
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    return {r.data.tags[tracking.STAGE_TAG]: r for r in runs}


def _artifacts(client: MlflowClient, run_id: str, path: str) -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, path)}


@pytest.fixture(scope="module")
def finished_run(shapes_run):
    """The session's shared 4-epoch run on the shapes (tests/flows/conftest.py)."""
    return shapes_run


def test_pipeline_tracks_everything_in_mlflow(finished_run):
    params, result = finished_run
    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_epochs"] == "4"
    assert parent.data.params["augment.image_size"] == "16"
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.metrics["data/num_quarantined"] == 2
    assert parent.data.metrics["test/accuracy"] == result.metrics["test/accuracy"]
    assert {"data/num_images", "test/macro_f1", "test/ece", "test/top3_accuracy"} <= set(parent.data.metrics)
    assert {"validation.json", "quarantine.csv", "manifest.clean.csv"} <= _artifacts(client, parent.info.run_id, "data")
    assert {"augmentation_preview.png", "transforms.json"} <= _artifacts(client, parent.info.run_id, "augment")
    assert "confusion_matrix.png" in _artifacts(client, parent.info.run_id, "evaluation")
    contexts = {i.tags[0].value for i in parent.inputs.dataset_inputs}
    assert contexts == {"train", "val", "test"}
    for stage in (
        "ingest",
        "validate",
        "augment",
        "train",
        "evaluate",
        "package",
    ):  # wall time and peak memory per stage
        assert (
            parent.data.metrics[f"stage/{stage}/seconds"] > 0 and parent.data.metrics[f"stage/{stage}/peak_rss_mb"] > 50
        )
    # the training process is a child of the flow process: its memory counts in the train stage's peak
    assert parent.data.metrics["stage/train/peak_rss_mb"] > parent.data.metrics["stage/ingest/peak_rss_mb"]

    # the stages of the pipeline itself (later commands on this shared run, e.g. package --from-run, add theirs)
    children = {k: r for k, r in _children(client, parent).items() if r.info.start_time <= parent.info.end_time}
    assert set(children) == {"train", "evaluate"}
    train = children["train"]
    assert train.info.status == "FINISHED"
    history = client.get_metric_history(train.info.run_id, "val/acc")
    assert len(history) == 4  # one value per epoch, logged once (rank zero only)
    assert "train/loss" in train.data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(train.data.metrics)
    assert "best.ckpt" in _artifacts(client, train.info.run_id, "checkpoints")
    evaluate = children["evaluate"]
    assert evaluate.info.status == "FINISHED"
    assert {"metrics.json", "per_class.csv", "confusion_matrix.csv", "predictions.csv"} <= _artifacts(
        client, evaluate.info.run_id, "evaluation"
    )


def test_pipeline_result_and_run_directory(finished_run):
    params, result = finished_run
    run_dir = Path(result.run_dir)
    assert run_dir.parent == Path(params.run.output_dir).resolve()
    saved = load_params(run_dir / "params.yaml")  # what resume reads: the given params, `auto` values resolved
    assert (saved.data.path, saved.run.experiment, saved.train.max_epochs) == (
        params.data.path,
        params.run.experiment,
        4,
    )
    assert json.loads((run_dir / "result.json").read_text())["run_id"] == result.run_id
    assert sorted(result.quarantined)[0].endswith("empty file")
    assert sum(result.split_counts.values()) == 3 * 24  # the two bad files are quarantined, nothing else lost
    # Three shapes in three colours: 4 epochs classify all 12 test images (seeds 1, 2, 3, 7 measured); one
    # miss is allowed.
    assert result.split_counts["test"] == 12 and result.metrics["test/accuracy"] >= 11 / 12 - 1e-9
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert metrics["summary"]["accuracy"] == result.metrics["test/accuracy"]


def test_training_decoded_through_the_image_cache_and_logged_its_batch(finished_run):
    params, result = finished_run
    from components.data.augment import eval_resize_side

    side = eval_resize_side(load_params(Path(result.run_dir) / "params.yaml").augment)  # the resolved eval resize
    caches = sorted(p.name for p in (Path(params.run.cache_dir) / "images").iterdir())
    suffixes = (f"-{side}x{side}x3.u8", f"-{side}x{side}x3.json")
    assert len(caches) == 4 and all(name.endswith(suffixes) for name in caches)  # train, val
    client = MlflowClient(tracking.tracking_uri())
    train = _children(client, client.get_run(result.run_id))["train"]
    assert train.data.params["trainer.effective_batch_size"] == str(params.train.batch_size)
    assert train.data.metrics["perf/train_images_per_sec"] > 0


def test_evaluate_flow_on_another_data_set(finished_run, tmp_path):
    from tests.helpers.shapes import make_shapes

    params, result = finished_run
    other = make_shapes(tmp_path / "other", per_class=6, bad_files=False, seed=5)
    evaluation = evaluate_flow(
        result.checkpoint,
        params.data.model_copy(update={"path": str(other)}),
        "all",
        experiment=params.run.experiment,
        output_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
    )
    assert evaluation.num_images == 18
    run = MlflowClient(tracking.tracking_uri()).get_run(evaluation.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] == evaluation.metrics["test/accuracy"]


def test_ingest_is_a_cache_hit_on_the_same_files_and_a_miss_when_a_file_is_added(tmp_path):
    """Two flow runs on unchanged files: the second takes the first's snapshot from Prefect's cache; one
    image more and the source is ingested again."""
    from prefect import flow

    from flows.tasks import ingest_task
    from tests.helpers.shapes import make_shapes

    data_dir = make_shapes(tmp_path / "data", per_class=4, bad_files=False)
    params = load_params(None, tiny_overrides(tmp_path, data_dir))

    @flow(name="ingest-once")
    def ingest_once() -> tuple[str, int, str]:
        state = ingest_task(params.data, params.run.cache_dir, return_state=True)
        snapshot = state.result()
        return state.name, snapshot.num_images, snapshot.manifest_path

    first, again = ingest_once(), ingest_once()
    assert first[:2] == ("Completed", 12) and again == ("Cached", 12, first[2])
    make_shapes(tmp_path / "more", per_class=1, bad_files=False, seed=3)
    (tmp_path / "more" / "square" / "square_000.png").rename(data_dir / "square" / "square_added.png")
    added = ingest_once()
    assert added[:2] == ("Completed", 13) and added[2] != first[2]


def test_nan_loss_fails_the_run_and_names_the_stage(tmp_path, shapes_dir):
    params = load_params(None, tiny_overrides(tmp_path, shapes_dir, train__lr=1e30, train__warmup_epochs=0))
    with pytest.raises(StageError, match="stage train failed: loss became"):
        pipeline(params)
    client = MlflowClient(tracking.tracking_uri())
    (parent,) = client.search_runs(
        [client.get_experiment_by_name(params.run.experiment).experiment_id],
        filter_string="tags.`mlflow.parentRunId` IS NULL",
    )
    assert parent.info.status == "FAILED"
    assert parent.data.tags[tracking.FAILED_STAGE_TAG] == "train"
    assert _children(client, parent)["train"].info.status == "FAILED"


def test_bad_data_path_fails_at_ingest(tmp_path):
    params = load_params(None, tiny_overrides(tmp_path, tmp_path / "does-not-exist"))
    with pytest.raises(StageError, match="stage ingest failed"):
        pipeline(params)
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(params.run.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags[tracking.FAILED_STAGE_TAG] == "ingest"


def test_multitask_from_a_csv_manifest_logs_every_task(tmp_path, shapes_dir):
    import csv

    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "family"])
        for image in sorted(shapes_dir.glob("*/*_*.png")):
            writer.writerow([image, image.parent.name, "round" if image.parent.name == "circle" else "angular"])
    params = load_params(
        None,
        tiny_overrides(
            tmp_path,
            manifest,
            multitask__mode="shared_weights",
            multitask__tasks="[family]",
        ),
    )
    result = pipeline(params)
    client = MlflowClient(tracking.tracking_uri())
    children = _children(client, client.get_run(result.run_id))
    assert "val/family/acc" in children["train"].data.metrics
    assert "train/family/loss" in children["train"].data.metrics
    assert {"test/family/accuracy", "test/family/macro_f1"} <= set(children["evaluate"].data.metrics)
    assert "test/family/accuracy" in result.metrics
