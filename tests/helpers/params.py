"""Params and training specs for fast test runs on the generated shapes."""

from __future__ import annotations

import uuid
from pathlib import Path

from components import tracking
from components.config import load_params
from components.data.ingest import ingest
from components.data.validate import validate
from components.planning import plan_for_manifest
from components.training.fit import FitSpec


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


def planned_fit_spec(tmp_path: Path, data_path, **extra) -> FitSpec:
    """A FitSpec for `python -m components.training.fit` on the shapes: ingested, validated and planned (no `auto`
    reaches fit), training into a new MLflow run; `extra` overrides params like tiny_overrides."""
    params = load_params(None, tiny_overrides(tmp_path, data_path, **extra))
    snapshot = ingest(params.data, tmp_path / "snapshot", Path(params.run.cache_dir))
    report = validate(snapshot, params.data, tmp_path / "data")
    params = plan_for_manifest(params, report.clean_manifest_path).params
    run_id = tracking.start_run(params.run.experiment, "train", {tracking.STAGE_TAG: "train"})
    return FitSpec(
        params=params,
        manifest_path=report.clean_manifest_path,
        classes=snapshot.classes,
        run_dir=str(tmp_path / "train"),
        result_path=str(tmp_path / "result.json"),
        mlflow_run_id=run_id,
        tracking_uri=tracking.tracking_uri(),
        progress_bar=False,
    )
