"""The README's commands on the session's shared shapes run, as a user types them: `evaluate --checkpoint`,
`optimize --checkpoint`, `fit-spec`, `serve` with its options and a prediction log, `monitor` on the bundle
the pipeline produced, `python -m components.serving`, and Ctrl-C during `run`.

Real Prefect (the session harness for in-process commands, a temporary server for subprocesses), a real
MLflow store, real HTTP on loopback. Every command writes to its own folders: the shared run stays as it was.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from components import tracking
from components.monitoring.prediction_log import read_prediction_log
from components.training.fit import FitSpec
from flows.cli import app
from tests.helpers.params import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

CLASSES = ["circle", "square", "triangle"]


def _invoke(*args: str):
    """The CLI in-process (the session's Prefect harness), wide enough that rich never wraps a value."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def _own_folders(params, tmp_path: Path) -> list[str]:
    """--set options that send a command's MLflow runs to the shared run's experiment and its files to tmp_path."""
    sets = {
        "run.experiment": params.run.experiment,
        "run.output_dir": str(tmp_path / "runs"),
        "run.cache_dir": str(tmp_path / "cache"),
    }
    return [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]


def _row(output: str, name: str) -> str:
    """The value of one row of a summary table (`name   value`, with or without the table's borders)."""
    match = re.search(rf"^\s*{re.escape(name)}\s{{2,}}(.+?)\s*$", re.sub("[│┃|]", " ", output), re.MULTILINE)
    assert match, f"no row {name!r} in:\n{output}"
    return match.group(1)


def test_evaluate_command_on_the_test_split_reproduces_the_pipeline_figures(shapes_run, shapes_dir, tmp_path):
    """Same data, same data params: --split test is the pipeline's test split, so the figures are the same."""
    params, result = shapes_run
    out = _invoke(
        "evaluate",
        "--checkpoint",
        result.checkpoint,
        "--data",
        str(shapes_dir),
        "--split",
        "test",
        *_own_folders(params, tmp_path),
    )
    assert out.exit_code == 0, out.output
    assert int(_row(out.output, "images")) == result.split_counts["test"]
    assert float(_row(out.output, "accuracy")) == pytest.approx(result.metrics["test/accuracy"], abs=1e-4)
    assert _row(out.output, "quarantined files") == "2"  # the empty file and the text file named .png
    run = tracking.get_run(_row(out.output, "MLflow run"))
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] == pytest.approx(result.metrics["test/accuracy"])

    everything = _invoke(
        "evaluate", "--checkpoint", result.checkpoint, "--data", str(shapes_dir), *_own_folders(params, tmp_path)
    )
    assert everything.exit_code == 0 and int(_row(everything.output, "images")) == sum(result.split_counts.values())
    bad = _invoke("evaluate", "--checkpoint", result.checkpoint, "--data", str(shapes_dir), "--split", "holdout")
    assert bad.exit_code == 2 and "invalid --split 'holdout'" in bad.output and "Traceback" not in bad.output


