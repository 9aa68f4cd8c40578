"""Training process entry point: `python -m components.training.fit SPEC.json`.

The train task writes a FitSpec and launches this module in its own process, so Lightning's DDP
launcher (and torchrun / SLURM) re-runs only this module, never the Prefect flow. Rank zero logs
to the MLflow run named by the spec (or MLFLOW_RUN_ID) and writes a FitResult JSON.
"""

from __future__ import annotations

import math
import os
from collections import Counter
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from pydantic import BaseModel

from components.config import PipelineParams
from components.data.augment import build_eval_transform, build_train_transform
from components.data.dataset import ImageDataModule
from components.data.ingest import read_manifest
from components.errors import DataError, VisionflowError
from components.models import ModelSpec
from components.training.module import ClassifierModule


class FitSpec(BaseModel):
    """Everything the training process needs, written as JSON by the train task."""

    params: PipelineParams
    manifest_path: str
    classes: list[str]
    run_dir: str
    result_path: str
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    progress_bar: bool = True


class FitResult(BaseModel):
    """What the training process reports back (rank zero)."""

    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    best_val_acc: float | None = None
    epochs: int = 0
    final_metrics: dict[str, float] = {}
    error: str | None = None


class EpochSummary(Callback):
    """Prints one `[visionflow]` line per epoch (the train task relays these to the Prefect log)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = " ".join(
            f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items()) if "/" in k
        )
        print(f"[visionflow] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {shown}", flush=True)


def task_classes_of(rows: list[dict[str, str]], params: PipelineParams) -> dict[str, list[str]]:
    """The classes of each extra multi-task label column (sorted values); raises DataError for a missing column."""
    found: dict[str, list[str]] = {}
    for task in params.multitask.tasks:
        if rows and task not in rows[0]:
            raise DataError(f"multitask task {task!r} is not a label column of the data (columns: {', '.join(rows[0])})")
        found[task] = sorted({row[task] for row in rows})
    return found


def model_spec_from_params(
    params: PipelineParams, num_classes: int, task_classes: dict[str, list[str]] | None = None
) -> ModelSpec:
    """The ModelSpec a pipeline's params describe for `num_classes` classes (and extra tasks)."""
    return ModelSpec(
        name=params.model.name,
        num_classes=num_classes,
        in_channels=params.data.channels,
        image_size=params.augment.image_size,
        dropout=params.model.dropout,
        width=params.model.width,
        pretrained=params.model.pretrained,
        mean=params.augment.mean,
        std=params.augment.std,
        rnn=params.model.rnn,
        vit=params.model.vit,
        multitask_mode=params.multitask.mode,
        extra_tasks={task: len(names) for task, names in (task_classes or {}).items()},
    )


def class_weights(rows: list[dict[str, str]], classes: list[str]) -> list[float]:
    """Inverse-frequency weights of the train split's classes, normalised to mean 1 (absent classes get 0)."""
    counts = Counter(row["label"] for row in rows if row["split"] == "train")
    raw = [1.0 / counts[c] if counts[c] else 0.0 for c in classes]
    mean = sum(raw) / max(1, sum(1 for w in raw if w))
    return [w / mean for w in raw]


def gd_accumulation(rows: list[dict[str, str]], params: PipelineParams) -> int:
    """Batches per optimizer step for full-batch gradient descent: every training batch of a device's share."""
    train = sum(1 for row in rows if row["split"] == "train")
    devices = params.trainer.devices if isinstance(params.trainer.devices, int) else 1
    per_device = math.ceil(train / (devices * params.trainer.num_nodes))
    return max(1, math.ceil(per_device / params.train.batch_size))


def datamodule_from_params(
    params: PipelineParams,
    rows: list[dict[str, str]],
    classes: list[str],
    task_classes: dict[str, list[str]] | None = None,
) -> ImageDataModule:
    """The train/val ImageDataModule the params describe (transforms, batch size, workers, sampler)."""
    return ImageDataModule(
        rows,
        classes,
        build_train_transform(params.augment, seed=params.train.seed),
        build_eval_transform(params.augment),
        channels=params.data.channels,
        max_pixels=params.data.max_pixels,
        batch_size=params.train.batch_size,
        num_workers=params.train.num_workers,
        balanced_sampler=params.train.class_balance == "sampler",
        task_classes=task_classes,
    )


