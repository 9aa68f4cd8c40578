"""The terminal rules (components.quiet) and the writable check (components.writable) on real files and loggers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from components.errors import VisionflowError
from components.quiet import TerminalFilter, is_noise, route_output
from components.writable import NotWritableError, check_writable, local_store_path, places_to_check, why_not_writable


def _record(name: str, level: int, message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord(name, level, __file__, 1, message, (), exc_info)


def test_the_terminal_filter_keeps_what_matters_and_drops_noise_and_failure_records():
    keep = TerminalFilter().filter
    assert keep(_record("prefect.task_runs", logging.INFO, "ingested 40 images in 2 classes"))
    assert keep(_record("py.warnings", logging.WARNING, "a warning the user can act on"))
    assert keep(_record("components.serving.app", logging.ERROR, "model failure on a batch"))
    assert not keep(
        _record("py.warnings", logging.WARNING, "UserWarning: dataset source can be interpreted in multiple ways")
    )
    assert not keep(_record("lightning.pytorch.utilities.rank_zero", logging.INFO, "GPU available: False, used: False"))
    assert not keep(_record("mlflow.store.db.utils", logging.INFO, "Creating initial MLflow database tables..."))
    assert not keep(_record("prefect.flow_runs", logging.ERROR, "Encountered exception", VisionflowError("x")))
    assert not keep(_record("prefect.flow_runs", logging.INFO, "Finished in state Failed('Flow run encountered…')"))
    assert keep(_record("prefect.flow_runs", logging.INFO, "Finished in state Completed()"))
    assert is_noise("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")


def test_route_output_writes_everything_to_the_file_and_only_what_matters_to_the_terminal(tmp_path):
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    terminal = tmp_path / "terminal.txt"
    log = tmp_path / "run.log"
    try:
        root.handlers = []
        with open(terminal, "w") as stream:
            route_output(log, terminal=stream)
            logging.getLogger("lightning.pytorch").info("GPU available: False, used: False")
            logging.getLogger("visionflow.test").warning("a warning that matters")
            import warnings

            warnings.warn("The specified dataset source can be interpreted in multiple ways", UserWarning, stacklevel=1)
            for handler in root.handlers:
                handler.flush()
    finally:
        for handler in root.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.close()
        root.handlers, root.level = saved
        logging.captureWarnings(False)
    shown, kept = terminal.read_text(), log.read_text()
    assert "a warning that matters" in shown and "GPU available" not in shown and "multiple ways" not in shown
    assert "a warning that matters" in kept and "GPU available" in kept and "multiple ways" in kept


def test_a_writable_place_passes_and_leaves_nothing_behind(tmp_path):
    check_writable(places_to_check(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs", tmp_path / "cache"))
    assert list(tmp_path.iterdir()) == []


def test_a_place_under_a_file_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotWritableError, match=f"runs folder .*{blocker}/runs: {blocker} is a file, not a folder"):
        check_writable(places_to_check(None, blocker / "runs"))


def test_a_folder_no_one_can_create_files_in_is_not_writable(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        target = folder if not os.access(folder, os.W_OK) else Path("/proc")  # root ignores permission bits
        assert why_not_writable(target / "mlflow.db").startswith(f"{target} is not writable")
    finally:
        folder.chmod(0o755)


def test_only_local_mlflow_stores_are_checked():
    assert local_store_path("sqlite:////data/mlflow.db") == Path("/data/mlflow.db")
    assert local_store_path("sqlite:///mlflow.db") == Path("mlflow.db")
    assert local_store_path("file:///data/mlruns") == Path("/data/mlruns")
    assert local_store_path("./mlruns") == Path("mlruns")
    for remote in ("http://127.0.0.1:5000", "https://mlflow.example", "postgresql://u@h/db", "databricks"):
        assert local_store_path(remote) is None