def test_optimize_command_on_a_checkpoint_and_a_data_set(shapes_run, shapes_dir, tmp_path):
    params, result = shapes_run
    out = _invoke(
        "optimize",
        "--checkpoint",
        result.checkpoint,
        "--data",
        str(shapes_dir),
        "--set",
        "optimize.latency_repeats=3",
        "--set",
        "optimize.quantize.calibration_images=16",
        "--set",
        "optimize.tolerance=0.05",
        *_own_folders(params, tmp_path),
    )
    assert out.exit_code == 0, out.output
    lines = [line.split() for line in re.sub("[│┃|]", " ", out.output).splitlines()]
    rows = {cells[0]: cells for cells in lines if cells and cells[0] in ("fp32", "int8-static")}
    assert set(rows) == {"fp32", "int8-static"}, out.output
    fp32_accuracy, int8_accuracy = float(rows["fp32"][1]), float(rows["int8-static"][1])
    # The fp32 reference is the checkpoint measured on the same data set's test split: the pipeline's figure.
    assert fp32_accuracy == pytest.approx(result.metrics["test/accuracy"], abs=1e-4)
    assert fp32_accuracy - int8_accuracy <= 0.05 and rows["int8-static"][-1] == "yes"
    run_id = re.search(r"MLflow run:?\s+([0-9a-f]{32})", re.sub("[│┃|]", " ", out.output)).group(1)
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(run_id).info.status == "FINISHED"
    variants = client.search_runs(
        [client.get_run(run_id).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"
    )
    assert sorted(r.data.tags["visionflow.variant"] for r in variants) == ["fp32", "int8-static"]
    missing = _invoke("optimize", "--checkpoint", result.checkpoint)
    assert missing.exit_code == 2 and "--checkpoint needs --data" in missing.output


def test_fit_spec_command_prepares_a_launchable_training(shapes_run, shapes_dir, tmp_path):
    params, _ = shapes_run
    job = tmp_path / "job"
    overrides = tiny_overrides(tmp_path, shapes_dir, trainer__devices=2, trainer__strategy="ddp")
    out = _invoke("fit-spec", str(job), *[a for o in overrides for a in ("--set", o)])
    assert out.exit_code == 0, out.output
    spec = FitSpec.model_validate_json((job / "fit_spec.json").read_text())
    assert spec.classes == CLASSES and spec.params.trainer.devices == 2
    manifest = Path(spec.manifest_path).read_text().splitlines()
    assert len(manifest) == 1 + 3 * 24  # header + every good image; the two bad files were quarantined
    assert tracking.get_run(spec.mlflow_run_id).info.status == "RUNNING"  # opened for the ranks to log into
    assert f"components.training.fit {job / 'fit_spec.json'}" in " ".join(out.output.split())
    assert "torchrun" in out.output and "--nproc-per-node 2" in out.output


# --- serving ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """A server command in its own process, until it answers /ready."""

    def __init__(self, command: list[str], port: int, cwd: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=dict(os.environ)
        )

    def __enter__(self) -> _Server:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"server did not become ready: {self.process.stdout.read()[-3000:]}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def predict(self, *images: bytes) -> httpx.Response:
        files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
        return httpx.post(self.url + "/predict", files=files, timeout=60)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _shapes(shapes_dir: Path) -> list[tuple[str, bytes]]:
    return [(path.parent.name, path.read_bytes()) for path in sorted(shapes_dir.glob("*/*_*.png"))]


def _inverted(png: bytes) -> bytes:
    return _png(Image.fromarray(255 - np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))))


def _monitor(bundle: Path, log: Path, params, tmp_path: Path, window: int) -> dict:
    out = _invoke(
        "monitor",
        "--log",
        str(log),
        "--bundle",
        str(bundle),
        "--set",
        f"monitor.window_records={window}",
        "--set",
        "monitor.min_records=50",
        *_own_folders(params, tmp_path),
    )
    assert out.exit_code == 0, out.output
    run = tracking.get_run(_row(out.output, "MLflow run"))
    return {"output": out.output, "metrics": run.data.metrics, "verdict": _row(out.output, "verdict")}


