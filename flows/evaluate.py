"""Evaluate an existing checkpoint on any data set, as a flow of its own."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from components import tracking
from components.config import DataParams, EvaluateParams
from components.training.module import load_classifier
from flows.tasks import evaluate_task, ingest_task, publish_summary, validate_task


class EvaluationResult(BaseModel):
    """An evaluation run's figures and where its files are."""

    run_id: str
    run_dir: str
    metrics: dict[str, float]
    num_images: int
    quarantined: list[str]


@flow(name="visionflow-evaluate", log_prints=True)
def evaluate_flow(
    checkpoint: str,
    data: DataParams,
    split: str = "all",
    evaluate: EvaluateParams = EvaluateParams(),
    experiment: str = "visionflow",
    output_dir: str = "runs",
    cache_dir: str = ".visionflow",
) -> EvaluationResult:
    """Ingest and validate `data`, then evaluate `checkpoint` on its `split` ("all", "train", "val", "test").

    Images are converted to the checkpoint's channel count. Returns an EvaluationResult.
    """
    data = data.model_copy(update={"channels": load_classifier(checkpoint).spec.in_channels})
    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_url": str(flow_run.ui_url or "")}
    with tracking.run_scope(experiment, f"evaluate-{Path(data.path).name or data.path}", tags) as run:
        run_id = run.run_id
        run_dir = (Path(output_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id[:8]}").resolve()
        tracking.set_tags(run_id, {tracking.RUN_DIR_TAG: str(run_dir)})
        tracking.log_params(run_id, {"checkpoint": checkpoint, "data.path": data.path, "split": split})
        snapshot = ingest_task(data, cache_dir)
        report = validate_task(snapshot, data, str(run_dir), run_id)
        evaluation, _ = evaluate_task(
            checkpoint,
            report.clean_manifest_path,
            split,
            evaluate,
            data,
            str(run_dir / "evaluation"),
            experiment,
            run_id,
        )
        metrics = {f"test/{k}": v for k, v in evaluation.metrics.items()}
        tracking.log_metrics(run_id, metrics)
        publish_summary(
            "evaluation-summary",
            f"evaluation of {Path(checkpoint).name} on {data.path}",
            {"accuracy": f"{evaluation.metrics['accuracy']:.4f}", "macro F1": f"{evaluation.metrics['macro_f1']:.4f}"},
            tracking.run_link(run_id),
        )
    return EvaluationResult(
        run_id=run_id,
        run_dir=str(run_dir),
        metrics=metrics,
        num_images=int(evaluation.metrics["num_samples"]),
        quarantined=[f"{q.path}: {q.reason}" for q in report.quarantined],
    )
