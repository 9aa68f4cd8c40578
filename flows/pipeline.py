"""The main flow: ingest → validate → augmentation preview → train → evaluate, tracked in MLflow."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from components import tracking
from components.config import PipelineParams, load_params, params_to_flat_dict
from components.errors import VisionflowError
from components.monitoring.resources import StageClock
from flows import warm_start
from flows.runs import process_tags, resumable_pipeline_run
from flows.tasks import (
    evaluate_task,
    ingest_task,
    json_dump,
    plan_task,
    preview_task,
    publish_summary,
    train_task,
    validate_task,
)

# Params whose value legitimately changes between the first attempt and a resume of the same run.
_NOT_LOGGED = {"train.resume", "train.progress_bar"}


class PipelineResult(BaseModel):
    """What a pipeline run produced and where to look."""

    run_id: str
    experiment: str
    run_dir: str
    tracking_uri: str
    metrics: dict[str, float]
    split_counts: dict[str, int]
    quarantined: list[str]
    checkpoint: str
    train_run_id: str
    evaluate_run_id: str
    bundle: str | None = None
    model_version: str | None = None
    registry_decision: str | None = None
    promoted: bool | None = None
    challenger_accuracy: float | None = None
    champion_accuracy: float | None = None
    best_variant: str | None = None
    comparison: str | None = None


def loggable_params(params: PipelineParams) -> dict:
    """The flattened params logged to MLflow (those that may change on resume left out)."""
    return {k: v for k, v in params_to_flat_dict(params).items() if k not in _NOT_LOGGED}


def stage_clock(run_id: str) -> StageClock:
    """A StageClock that logs stage/<name>/seconds and stage/<name>/peak_rss_mb (flow process and its
    children, e.g. the training process) to the pipeline's MLflow run as each stage ends."""

    def log(name: str, seconds: float, peak_mb: float) -> None:
        tracking.log_metrics(run_id, {f"stage/{name}/seconds": seconds, f"stage/{name}/peak_rss_mb": peak_mb})

    return StageClock(log)


def _prefect_tags() -> dict[str, str]:
    return {
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_name": str(flow_run.name or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
    }