def test_serve_options_the_prediction_log_and_monitor_on_the_pipeline_bundle(shapes_run, shapes_dir, tmp_path):
    """`visionflow serve BUNDLE` with every limit set low and a prediction log, bound to loopback by default;
    then `visionflow monitor` on that log and the same bundle: the shapes as trained show no drift, the same
    shapes inverted drift on brightness."""
    params, result = shapes_run
    bundle = Path(result.bundle).with_suffix("").with_suffix("")
    log = tmp_path / "prediction-log"
    port = _free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", str(bundle), "--port", str(port)]
    limits = ["--max-body-bytes", "20000", "--max-pixels", "4096", "--max-images", "2", "--top-k", "2"]
    images = _shapes(shapes_dir)
    with _Server([*command, *limits, "--prediction-log", str(log)], port, tmp_path) as server:
        listening = [
            c.laddr for c in psutil.Process(server.process.pid).net_connections("inet") if c.status == "LISTEN"
        ]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]  # loopback unless --host says otherwise

        big_image = _png(Image.new("RGB", (80, 80), (40, 200, 60)))  # 6,400 pixels > --max-pixels 4096
        big_body = images[0][1] + b"\0" * 20_000  # over --max-body-bytes
        for response in (server.predict(big_image), server.predict(big_body), server.predict(*[images[0][1]] * 3)):
            assert response.status_code == 413 and response.json()["kind"] == "too_large", response.text

        ids, wrong = [], []
        for start in range(0, len(images), 2):  # --max-images 2 per request
            pair = images[start : start + 2]
            response = server.predict(*(png for _, png in pair))
            assert response.status_code == 200, response.text
            body = response.json()
            assert all(len(p) == 2 for p in body["predictions"])  # --top-k 2
            wrong += [label for (label, _), p in zip(pair, body["predictions"], strict=True) if p[0]["label"] != label]
            ids += body["ids"]
        assert len(wrong) <= 3, wrong  # the 4-epoch model: at most 3 of 72 training images wrong
        records = read_prediction_log(log).records
        predictions = [r for r in records if r["event"] == "prediction"]
        errors = [r for r in records if r["event"] == "error"]
        assert len(predictions) == len(images) and {r["id"] for r in predictions} == set(ids)
        assert sorted((e["kind"], e["status"]) for e in errors) == [("too_large", 413)] * 3

        calm = _monitor(bundle, log, params, tmp_path, window=len(images))
        for start in range(0, len(images), 2):
            assert server.predict(*(_inverted(png) for _, png in images[start : start + 2])).status_code == 200
        drift = _monitor(bundle, log, params, tmp_path, window=len(images))  # the latest 72: the inverted ones
    assert calm["metrics"]["drift/detected"] == 0.0, calm["output"]
    assert drift["metrics"]["drift/detected"] == 1.0 and drift["metrics"]["drift/ks_brightness_drifted"] == 1.0
    assert "ks:brightness" in drift["verdict"]


def test_python_m_components_serving_serves_the_bundle_archive(shapes_run, shapes_dir, tmp_path):
    """The server without the CLI (the slim image's entry point) on the pipeline's .tar.gz."""
    _, result = shapes_run
    port = _free_port()
    command = [sys.executable, "-m", "components.serving", result.bundle, "--port", str(port), "--max-images", "3"]
    with _Server(command, port, tmp_path) as server:
        kinds = ["triangle", "square", "circle"]
        response = server.predict(*[(shapes_dir / k / f"{k}_001.png").read_bytes() for k in kinds])
        assert response.status_code == 200, response.text
        assert [p[0]["label"] for p in response.json()["predictions"]] == kinds
        assert httpx.get(server.url + "/metadata", timeout=10).json()["labels"] == CLASSES
        assert server.predict(*[b"x"] * 4).status_code == 413  # --max-images 3 reached the server
    bad = subprocess.run(
        [sys.executable, "-m", "components.serving", result.bundle, "--max-images", "none"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid setting: max_images")
    assert len(bad.stderr.strip().splitlines()) == 1


# --- Ctrl-C ----------------------------------------------------------------------------------------


def test_ctrl_c_during_training_marks_the_runs_killed(tmp_path, shapes_dir):
    """Ctrl-C in a terminal (SIGINT to the whole process group: the CLI, the training process and Prefect's
    temporary server) while training: both MLflow runs end KILLED, nothing stays RUNNING, exit 130 with the
    resume hint, promptly (the temporary server outlives the Ctrl-C, so no client retries a dead server)."""
    overrides = tiny_overrides(tmp_path, shapes_dir, train__max_epochs=60, train__early_stopping_patience=0)
    experiment = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.experiment="))
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", *[a for o in overrides for a in ("--set", o)]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, COLUMNS="200"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job inherits SIGINT ignored
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "runs").glob("*/train/checkpoints/last.ckpt")):
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        output, _ = process.communicate(timeout=120)  # a dead server made the client retry for ~220 s
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output[-3000:]
    assert "interrupted" in output and "visionflow resume" in output
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    stages = {r.data.tags.get(tracking.STAGE_TAG, "pipeline"): r.info.status for r in runs}
    assert stages == {"pipeline": "KILLED", "train": "KILLED"}, stages  # nothing left RUNNING
