"""`make run` (= `visionflow run --params params/default.yaml`): the default job on the bundled digits reaches
the accuracy the README states and prints its summary table. The one test that trains the real default job
(~1.5 min on 2 cores)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components import tracking
from components.training.warm import TIMINGS_FILE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _row(table: str, name: str) -> str:
    match = re.search(rf"^\s*{re.escape(name)}\s{{2,}}(.+?)\s*$", table, re.MULTILINE)
    assert match, f"no row {name!r} in:\n{table}"
    return match.group(1)


def test_make_run_trains_the_digits_and_prints_the_summary_table(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--params", str(ROOT / "params" / "default.yaml")],
        cwd=tmp_path,  # runs/ and .visionflow/ land here, as they would in a fresh checkout
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = re.sub("[│┃|]", " ", out.stdout)
    assert "visionflow run finished" in table
    accuracy = float(_row(table, "test accuracy"))
    assert accuracy >= 0.97, table  # 0.9851 measured (2026-12-01, README)
    assert float(_row(table, "macro F1")) >= 0.97
    assert re.sub(r"\s+", " ", _row(table, "images train / val / test")) == "1259 / 269 / 269"  # 1,797 digits
    assert _row(table, "quarantined files") == "0"

    client = MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name("visionflow-digits")
    (run,) = [
        r
        for r in client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.parentRunId` IS NULL")
        if r.data.tags.get(tracking.RUN_DIR_TAG, "").startswith(str(tmp_path.resolve()))
    ]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] == pytest.approx(accuracy, abs=5e-5)  # the table shows 4 decimals
    run_dir = Path(run.data.tags[tracking.RUN_DIR_TAG])
    assert run_dir.parent == tmp_path.resolve() / "runs"
    assert (run_dir / "train" / "checkpoints" / "best.ckpt").is_file()
    # the training process started ahead was handed the spec (it writes its timings): a fresh folder's first run,
    # whose ingest imports scikit-learn, does not pay a second process start
    assert (run_dir / "train" / TIMINGS_FILE).is_file(), "the training process was started anew"