@contextmanager
def pipeline_run_scope(
    params: PipelineParams, params_file: str | None, resume_run_id: str | None, extra_tags: dict[str, str] | None = None
) -> Iterator[tuple[tracking.ScopedRun, Path]]:
    """The parent MLflow run (tracking.run_scope) and its run directory, new or re-opened for a resume;
    a VisionflowError inside becomes a StageError naming the stage the run is in."""
    if resume_run_id:
        _, run_dir = resumable_pipeline_run(resume_run_id)
        tags = {**_prefect_tags(), **process_tags(), "visionflow.resumed": "true"}
        with tracking.run_scope(reopen=resume_run_id, tags=tags, stage_errors=(VisionflowError,)) as run:
            yield run, run_dir
        return
    tags = {
        **_prefect_tags(),
        **process_tags(),
        **(extra_tags or {}),
        "visionflow.params_file": params_file or "",
        "mlflow.source.git.commit": tracking.git_commit() or "",
    }
    with tracking.run_scope(params.run.experiment, params.run.run_name, tags, stage_errors=(VisionflowError,)) as run:
        run_dir = (Path(params.run.output_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{run.run_id[:8]}").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        tracking.set_tags(run.run_id, {tracking.RUN_DIR_TAG: str(run_dir)})
        tracking.log_params(run.run_id, loggable_params(params))
        tracking.log_artifacts(run.run_id, [run_dir / "params.yaml"])
        yield run, run_dir


def resume_pipeline(run_id: str, overrides: list[str] | None = None) -> PipelineResult:
    """Continue pipeline run `run_id` (`visionflow resume`): the same MLflow run and run directory, its
    params.yaml with `overrides` on top, training from its last checkpoint. Only FAILED, KILLED and crashed
    RUNNING runs resume; anything else raises VisionflowError before a flow starts. Returns a PipelineResult."""
    run, run_dir = resumable_pipeline_run(run_id)
    params = load_params(run_dir / "params.yaml", ["train.resume=true", *(overrides or [])])
    return pipeline(params, params_file=run.data.tags.get("visionflow.params_file") or None, resume_run_id=run_id)


@dataclass
class _Stages:
    """What the stages of one pipeline run returned (Prefect task results, passed on to the summary)."""

    params: PipelineParams
    report: Any
    snapshot: Any
    trained: Any
    evaluation: Any
    evaluate_run_id: str
    split_counts: dict[str, int]
    optimized: Any = None
    packaged: Any = None


def _run_stages(params: PipelineParams, run: tracking.ScopedRun, run_dir: Path, clock: StageClock) -> _Stages:
    """ingest → validate → plan → augmentation preview → train → evaluate [→ optimize] [→ package], each
    timed by `clock` and named in `run.stage` while it runs."""

    def enter(stage: str) -> None:
        run.stage = clock.start(stage)

    run_id, out = run.run_id, str(run_dir)
    enter("ingest")
    snapshot = ingest_task(params.data, params.run.cache_dir)
    enter("validate")
    report = validate_task(snapshot, params.data, out, run_id)
    enter("plan")
    params = plan_task(params, report, out, run_id)
    enter("augment")
    preview_task(params, report, out, run_id)
    enter("train")
    trained = train_task(params, report, snapshot, out, run_id)
    enter("evaluate")
    manifest = report.clean_manifest_path
    evaluation, evaluate_run_id = evaluate_task(
        trained.checkpoint, manifest, "test", params.evaluate, params.data, str(run_dir / "evaluation"),
        params.run.experiment, run_id,
    )  # fmt: skip
    split_counts = {split: sum(counts.values()) for split, counts in report.class_counts.items()}
    if report.split_counts:  # images per split (a multi-label image carries several labels of class_counts)
        split_counts = {split: report.split_counts.get(split, 0) for split in split_counts}
    stages = _Stages(
        params=params, report=report, snapshot=snapshot, trained=trained, evaluation=evaluation,
        evaluate_run_id=evaluate_run_id, split_counts=split_counts,
    )  # fmt: skip
    if params.optimize.enabled:
        enter("optimize")
        from flows.optimize import optimize_stage  # imported when enabled: onnx, onnxruntime, torch-pruning

        stages.optimized = optimize_stage(trained.checkpoint, manifest, params, out, run_id)
    if params.package.enabled:
        enter("package")
        from flows.package import package_task

        optimized = stages.optimized
        stages.packaged = package_task(
            trained.checkpoint, params, snapshot.source, snapshot.fingerprint, manifest, evaluation, split_counts,
            out, run_id,
            int8_onnx=optimized.int8_onnx if optimized else None,
            comparison_md=optimized.comparison_md if optimized else None,
        )  # fmt: skip
    return stages


@flow(name="visionflow-pipeline", log_prints=True)
def pipeline(
    params: PipelineParams = PipelineParams(),
    params_file: str | None = None,
    resume_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> PipelineResult:
    """Train, evaluate and track an image classifier from `params`.

    `resume_run_id` re-attaches to an earlier (failed or killed) run: same run directory, same
    MLflow run, training continued from its last checkpoint. `tags` are added to the MLflow run
    (a sweep marks its runs this way). Returns a PipelineResult.
    """
    warm_start.prestart_training_process()  # imports torch, Lightning and MLflow while the stages before train run
    try:
        with pipeline_run_scope(params, params_file, resume_run_id, tags) as (run, run_dir):
            clock = stage_clock(run.run_id)
            try:
                stages = _run_stages(params, run, run_dir, clock)
            finally:
                clock.stop()
            run.stage = None
            return _finish(stages, run.run_id, run_dir)
    finally:
        warm_start.discard_training_process()  # not handed a spec (the run ended before training): let it go


def _finish(stages: _Stages, run_id: str, run_dir: Path) -> PipelineResult:
    """Log the run's headline metrics, write result.json and the Prefect summary; returns the PipelineResult."""
    evaluation, packaged, optimized = stages.evaluation, stages.packaged, stages.optimized
    metrics = {f"test/{k}": v for k, v in evaluation.metrics.items()}
    tracking.log_metrics(run_id, {**metrics, "train/best_val_acc": stages.trained.best_val_acc or 0.0})
    tracking.log_artifacts(run_id, [evaluation.confusion_png_path, evaluation.metrics_path], "evaluation")
    result = PipelineResult(
        run_id=run_id,
        experiment=stages.params.run.experiment,
        run_dir=str(run_dir),
        tracking_uri=tracking.tracking_uri(),
        metrics=metrics,
        split_counts=stages.split_counts,
        quarantined=[f"{q.path}: {q.reason}" for q in stages.report.quarantined],
        checkpoint=stages.trained.checkpoint,
        train_run_id=stages.trained.train_run_id,
        evaluate_run_id=stages.evaluate_run_id,
        bundle=packaged.archive if packaged else None,
        model_version=f"{packaged.model_name} v{packaged.version}" if packaged else None,
        registry_decision=packaged.reason if packaged else None,
        promoted=packaged.promoted if packaged else None,
        challenger_accuracy=packaged.challenger_accuracy if packaged else None,
        champion_accuracy=packaged.champion_accuracy if packaged else None,
        best_variant=optimized.best if optimized else None,
        comparison=optimized.comparison_md if optimized else None,
    )
    json_dump(result.model_dump(), run_dir / "result.json")
    split_counts = stages.split_counts
    rows = {
        "test accuracy": f"{evaluation.metrics['accuracy']:.4f}",
        "macro F1": f"{evaluation.metrics['macro_f1']:.4f}",
        "images (train/val/test)": "/".join(str(split_counts.get(s, 0)) for s in ("train", "val", "test")),
        "quarantined": str(len(stages.report.quarantined)),
        "MLflow run": run_id,
        "run directory": str(run_dir),
    }
    if packaged:
        rows["bundle"] = packaged.archive
        rows["registered model"] = f"{packaged.model_name} v{packaged.version}"
        rows["registry gate"] = packaged.reason
    if optimized:
        rows["best compressed variant"] = str(optimized.best)
    publish_summary("pipeline-summary", "visionflow pipeline run", rows, tracking.run_link(run_id))
    return result
