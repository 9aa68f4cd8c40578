"""Prefect tasks: each wraps one component function, logs to MLflow and returns a small typed result."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from components import tracking
from components.config import DataParams, EvaluateParams, PipelineParams, params_to_flat_dict
from components.data.ingest import DatasetSnapshot, ingest, read_manifest
from components.data.manifest import rows_of_split
from components.data.validate import ValidationReport, validate
from components.errors import TrainingError, VisionflowError
from components.training.spec import FitResult, FitSpec
from components.training.warm import SERVING_LINE
from flows import warm_start

if TYPE_CHECKING:
    from components.evaluation.results import EvalReport


class TrainedModel(BaseModel):
    """The train stage's result: checkpoints, the model spec and the train run."""

    checkpoint: str
    last_checkpoint: str | None
    classes: list[str]
    best_val_acc: float | None
    epochs: int
    train_run_id: str


# --- ingest -------------------------------------------------------------------------------------


def _source_stamp(path: str) -> str:
    """A cheap stamp of a data source: names, sizes and mtimes of its files (or the name of a bundled set)."""
    if ":" in path and not Path(path).exists():
        return path
    target = Path(path)
    if target.is_file() and target.suffix.lower() != ".csv":
        stat = target.stat()
        return f"{target.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    root = target if target.is_dir() else target.parent
    digest = hashlib.sha256(str(root.resolve()).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            file = os.path.join(dirpath, name)
            stat = os.stat(file) if os.path.exists(file) else os.lstat(file)  # a dangling link: its own stamp
            digest.update(f"{dirpath}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def snapshot_dir(data: DataParams, cache_dir: str) -> Path:
    """Where the snapshot of this source and these data params is kept (shared by runs on the same data)."""
    key = hashlib.sha256((data.model_dump_json(exclude={"cache"}) + _source_stamp(data.path)).encode()).hexdigest()[:20]
    return Path(cache_dir) / "snapshots" / key


def _ingest_cache_key(context, parameters) -> str:
    """The snapshot folder's name and a token kept in it: the same files and data params give the same key
    for as long as their snapshot exists (the first run stores its result under the key the next run
    computes); a deleted snapshot gets a new token, so a result pointing at it is never served."""
    directory = snapshot_dir(parameters["data"], parameters["cache_dir"])
    token = directory / "cache_token"
    if not (directory / "manifest.csv").is_file() or not token.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        token.write_text(uuid.uuid4().hex)
    return f"{directory.name}-{token.read_text()}"


def _retry_io_errors(task, task_run, state) -> bool:
    """Retry transient failures (I/O, network), never a data problem the user must fix."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, VisionflowError)


@task(
    name="ingest",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_io_errors,
    cache_key_fn=_ingest_cache_key,
    cache_expiration=timedelta(days=30),
    persist_result=True,
)
def ingest_task(data: DataParams, cache_dir: str) -> DatasetSnapshot:
    """Build the manifest of `data.path` (cached on the source's files and the data params)."""
    snapshot = ingest(data, snapshot_dir(data, cache_dir), Path(cache_dir))
    get_run_logger().info(
        "ingested %d images in %d classes from %s (fingerprint %s)",
        snapshot.num_images,
        len(snapshot.classes),
        data.path,
        snapshot.fingerprint[:12],
    )
    return snapshot


# --- validate -----------------------------------------------------------------------------------


@task(name="validate", retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_io_errors)
def validate_task(snapshot: DatasetSnapshot, data: DataParams, run_dir: str, run_id: str) -> ValidationReport:
    """Decode every image once; quarantine bad files; log the report and the data set to MLflow."""
    logger = get_run_logger()
    report = validate(snapshot, data, Path(run_dir) / "data")
    for bad in report.quarantined:
        logger.warning("quarantined %s: %s", bad.path, bad.reason)
    for line in report.warnings:  # empty class folders, label conflicts
        logger.warning("%s", line)
    tracking.log_artifacts(
        run_id,
        [report.report_path, report.quarantine_path, report.clean_manifest_path, snapshot.classes_path],
        "data",
    )
    tracking.log_metrics(
        run_id,
        {
            "data/num_images": report.num_checked,
            "data/num_valid": report.num_valid,
            "data/num_quarantined": len(report.quarantined),
            "data/num_duplicate_groups": len(report.duplicate_groups),
            "data/num_leaked": len(report.leakage),
            "data/imbalance_ratio": report.imbalance_ratio,
        },
    )
    clean_rows = read_manifest(report.clean_manifest_path)
    for split in ("train", "val", "test"):
        tracking.log_dataset(
            run_id,
            rows_of_split(clean_rows, split),
            snapshot.fingerprint,
            snapshot.root,
            name=f"{Path(snapshot.source).name or snapshot.source}-{split}",
            context=split,
        )
    tracking.set_tags(run_id, {"visionflow.data_fingerprint": snapshot.fingerprint})
    logger.info(
        "validated %d images: %d valid, %d quarantined", report.num_checked, report.num_valid, len(report.quarantined)
    )
    return report


# --- plan ---------------------------------------------------------------------------------------


@task(name="plan")
def plan_task(params: PipelineParams, report: ValidationReport, run_dir: str, run_id: str) -> PipelineParams:
    """Resolve the `auto` params from the validated data (components.planning): print the decision table, save
    plan.json, rewrite params.yaml with the resolved params (what resume and later stages read) and log both to
    MLflow with the decisions as plan.* params. Returns the resolved params."""
    import yaml

    from components.planning import format_plan, plan_for_manifest, save_plan

    plan = plan_for_manifest(params, report.clean_manifest_path)
    print(f"plan ({sum(d.source == 'plan' for d in plan.decisions)} decided from the data):\n{format_plan(plan)}")
    path = save_plan(plan, Path(run_dir) / "plan.json")
    resolved = Path(run_dir) / "params.yaml"
    resolved.write_text(yaml.safe_dump(plan.params.model_dump(mode="json"), sort_keys=False))
    tracking.log_params(run_id, {k: str(v) for k, v in plan.flat().items()})
    tracking.log_artifacts(run_id, [path, resolved])
    return plan.params


# --- augmentation preview -----------------------------------------------------------------------


@task(name="augmentation-preview")
def preview_task(params: PipelineParams, report: ValidationReport, run_dir: str, run_id: str) -> str:
    """Save the train/eval transforms (Albumentations to_dict) and log a preview grid; returns the JSON path. Drawn
    in the waiting training process (warm_start.call): its imports are done, and this process never needs them."""
    paths = warm_start.call(
        "components.data.augment:write_preview", params, report.clean_manifest_path, str(Path(run_dir) / "augment")
    )
    tracking.log_artifacts(run_id, [Path(path) for path in paths], "augment")
    return paths[0]


# --- train --------------------------------------------------------------------------------------


def _relay(process: subprocess.Popen, logger) -> tuple[str, bool]:
    """Copy the training process's output to our stdout (progress bars intact) and its `[visionflow]` lines to the
    task log until it exits or says it serves calls (SERVING_LINE); returns the last few KB of output and whether
    it serves."""
    tail: deque[bytes] = deque(maxlen=64)
    pending = b""
    serving = False
    assert process.stdout is not None
    while not serving and (chunk := os.read(process.stdout.fileno(), 4096)):
        tail.append(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace").rsplit("\r", 1)[-1]
            if text == SERVING_LINE:
                serving = True
            elif text.startswith("[visionflow] "):
                logger.info(text.removeprefix("[visionflow] "))
            else:
                sys.stdout.write(line.decode(errors="replace") + "\n")
        sys.stdout.flush()
    return b"".join(tail).decode(errors="replace")[-3000:], serving


def run_training_process(spec: FitSpec, spec_path: Path, logger) -> FitResult:
    """Run the training process on the spec (the one flows.warm_start started ahead, else a new
    `python -m components.training.fit SPEC`) and wait until it exits or serves calls; returns its FitResult.

    Raises TrainingError with the process's own message (or its output's tail) when it fails.
    """
    spec_path.write_text(spec.model_dump_json(indent=2))
    env = dict(os.environ, MLFLOW_TRACKING_URI=spec.tracking_uri or tracking.tracking_uri())
    if spec.mlflow_run_id:
        env["MLFLOW_RUN_ID"] = spec.mlflow_run_id
    env.setdefault("PYTHONUNBUFFERED", "1")
    # the one started ahead (imports done), else a new one; the one started ahead serves the evaluate stage after
    process = warm_start.training_process(spec_path, env, serve=True)
    try:
        tail, serving = _relay(process, logger)
        code = 0 if serving else process.wait()
    except BaseException:
        process.terminate()
        process.wait(timeout=30)
        raise
    if serving:
        warm_start.keep_serving(process)
    result_path = Path(spec.result_path)
    result = FitResult.model_validate_json(result_path.read_text()) if result_path.is_file() else None
    if result is not None and result.error:
        raise TrainingError(result.error)
    if code != 0 or result is None:
        last = [line for line in tail.splitlines() if line.strip()][-1:] or ["no output"]
        raise TrainingError(f"training process exited with code {code}: {last[0].strip()}")
    return result


@task(name="train")
def train_task(
    params: PipelineParams, report: ValidationReport, snapshot: DatasetSnapshot, run_dir: str, parent_run_id: str
) -> TrainedModel:
    """Train in a separate process (DDP-ready) under a nested MLflow run; returns the TrainedModel."""
    logger = get_run_logger()
    reopen = tracking.child_run(parent_run_id, "train") if params.train.resume else None
    tags = {tracking.STAGE_TAG: "train"}
    with tracking.run_scope(params.run.experiment, "train", tags, parent_run_id, reopen=reopen) as run:
        run_id = run.run_id
        if not reopen:
            tracking.log_params(run_id, params_to_flat_dict(params))
        train_dir = Path(run_dir) / "train"
        train_dir.mkdir(parents=True, exist_ok=True)
        spec = FitSpec(
            params=params,
            manifest_path=report.clean_manifest_path,
            classes=snapshot.classes,
            run_dir=str(train_dir),
            result_path=str(train_dir / "result.json"),
            mlflow_run_id=run_id,
            tracking_uri=tracking.tracking_uri(),
            progress_bar=params.train.progress_bar and sys.stdout.isatty(),
        )
        Path(spec.result_path).unlink(missing_ok=True)
        result = run_training_process(spec, train_dir / "fit_spec.json", logger)
        if not result.best_checkpoint:
            raise TrainingError("training produced no checkpoint (was the validation set empty?)")
        tracking.log_artifacts(run_id, [result.best_checkpoint], "checkpoints")
        tracking.log_metrics(run_id, {"best_val_acc": result.best_val_acc or 0.0, "epochs": result.epochs})
    logger.info("trained %d epochs, best val/acc %.4f", result.epochs, result.best_val_acc or 0.0)
    return TrainedModel(
        checkpoint=result.best_checkpoint,
        last_checkpoint=result.last_checkpoint,
        classes=snapshot.classes,
        best_val_acc=result.best_val_acc,
        epochs=result.epochs,
        train_run_id=run_id,
    )


def _log_explanations(run_id: str, checkpoint: str, report: EvalReport, evaluate: EvaluateParams, data: DataParams):
    """Draw the explanation grid of an evaluation and log it; an explanation never fails the evaluation: any
    problem is a warning and the grid is skipped."""
    logger = get_run_logger()
    tracking.log_params(
        run_id, {"evaluate.explain": evaluate.explain, "evaluate.explain_method": evaluate.explain_method}
    )
    try:
        out_dir = Path(report.predictions_path).parent
        result = warm_start.call(
            "components.evaluation.explain:explain_predictions",
            checkpoint, report.predictions_path, out_dir, evaluate, data.max_pixels,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 (explanations are extra: the evaluation stands without them)
        logger.warning("explanations skipped: %s: %s", type(err).__name__, err)
        return
    if result.png_path:
        tracking.log_artifacts(run_id, [result.png_path], "evaluation")
        logger.info("explained %d test images with %s", len(result.images), result.method)
    elif evaluate.explain:
        logger.warning("explanations skipped: %s", result.skipped)


# --- evaluate -----------------------------------------------------------------------------------


@task(name="evaluate")
def evaluate_task(
    checkpoint: str,
    manifest_path: str,
    split: str,
    evaluate: EvaluateParams,
    data: DataParams,
    out_dir: str,
    experiment: str,
    parent_run_id: str | None,
) -> tuple[EvalReport, str]:
    """Evaluate a checkpoint on one split of a manifest under its own MLflow run.

    Returns (EvalReport, the evaluate run id). Metrics are logged as test/<name>; with evaluate.calibrate, the
    temperature fitted on the validation split (when the evaluated split is another one) as calibration/*.
    """
    manifest = read_manifest(manifest_path)
    rows = rows_of_split(manifest, split)
    calibration_rows = rows_of_split(manifest, "val") if split not in ("val", "all") else None
    with tracking.run_scope(experiment, "evaluate", {tracking.STAGE_TAG: "evaluate"}, parent_run_id) as run:
        run_id = run.run_id
        report = warm_start.call(  # in the training process when it serves (its imports done), else here
            "components.evaluation.evaluate:evaluate_checkpoint",
            checkpoint, rows, Path(out_dir), evaluate, data.max_pixels, calibration_rows,
        )  # fmt: skip
        tracking.log_params(run_id, {"checkpoint": checkpoint, "split": split, "evaluate.top_k": evaluate.top_k})
        tracking.log_metrics(run_id, {f"test/{k}": v for k, v in report.metrics.items()})
        if report.calibration:
            _log_calibration(run_id, report.calibration)
        tracking.log_artifacts(
            run_id,
            [
                report.metrics_path,
                report.per_class_path,
                report.confusion_csv_path,
                report.confusion_png_path,
                report.misclassified_png_path,
                report.predictions_path,
                report.pr_curves_png_path,  # multi-label: precision-recall curves and the tuned thresholds
                report.thresholds_path,
            ],
            "evaluation",
        )
        _log_explanations(run_id, checkpoint, report, evaluate, data)
    get_run_logger().info("test accuracy %.4f, macro F1 %.4f", report.metrics["accuracy"], report.metrics["macro_f1"])
    return report, run_id


def _log_calibration(run_id: str, calibration) -> None:
    """The fitted temperature and the ECE before and after it (metrics), its reliability diagram and JSON."""
    tracking.log_metrics(
        run_id,
        {
            "calibration/temperature": calibration.temperature,
            "calibration/ece_before": calibration.ece_before,
            "calibration/ece_after": calibration.ece_after,
        },
    )
    tracking.log_params(run_id, {"evaluate.calibrate": True})
    tracking.log_artifacts(run_id, [calibration.json_path, calibration.png_path], "evaluation")
    get_run_logger().info(
        "temperature %.3f fitted on %d validation images: test ECE %.4f -> %.4f",
        calibration.temperature,
        calibration.num_fitted,
        calibration.ece_before,
        calibration.ece_after,
    )


def publish_summary(key: str, title: str, rows: dict[str, str], mlflow_link: str) -> None:
    """A Prefect markdown artifact with the key figures and the MLflow run it belongs to."""
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    create_markdown_artifact(
        key=key,
        markdown=f"## {title}\n\n| | |\n|---|---|\n{table}\n\nMLflow: {mlflow_link}\n",
        description=title,
    )


def json_dump(obj, path: Path) -> Path:
    """Write obj as indented JSON to path; returns path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path
