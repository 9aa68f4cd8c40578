"""Run comparison: grid expansion, differing params, the plot, and run listing from a real MLflow store."""

from __future__ import annotations

import uuid

import pytest
from PIL import Image

from components import tracking
from components.comparison import comparison_plot, grid_combinations, metric_columns, varying_params
from components.errors import VisionflowError


def test_grid_is_the_cartesian_product():
    combos = grid_combinations(["train.optimizer=sgd,adam", "model.name=cnn,resnet18,vit"])
    assert len(combos) == 6
    assert ["train.optimizer=sgd", "model.name=cnn"] in combos
    assert ["train.optimizer=adam", "model.name=vit"] in combos


def test_grid_values_split_outside_brackets():
    assert grid_combinations(["augment.mean=[0.5],[0.4]"]) == [["augment.mean=[0.5]"], ["augment.mean=[0.4]"]]


@pytest.mark.parametrize("bad", ["train.optimizer", "=sgd", "train.lr="])
def test_malformed_grid_is_refused(bad):
    with pytest.raises(ValueError):
        grid_combinations([bad])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        grid_combinations(["train.lr=0.1", "train.lr=0.2"])


def _run(name, params, metrics):
    return {
        "run_id": uuid.uuid4().hex,
        "run_name": name,
        "status": "FINISHED",
        "duration_s": 3.0,
        "params": params,
        "metrics": metrics,
        "tags": {},
    }


def test_varying_params_leave_out_equal_and_run_params():
    runs = [
        _run(
            "a",
            {"model.name": "cnn", "train.lr": "0.1", "train.seed": "0", "run.run_name": "a"},
            {"test/accuracy": 0.9},
        ),
        _run(
            "b",
            {"model.name": "vit", "train.lr": "0.1", "train.seed": "0", "run.run_name": "b"},
            {"test/accuracy": 0.8},
        ),
    ]
    assert varying_params(runs) == ["model.name"]
    assert metric_columns(runs, "train/loss") == ["train/loss", "test/accuracy"]


def test_comparison_plot_is_an_image(tmp_path):
    runs = [
        _run("a", {"model.name": "cnn"}, {"test/accuracy": 0.9}),
        _run("b", {"model.name": "vit"}, {"test/accuracy": 0.8}),
    ]
    path = comparison_plot(runs, "test/accuracy", tmp_path / "cmp.png")
    with Image.open(path) as image:
        assert image.size[0] > 100


def test_recent_runs_newest_first_top_level_and_tag_filter():
    experiment = f"cmp-{uuid.uuid4().hex[:8]}"
    first = tracking.start_run(experiment, "first", {"visionflow.sweep": "s1"})
    tracking.log_metrics(first, {"test/accuracy": 0.5})
    tracking.end_run(first)
    second = tracking.start_run(experiment, "second", {"visionflow.sweep": "s2"})
    child = tracking.start_run(experiment, "train", {}, parent_run_id=second)
    tracking.end_run(child)
    tracking.end_run(second, "FAILED")
    runs = tracking.recent_runs(experiment, 10)
    assert [r["run_id"] for r in runs] == [second, first]
    assert runs[0]["status"] == "FAILED" and runs[1]["metrics"]["test/accuracy"] == 0.5
    assert [r["run_id"] for r in tracking.recent_runs(experiment, 10, tag=("visionflow.sweep", "s1"))] == [first]
    assert len(tracking.recent_runs(experiment, 1)) == 1


def test_unknown_experiment_is_one_clear_error():
    with pytest.raises(VisionflowError, match="no MLflow experiment 'nope-"):
        tracking.recent_runs(f"nope-{uuid.uuid4().hex[:6]}", 5)


def test_run_link_names_the_run():
    run_id = tracking.start_run(f"link-{uuid.uuid4().hex[:6]}", "x", {})
    tracking.end_run(run_id)
    link = tracking.run_link(run_id)
    assert run_id in link and "mlflow ui --backend-store-uri sqlite:///" in link
