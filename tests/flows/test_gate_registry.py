"""The registry gate on a real MLflow registry: a model of other classes registered under the same name is
not compared with the champion (whose accuracy on the new labels is meaningless), the champion stays."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from mlflow import MlflowClient

from components import tracking
from components.config import load_params
from flows.package import promote_version
from flows.pipeline import pipeline
from tests.helpers.digits_bundle import digits_bundle
from tests.helpers.params import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _register_digits_champion(name: str) -> str:
    """Version 1 of `name`: the digits bundle (labels 0-9, input 1x8x8), logged and registered like a package stage."""
    bundle = digits_bundle()
    run_id = tracking.start_run(f"gate-{uuid.uuid4().hex[:8]}", "digits", {})
    tracking.log_artifacts(run_id, sorted(bundle.iterdir()), "bundle")
    version = tracking.register_onnx(run_id, bundle / "model.onnx", name, np.zeros((1, 1, 8, 8), np.float32), {})
    tracking.end_run(run_id)
    tracking.set_alias(name, tracking.CHAMPION, version, "digits champion")
    return version


def test_a_model_of_other_classes_is_registered_but_never_compared_with_the_champion(tmp_path, shapes_dir):
    params = load_params(None, tiny_overrides(tmp_path, shapes_dir, train__max_epochs=1))
    name = params.package.model_name
    assert _register_digits_champion(name) == "1"

    result = pipeline(params)  # shapes: circle, square, triangle at 1x16x16

    assert result.model_version == f"{name} v2" and result.promoted is False
    assert result.registry_decision.startswith(
        "not compared with champion version 1: the labels differ (only the champion has: 0, 1, 2, 3, 4, 5 (+4 more); "
        "only this version has: circle, square, triangle); the champion is unchanged."
    )
    assert result.registry_decision.endswith(f"visionflow promote 2 --name {name}")
    assert str(tracking.alias_version(name, tracking.CHAMPION).version) == "1"
    assert str(tracking.alias_version(name, tracking.CHALLENGER).version) == "2"
    run = MlflowClient(tracking.tracking_uri()).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["registry/compared"] == 0.0 and run.data.metrics["registry/promoted"] == 0.0
    assert "registry/champion_accuracy" not in run.data.metrics
    assert run.data.tags["visionflow.gate"] == result.registry_decision
    assert "version 2 is now champion" in promote_version(name, "2")  # the way forward the reason names
