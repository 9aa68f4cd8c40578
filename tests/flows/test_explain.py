"""Explanations of the session's shared shapes run: the grid its evaluation logged, `visionflow explain --run` on
image files, and the one-line refusals (a run without checkpoint, an unreadable image, --run with --checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components import tracking
from flows.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _invoke(*args: str, columns: int = 250):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})


def _assert_one_line_error(out, expected: str) -> None:
    assert out.exit_code == 2, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert "Traceback" not in out.output


def test_the_pipeline_evaluation_logs_its_explanation_grid(shapes_run):
    _, result = shapes_run
    grid = Path(result.run_dir) / "evaluation" / "explanations.png"
    assert grid.is_file() and grid.stat().st_size > 5000
    client = tracking.client()
    assert "evaluation/explanations.png" in [
        a.path for a in client.list_artifacts(result.evaluate_run_id, "evaluation")
    ]
    params = tracking.get_run(result.evaluate_run_id).data.params
    assert (params["evaluate.explain"], params["evaluate.explain_method"]) == ("True", "auto")


def test_explain_command_writes_one_png_per_image(shapes_run, shapes_dir, tmp_path):
    _, result = shapes_run
    images = [str(shapes_dir / "circle" / "circle_000.png"), str(shapes_dir / "square" / "square_001.png")]
    out = _invoke("explain", "--run", result.run_id, "--out", str(tmp_path / "png"), *images, columns=80)
    assert out.exit_code == 0, out.output
    written = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert written == ["circle_000.explain.png", "square_001.explain.png"]
    assert all((tmp_path / "png" / name).stat().st_size > 3000 for name in written)
    assert "circle_000.explain.png" in out.stdout and "(" in out.stdout  # predicted class (confidence) -> png
    # each path is whole on its line (longer than the 80 columns of a pipe): it copies as it is
    png = tmp_path / "png" / "circle_000.explain.png"
    assert len(f"{images[0]} -> {png}") > 80
    assert any(line.endswith(f"{images[0]} -> {png}") for line in out.stdout.splitlines()), out.stdout


def test_explain_of_a_run_uses_the_temperature_its_evaluation_fitted(shapes_run):
    from components.evaluation.results import read_calibration
    from flows.explain import checkpoint_of_run

    _, result = shapes_run
    checkpoint, temperature = checkpoint_of_run(result.run_id)
    fitted = read_calibration(Path(result.run_dir) / "evaluation")
    assert Path(checkpoint).name == "best.ckpt" and fitted is not None and temperature == fitted.temperature


def test_explain_command_refuses_bad_input_in_one_line(shapes_run, shapes_dir, tmp_path):
    params, result = shapes_run
    image = str(shapes_dir / "circle" / "circle_000.png")
    unreadable = str(shapes_dir / "circle" / "notes.png")  # a text file named .png
    out = _invoke("explain", "--checkpoint", result.checkpoint, "--out", str(tmp_path / "a"), image, unreadable)
    _assert_one_line_error(out, "notes.png: not an image")
    assert not (tmp_path / "a").exists()

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"checkpoint": str(tmp_path / "gone.ckpt")}))
    no_checkpoint = tracking.start_run(params.run.experiment, "no-checkpoint", {tracking.RUN_DIR_TAG: str(run_dir)})
    tracking.end_run(no_checkpoint)
    _assert_one_line_error(_invoke("explain", "--run", no_checkpoint, image), "has no checkpoint to explain")

    both = _invoke("explain", "--run", result.run_id, "--checkpoint", result.checkpoint, image)
    _assert_one_line_error(both, "exactly one of --run RUN_ID or --checkpoint CKPT")
    _assert_one_line_error(_invoke("explain", "--run", result.run_id), "at least one image")


def test_explain_in_its_own_process_starts_no_prefect_server(shapes_run, shapes_dir, tmp_path):
    """explain runs no flow: as a command of its own it must not start Prefect's temporary server."""
    _, result = shapes_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    image = str(shapes_dir / "circle" / "circle_000.png")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "explain", "--checkpoint", result.checkpoint, "--out", "png", image],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "png" / "circle_000.explain.png").is_file()
    log = "".join(p.read_text() for p in (tmp_path / ".visionflow" / "logs").glob("*.log"))
    assert "temporary server" not in done.stdout + done.stderr + log
