"""What a user sees on an 80-column terminal (real `visionflow` subprocesses, real Prefect and MLflow): a mistake is
one line on stderr with its traceback in the log file, an unwritable place is named before anything starts,
third-party noise goes to the log file only, and tables and links fit the terminal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from components import tracking
from tests.helpers.params import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
NOISE = (
    "litlogger",  # Lightning's cloud-logger tip
    "LeafSpec",  # torch pytree deprecation inside Lightning
    "can be interpreted in multiple ways",  # MLflow data set source warning
    "CUDAExecutionProvider",  # onnxruntime CPU build asked for CUDA
    "Created version '1' of model",  # MLflow's print on registering (the pipeline says it in its own line)
    "Successfully registered model",
)


def _visionflow(*args: str, cwd: Path, timeout: int = 300, **env: str | None) -> subprocess.CompletedProcess:
    environ = dict(os.environ, COLUMNS="80", PYTHONPATH=str(REPO))
    environ.pop("VISIONFLOW_LOG_DIR", None)
    for key, value in env.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=environ,
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _log_text(cwd: Path) -> str:
    logs = sorted((cwd / ".visionflow" / "logs").glob("*.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


def test_a_data_mistake_is_one_line_on_stderr_and_its_traceback_is_in_the_log(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)  # a class folder with no image: ingest is the one to tell
    out = _visionflow("run", "--set", f"data.path={tmp_path / 'empty'}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert len(_lines(out.stderr)) == 1, out.stderr
    assert out.stderr.startswith("error: stage ingest failed: no images found in")
    assert "Traceback" not in out.stdout
    log = _log_text(tmp_path)
    assert "Traceback" in log and "DataError: no images found" in log


@pytest.mark.slow
def test_verbose_shows_the_traceback_on_the_terminal(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)  # a class folder with no image: ingest is the one to tell
    out = _visionflow("--verbose", "run", "--set", f"data.path={tmp_path / 'empty'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" in out.stdout + out.stderr
    assert _lines(out.stderr)[-1].startswith("error: stage ingest failed: no images found in")


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder nobody can create files in: a 0o555 folder, or /proc where permission bits do not stop the
    test's user (root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()
    return Path("/proc")


def test_a_read_only_working_folder_is_named_in_one_line_before_anything_starts(tmp_path):
    folder = _unwritable_folder(tmp_path)
    try:
        out = _visionflow("run", cwd=folder, timeout=120, MLFLOW_TRACKING_URI=None)
    finally:
        (tmp_path / "read-only").chmod(0o755)
    assert out.returncode == 2, out.stderr
    assert len(_lines(out.stderr)) == 1, out.stderr
    assert "cannot write to the MLflow store" in out.stderr and f"{folder} is not writable" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert "Starting temporary server" not in out.stdout  # checked before the Prefect server started


def test_a_runs_folder_under_a_file_is_named_in_one_line(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder is expected\n")
    out = _visionflow("run", "--set", f"run.output_dir={blocker / 'runs'}", cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert _lines(out.stderr) == [
        f"error: cannot write to the runs folder (run.output_dir) {blocker / 'runs'}: {blocker} is a file, not a folder"
    ]


def test_runs_fits_80_columns_with_every_link_whole(monkeypatch):
    store = Path(tempfile.mkdtemp(prefix="vf"))  # short, so the MLflow UI command fits 80 columns too
    try:
        uri = f"sqlite:///{store / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        made = []
        for experiment, status in (("visionflow-digits", "FINISHED"), ("a-rather-long-experiment-name-" * 2, "FAILED")):
            flow_run_url = f"http://127.0.0.1:4200/runs/flow-run/{uuid.uuid4()}"
            run_id = tracking.start_run(experiment, "judicious-bird-123", {"prefect.flow_run_url": flow_run_url})
            tracking.log_metrics(run_id, {"test/accuracy": 0.9875})
            tracking.end_run(run_id, status)
            made.append((run_id, flow_run_url))
        out = _visionflow("runs", cwd=store, MLFLOW_TRACKING_URI=uri)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line for line in lines if len(line) > 80] == []
    stripped = {line.strip() for line in lines}
    for run_id, flow_run_url in made:
        assert flow_run_url in stripped
        assert f"MLflow run {run_id}" in stripped
        assert any(line.startswith(run_id[:8]) and "0.9875" in line for line in lines)
    assert f"mlflow ui --backend-store-uri {uri}" in stripped


@pytest.mark.slow
def test_a_run_shows_progress_and_results_and_keeps_third_party_noise_in_the_log(tmp_path, shapes_dir):
    overrides = tiny_overrides(tmp_path, shapes_dir, train__max_epochs=1)
    out = _visionflow("run", *[arg for o in overrides for arg in ("--set", o)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    terminal = out.stdout + out.stderr
    assert [noise for noise in NOISE if noise in terminal] == []
    log = _log_text(tmp_path)
    assert "can be interpreted in multiple ways" in log and "litlogger" in log  # kept, in the log file
    assert "Created version '1' of model" in log
    assert "ingested" in out.stdout and "epoch 1/1" in out.stdout  # progress the user needs
    table = [line for line in out.stdout.splitlines() if line[:1] in "┌│├└"]
    assert table and all(len(line) <= 80 for line in table)
    assert (Path(_place(out.stdout, "run directory")) / "params.yaml").is_file()  # whole, not cut at the edge
    assert Path(_place(out.stdout, "best checkpoint")).is_file()


def _place(stdout: str, label: str) -> str:
    """The path printed for `label`: on its line ("label: path") or alone on the next one."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{label}:"))
    return lines[at].split(":", 1)[1].strip() or lines[at + 1].strip()


@pytest.mark.slow
def test_evaluate_on_classes_the_model_lacks_is_one_line(tmp_path, shapes_run, shapes_dir):
    _, result = shapes_run
    other = tmp_path / "other"
    for label, source in (("cat", "circle"), ("dog", "square")):
        (other / label).mkdir(parents=True)
        for image in sorted((shapes_dir / source).glob(f"{source}_00*.png")):
            shutil.copy(image, other / label / image.name)
    out = _visionflow(
        "evaluate",
        "--checkpoint",
        result.checkpoint,
        "--data",
        str(other),
        "--set",
        f"run.cache_dir={tmp_path / 'c'}",
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert len(_lines(out.stderr)) == 1, out.stderr
    assert "classes the model does not know: cat, dog" in out.stderr
    assert "Traceback" not in out.stdout and "Traceback" in _log_text(tmp_path)
