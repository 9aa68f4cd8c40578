"""Flow tests run real Prefect (one test harness per session) and a real MLflow store in a temp dir."""

from __future__ import annotations

import pytest

from components.config import load_params
from tests.helpers.params import tiny_overrides
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
