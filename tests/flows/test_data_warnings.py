"""The run log of the validate task warns of empty class folders and label conflicts; a dangling link is
quarantined, not a crash (real Prefect, real MLflow)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from components import tracking
from components.config import DataParams


def _folder(root: Path) -> Path:
    """Split folders fix each image's split, so quarantining the conflicting copy (a train image) leaves every
    split of every class an image whatever bytes the PNG encoder writes."""
    for c, name in enumerate(("a", "b")):
        for split, count in (("train", 4), ("val", 2), ("test", 2)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = c * 100 + {"train": 0, "val": 10, "test": 20}[split] + i
                pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / name / f"{i}.png")
    (root / "train" / "empty").mkdir()
    shutil.copy(root / "train" / "a" / "0.png", root / "train" / "b" / "same_as_a0.png")
    os.symlink("../gone.png", root / "train" / "a" / "dangling.png")  # a dangling link must not break the cache key
    return root


def test_validate_task_logs_empty_classes_and_conflicts(tmp_path, prefect_harness):
    from prefect import flow

    from flows.tasks import ingest_task, validate_task

    data = DataParams(path=str(_folder(tmp_path / "data")))
    run_id = tracking.start_run(f"test-data-warnings-{tmp_path.name}", "validate", {})

    @flow
    def check():
        snapshot = ingest_task(data, str(tmp_path / "cache"))
        return validate_task(snapshot, data, str(tmp_path / "run"), run_id)

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    lines = Lines()
    run_logger = logging.getLogger("prefect.task_runs")  # where get_run_logger() writes inside a task
    run_logger.addHandler(lines)
    try:
        report = check()
    finally:
        run_logger.removeHandler(lines)
    warnings = lines.lines
    assert "class folder 'empty' holds no image: the class is left out" in warnings
    assert "1 image(s) labelled with more than one class (2 files): quarantined" in warnings
    assert sum("same image labelled a and b" in line for line in warnings) == 2
    assert report.empty_classes == ["empty"] and len(report.label_conflicts) == 1
    assert [(Path(q.path).name, q.reason) for q in report.quarantined if "same image" not in q.reason] == [
        ("dangling.png", "file not found")
    ]
