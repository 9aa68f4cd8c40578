"""Flow tests run real Prefect (one test harness per session) and a real MLflow store in a temp dir."""

from __future__ import annotations

import uuid

import pytest

from components.config import load_params
from tests.helpers.shapes import make_shapes


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for the whole session (~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A generated 3-class ImageFolder with two bad files (shared, never modified by tests)."""
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def tiny_overrides(tmp_path, data_path, **extra) -> list[str]:
    """Overrides for a fast run on the shapes data; `extra` adds more (dots as __)."""
    base = {
        "data.path": str(data_path),
        "augment.image_size": 16,
        "augment.preview_images": 8,
        "augment.rotate_p": 0.0,
        "train.max_epochs": 3,
        "train.batch_size": 16,
        "train.lr": 0.005,
        "train.progress_bar": False,
        "trainer.accelerator": "cpu",
        "run.experiment": f"test-{uuid.uuid4().hex[:8]}",
        "package.model_name": f"test-model-{uuid.uuid4().hex[:8]}",
        "run.output_dir": str(tmp_path / "runs"),
        "run.cache_dir": str(tmp_path / "cache"),
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory, shapes_dir, prefect_harness):
    """One finished 4-epoch pipeline run on the shapes (packaged and registered as version 1 of its own model),
    shared by the modules that read it or run commands on it: (params, PipelineResult). Tests must leave its
    files and its run.cache_dir as they are (give commands their own output and cache folders)."""
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("shapes-run")
    params = load_params(None, tiny_overrides(tmp, shapes_dir, train__max_epochs=4))
    return params, pipeline(params)


@pytest.fixture
def tiny_params(tmp_path, shapes_dir):
    """PipelineParams for a 3-epoch run on the shapes data in tmp_path."""
    return load_params(None, tiny_overrides(tmp_path, shapes_dir))
