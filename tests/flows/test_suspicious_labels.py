"""The pipeline's train stage ranks suspicious labels: the CSV and the grid in the run folder and in MLflow."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components import tracking
from components.data.ingest import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_train_run_has_the_suspicious_labels_ranking(shapes_run):
    params, result = shapes_run
    client = MlflowClient(tracking.tracking_uri())
    logged = {Path(a.path).name for a in client.list_artifacts(result.train_run_id, "suspicious_labels")}
    assert logged == {"suspicious_labels.csv", "suspicious_labels.png"}
    assert "train/suspicious_labels" in client.get_run(result.train_run_id).data.metrics
    written = Path(result.run_dir) / "train" / "suspicious_labels.csv"
    ranked = list(csv.DictReader(written.read_text().splitlines()))
    manifest = read_manifest(str(Path(result.run_dir) / "data" / "manifest.clean.csv"))
    train = {row["path"]: row["label"] for row in manifest if row["split"] == "train"}
    assert len(ranked) == min(params.train.suspicious_top_k, len(train))
    assert [int(row["rank"]) for row in ranked] == list(range(1, len(ranked) + 1))
    assert all(train[row["path"]] == row["given_label"] for row in ranked)  # training images, their own labels
    scores = [float(row["score"]) for row in ranked]
    assert scores == sorted(scores)  # lowest area under the margin first
