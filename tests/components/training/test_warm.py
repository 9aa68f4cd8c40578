"""The waiting training process imports, before its spec arrives, what training then needs."""

import builtins

import pytest

from components.training.warm import preload


def _imported_by_preload(monkeypatch) -> set[str]:
    """The module names preload's import statements ask for (a module already imported is asked for too)."""
    asked, real = set(), builtins.__import__

    def recording(name, globals=None, locals=None, fromlist=(), level=0):
        asked.add(name)
        return real(name, globals, locals, fromlist, level)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "__import__", recording)
        preload()
    return asked


@pytest.mark.parametrize(("uri", "expected"), [("sqlite:///{tmp}/mlflow.db", True), ("http://127.0.0.1:9", False)])
def test_preload_imports_the_database_store_the_mlflow_logger_opens(tmp_path, monkeypatch, uri, expected):
    """With a database tracking URI the logger opens MLflow's SQL store at the first epoch; its imports (about 1 s)
    belong to the wait, not to the train stage. A tracking server needs none of it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    assert ("mlflow.store.tracking.sqlalchemy_store" in _imported_by_preload(monkeypatch)) is expected
