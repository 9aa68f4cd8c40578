"""`visionflow explain`: where a trained model looked, for any image files (no Prefect run, no MLflow run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from components.config import DataParams
from components.errors import VisionflowError
from components.evaluation.results import read_calibration

if TYPE_CHECKING:  # torch and the CAM library load with explain_files, after the arguments are checked
    from components.evaluation.explain import ExplainMethod, Explanation


def checkpoint_of_run(run_id: str) -> tuple[str, float]:
    """The best checkpoint of the finished pipeline run `run_id` and the temperature its evaluation fitted (1.0
    without one); VisionflowError for an unknown or unfinished run, or one whose checkpoint is gone."""
    from flows.runs import finished_pipeline_run  # MLflow: after the arguments are checked

    _, finished = finished_pipeline_run(run_id, "explain")
    checkpoint = finished.get("checkpoint") or ""
    if not checkpoint or not Path(checkpoint).is_file():
        raise VisionflowError(f"run {run_id} has no checkpoint to explain (looked for {checkpoint or 'none'})")
    calibration = read_calibration(Path(checkpoint).parents[2] / "evaluation")  # <run>/train/checkpoints/best.ckpt
    return checkpoint, calibration.temperature if calibration else 1.0


def explain_command(
    run_id: str | None,
    checkpoint: str | None,
    images: list[str],
    out_dir: str,
    method: ExplainMethod = "auto",
    max_pixels: int | None = None,
) -> list[Explanation]:
    """Explain the prediction of a run's checkpoint (or of `checkpoint`) on each image: one PNG each in out_dir.
    Images larger than `max_pixels` (default: data.max_pixels' default) are refused."""
    if bool(run_id) == bool(checkpoint):
        raise VisionflowError("give exactly one of --run RUN_ID or --checkpoint CKPT")
    if not images:
        raise VisionflowError("name at least one image to explain")
    source, temperature = checkpoint_of_run(run_id) if run_id else (checkpoint, 1.0)
    from components.evaluation.explain import explain_files

    return explain_files(source, images, Path(out_dir), method, max_pixels or DataParams().max_pixels, temperature)