def build_trainer(
    spec: FitSpec, logger: MLFlowLogger | bool, accumulate_grad_batches: int = 1
) -> tuple[L.Trainer, ModelCheckpoint]:
    """A Lightning Trainer configured from the spec's params; returns it and its checkpoint callback."""
    params = spec.params
    directory = Path(spec.run_dir) / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=directory, filename="best", monitor="val/acc", mode="max", enable_version_counter=False
    )
    # Lightning's save_last only writes when the best changes; resume needs every epoch.
    last = ModelCheckpoint(dirpath=directory, filename="last", monitor=None, enable_version_counter=False)
    callbacks: list[Callback] = [checkpoint, last, EpochSummary()]
    if params.train.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val/acc", mode="max", patience=params.train.early_stopping_patience))
    trainer = L.Trainer(
        max_epochs=params.train.max_epochs,
        accelerator=params.trainer.accelerator,
        devices=params.trainer.devices,
        strategy=params.trainer.strategy,
        num_nodes=params.trainer.num_nodes,
        precision=params.trainer.precision,
        logger=logger,
        callbacks=callbacks,
        accumulate_grad_batches=accumulate_grad_batches,
        enable_progress_bar=spec.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=spec.run_dir,
    )
    return trainer, checkpoint


def fit(spec: FitSpec) -> FitResult:
    """Train the model the spec describes; returns the FitResult (also written to spec.result_path by rank 0)."""
    params = spec.params
    L.seed_everything(params.train.seed, workers=True, verbose=False)
    rows = read_manifest(spec.manifest_path)
    task_classes = task_classes_of(rows, params)
    module = ClassifierModule(
        spec=model_spec_from_params(params, len(spec.classes), task_classes).model_dump(),
        optim=params.train.model_dump(),
        classes=spec.classes,
        augment=params.augment.model_dump(),
        class_weights=class_weights(rows, spec.classes) if params.train.class_balance == "loss" else None,
        task_classes=task_classes,
        task_weights=params.multitask.loss_weights,
    )
    data = datamodule_from_params(params, rows, spec.classes, task_classes)
    run_id = spec.mlflow_run_id or os.environ.get("MLFLOW_RUN_ID")
    logger: MLFlowLogger | bool = False
    if run_id:
        logger = MLFlowLogger(
            experiment_name=params.run.experiment, tracking_uri=spec.tracking_uri, run_id=run_id
        )
    accumulate = gd_accumulation(rows, params) if params.train.optimizer == "gd" else 1
    trainer, checkpoint = build_trainer(spec, logger, accumulate)
    monitor = None
    if run_id and trainer.is_global_zero:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=2, tracking_uri=spec.tracking_uri)
        monitor.start()
    last = Path(spec.run_dir) / "checkpoints" / "last.ckpt"
    resume_from = str(last) if params.train.resume and last.is_file() else None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    finally:
        if monitor is not None:
            monitor.finish()
    best_score = checkpoint.best_model_score
    return FitResult(
        best_checkpoint=checkpoint.best_model_path or None,
        last_checkpoint=str(last) if last.is_file() else None,
        best_val_acc=float(best_score) if best_score is not None else None,
        epochs=trainer.current_epoch,
        final_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
    )


def fit_in_process(
    module: L.LightningModule, params: PipelineParams, rows: list[dict[str, str]], classes: list[str], epochs: int
) -> L.Trainer:
    """Train `module` for `epochs` on the manifest rows' train/val splits in this process (one device,
    no logger, no checkpoints): for short fine-tuning and distillation runs. Returns the Trainer."""
    L.seed_everything(params.train.seed, workers=True, verbose=False)
    data = datamodule_from_params(params, rows, classes)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator=params.trainer.accelerator, devices=1, precision=params.trainer.precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and int(
        os.environ.get("NODE_RANK", "0")
    ) == 0


def main(argv: list[str] | None = None) -> int:
    """Run `fit` on the spec file named by argv[0]; returns the exit code (0 ok, 3 a reported error)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m components.training.fit SPEC.json", file=sys.stderr)
        return 2
    spec = FitSpec.model_validate_json(Path(argv[0]).read_text())
    try:
        result = fit(spec)
        code = 0
    except VisionflowError as err:
        result, code = FitResult(error=str(err)), 3
        print(f"[visionflow] error: {err}", file=sys.stderr, flush=True)
    if _is_rank_zero():
        Path(spec.result_path).write_text(result.model_dump_json(indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
