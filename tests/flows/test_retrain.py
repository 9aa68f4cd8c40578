"""The retrain flow's outcomes on real Prefect and a real MLflow registry: promoted, no new data, kept."""

from __future__ import annotations

import shutil

import pytest
from prefect.artifacts import Artifact

from components import tracking
from components.config import load_params
from flows.cli import app
from flows.retrain import retrain
from tests.helpers.params import tiny_overrides
from tests.helpers.shapes import CLASSES, make_shapes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_retrain_promotes_then_finds_no_new_data_then_keeps_a_worse_challenger(tmp_path, shapes_dir):
    """One data folder through its life: first model, nothing new, `retrain --force`, images added."""
    from typer.testing import CliRunner

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    params = load_params(None, tiny_overrides(tmp_path, data, train__max_epochs=4))
    name = params.package.model_name

    first = retrain(params, return_state=True)
    result = first.result()
    assert first.name == "Promoted" and result.outcome == "promoted"
    assert result.champion_accuracy is None and result.challenger_accuracy >= 11 / 12 - 1e-9  # 12 test images
    champion = tracking.alias_version(name, tracking.CHAMPION)
    assert champion.tags["visionflow.data_fingerprint"] == result.data_fingerprint
    assert tracking.get_run(result.run_id).data.tags["visionflow.retrain.outcome"] == "promoted"

    again = retrain(params, return_state=True)
    assert again.name == "NoNewData" and again.result().outcome == "no_new_data"
    assert str(tracking.alias_version(name, tracking.CHAMPION).version) == str(champion.version)
    check_run = tracking.get_run(again.result().run_id)
    assert check_run.data.tags["visionflow.retrain.outcome"] == "no_new_data"

    worse_overrides = tiny_overrides(
        tmp_path,
        data,
        train__max_epochs=1,
        train__lr=1e-6,
        package__model_name=name,
        run__experiment=params.run.experiment,
    )
    forced = CliRunner().invoke(
        app, ["retrain", "--force", *[a for o in worse_overrides for a in ("--set", o)]], env={"COLUMNS": "200"}
    )
    assert forced.exit_code == 0, forced.output
    assert "visionflow retrain: kept" in forced.output  # unchanged data, trained anyway; a 1-epoch model loses
    versions = tracking.client().search_model_versions(f"name='{name}'")
    assert len(versions) == 2 and str(tracking.alias_version(name, tracking.CHAMPION).version) == str(champion.version)

    make_shapes(tmp_path / "new-shapes", per_class=4, seed=7, bad_files=False)
    for kind in CLASSES:  # newly labelled images added to the same class folders
        for image in (tmp_path / "new-shapes" / kind).iterdir():
            shutil.copy(image, data / kind / f"new_{image.name}")
    worse = load_params(None, worse_overrides)
    kept = retrain(worse, return_state=True)
    outcome = kept.result()
    assert kept.name == "KeptChampion" and outcome.outcome == "kept"
    assert outcome.data_fingerprint != result.data_fingerprint  # the added images are new data
    assert tracking.get_run(outcome.run_id).data.metrics["data/num_images"] == 3 * 24 + 2 + 3 * 4
    assert outcome.champion_accuracy is not None and outcome.challenger_accuracy is not None
    assert str(tracking.alias_version(name, tracking.CHAMPION).version) == str(champion.version)
    assert str(tracking.alias_version(name, tracking.CHALLENGER).version) != str(champion.version)
    decision = Artifact.get("retrain-decision")
    assert decision is not None and "kept" in decision.data and f"{outcome.champion_accuracy:.4f}" in decision.data
