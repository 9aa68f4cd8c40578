"""Training process entry point: `python -m components.training.fit SPEC.json`.

The train task writes a FitSpec and launches this module in its own process, so Lightning's DDP
launcher (and torchrun / SLURM) re-runs only this module, never the Prefect flow. Rank zero logs
to the MLflow run named by the spec (or MLFLOW_RUN_ID) and writes a FitResult JSON.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from components.config import PipelineParams, TrainerParams, fill_auto, unresolved_fields
from components.data.augment import build_eval_transform, build_train_transform, eval_resize_side
from components.data.dataset import ImageDataModule, resolve_num_workers
from components.data.ingest import read_manifest
from components.data.manifest import ManifestRow
from components.data.multilabel import positive_weights
from components.errors import DataError, VisionflowError
from components.models import ModelSpec
from components.models.weights import head_prefixes, is_head
from components.quiet import LOG_FILE_ENV, VERBOSE_ENV, route_output
from components.training.devices import DevicePlan, effective_batch_size, plan_devices, resolve_accelerator, scaled_lr
from components.training.margins import MarginRecorder, write_suspicious_labels
from components.training.module import ClassifierModule
from components.training.spec import FitResult, FitSpec, SuspiciousLabels


class EpochSummary(Callback):
    """Prints one `[visionflow]` line per epoch (the train task relays these to the Prefect log)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items()) if "/" in k)
        print(f"[visionflow] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {shown}", flush=True)


class EpochThroughput(Callback):
    """Logs per epoch perf/train_images_per_sec (all processes together, from the first training batch's start
    to the last one's end, validation excluded) and, on CUDA, perf/gpu_peak_mem_mb (this process's peak)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.end, self.images = time.perf_counter(), None, 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.images += len(batch[1])
        self.end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.end is None or self.end <= self.start:
            return
        rate = self.images * trainer.world_size / (self.end - self.start)
        pl_module.log("perf/train_images_per_sec", rate, on_epoch=True, rank_zero_only=True)
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            pl_module.log("perf/gpu_peak_mem_mb", peak, on_epoch=True, rank_zero_only=True)


class FreezeBackbone(BaseFinetuning):
    """Fine-tuning: the backbone is frozen for the first `epochs` epochs (the new head trains alone), then
    trainable again (its learning rate is already train.lr x backbone_lr_mult in the optimizer's param groups)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def _backbone(self, pl_module: L.LightningModule) -> list[torch.nn.Module]:
        heads = head_prefixes(pl_module.model)
        return [m for name, m in pl_module.model.named_children() if not is_head(name, heads)]

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(self._backbone(pl_module))

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        if epoch == self.epochs:
            self.make_trainable(self._backbone(pl_module))
            if pl_module.trainer.is_global_zero:
                print(f"[visionflow] epoch {epoch + 1}: backbone unfrozen", flush=True)


def task_classes_of(rows: list[ManifestRow], params: PipelineParams) -> dict[str, list[str]]:
    """The classes of each extra multi-task label column (sorted values); raises DataError for a missing column."""
    found: dict[str, list[str]] = {}
    for task in params.multitask.tasks:
        if rows and task not in rows[0]:
            raise DataError(
                f"multitask task {task!r} is not a label column of the data (columns: {', '.join(rows[0])})"
            )
        found[task] = sorted({row[task] for row in rows})
    return found


def model_spec_from_params(
    params: PipelineParams, num_classes: int, task_classes: dict[str, list[str]] | None = None
) -> ModelSpec:
    """The ModelSpec a pipeline's params describe for `num_classes` classes (and extra tasks). Unplanned `auto`
    values take their fields' defaults (config.fill_auto); the training process gets planned params."""
    params = fill_auto(params)
    return ModelSpec(
        name=params.model.name,
        num_classes=num_classes,
        in_channels=params.data.channels,
        image_size=params.augment.image_size,
        dropout=params.model.dropout,
        width=params.model.width,
        pretrained=params.model.pretrained,
        weights=params.model.weights,
        mean=params.augment.mean,
        std=params.augment.std,
        rnn=params.model.rnn,
        vit=params.model.vit,
        multitask_mode=params.multitask.mode,
        extra_tasks={task: len(names) for task, names in (task_classes or {}).items()},
    )


def class_weights(rows: list[ManifestRow], classes: list[str]) -> list[float]:
    """Inverse-frequency weights of the train split's classes, normalised to mean 1 (absent classes get 0)."""
    counts = Counter(row["label"] for row in rows if row["split"] == "train")
    raw = [1.0 / counts[c] if counts[c] else 0.0 for c in classes]
    mean = sum(raw) / max(1, sum(1 for w in raw if w))
    return [w / mean for w in raw]


def gd_accumulation(rows: list[ManifestRow], params: PipelineParams, world_size: int | None = None) -> int:
    """Batches per optimizer step for full-batch gradient descent: every training batch of a device's share
    (`world_size`: processes over all nodes; by default the params' devices × num_nodes, "auto" counting 1)."""
    train = sum(1 for row in rows if row["split"] == "train")
    if world_size is None:
        devices = params.trainer.devices if isinstance(params.trainer.devices, int) else 1
        world_size = devices * params.trainer.num_nodes
    per_device = math.ceil(train / world_size)
    return max(1, math.ceil(per_device / params.train.batch_size))


def _multilabel(params: PipelineParams) -> bool:
    return params.data.task == "multilabel"


def datamodule_from_params(
    params: PipelineParams,
    rows: list[ManifestRow],
    classes: list[str],
    task_classes: dict[str, list[str]] | None = None,
    plan: DevicePlan | None = None,
    index_train: bool = False,
) -> ImageDataModule:
    """The train/val ImageDataModule the params describe (transforms, batch size, loader options, sampler, image
    cache, in-memory train split). `plan` (the checked devices) sizes the automatic worker count and pinned memory;
    without it one process on the params' accelerator is assumed. Training on a GPU, batches stay uint8 until the device
    normalises them (a quarter of the bytes to copy); on CPUs each worker normalises its images (cv2's lookup
    table beats batched tensor arithmetic there). Both give the same floats. Unplanned `auto` values take their
    fields' defaults (config.fill_auto). With `index_train` the train batches carry their rows' positions (for the
    suspicious-label margins)."""
    params = fill_auto(params)
    accelerator = plan.accelerator if plan else resolve_accelerator(params.trainer.accelerator)
    on_device = accelerator != "cpu"
    train = params.train
    return ImageDataModule(
        rows,
        classes,
        build_train_transform(params.augment, normalize=not on_device, seed=params.train.seed),
        build_eval_transform(params.augment, normalize=not on_device),
        channels=params.data.channels,
        max_pixels=params.data.max_pixels,
        batch_size=params.train.batch_size,
        num_workers=resolve_num_workers(train.num_workers, plan.devices if plan else 1),
        balanced_sampler=train.class_balance == "sampler",
        task_classes=task_classes,
        cache_dir=str(Path(params.run.cache_dir)) if params.data.cache else None,
        cache_side=eval_resize_side(params.augment),
        pin_memory=accelerator == "cuda" if train.pin_memory == "auto" else train.pin_memory,
        persistent_workers=train.persistent_workers,
        prefetch_factor=train.prefetch_factor,
        normalize=(params.augment.mean, params.augment.std) if on_device else None,
        index_train=index_train,
        multilabel=_multilabel(params),
        in_memory=_in_memory(params, accelerator),
    )


def _in_memory(params: PipelineParams, accelerator: str) -> dict:
    """The in-memory train split's settings for ImageDataModule (components.data.in_memory): the mode, the budget,
    the batched train transform and its seed; `device` serves loops without a Lightning trainer."""
    from components.data.batch_augment import BatchAugment

    data = params.data
    return {
        "in_memory": data.in_memory,
        "memory_budget_mb": data.memory_budget_mb,
        "augment": BatchAugment(params.augment),
        "seed": params.train.seed,
        "device": "cuda" if accelerator == "cuda" else "cpu",
    }


def build_trainer(
    spec: FitSpec,
    logger: MLFlowLogger | bool,
    accumulate_grad_batches: int = 1,
    plan: DevicePlan | None = None,
    extra_callbacks: list[Callback] | None = None,
) -> tuple[L.Trainer, ModelCheckpoint]:
    """A Lightning Trainer configured from the spec's params (devices from `plan` when given; SyncBatchNorm when
    more than one CUDA process trains under DDP: PyTorch's SyncBatchNorm has no CPU kernel, and on CPUs DDP
    broadcasts rank zero's BatchNorm buffers instead); returns it and its checkpoint callback."""
    params = spec.params
    devices = plan.devices if plan else params.trainer.devices
    sync_batchnorm = (
        params.trainer.sync_batchnorm
        and plan is not None
        and plan.world_size > 1
        and plan.accelerator == "cuda"
        and params.trainer.strategy != "fsdp"
    )
    directory = Path(spec.run_dir) / "checkpoints"
    monitored = "val/map" if _multilabel(params) else "val/acc"  # multi-label: the best macro average precision
    checkpoint = ModelCheckpoint(
        dirpath=directory, filename="best", monitor=monitored, mode="max", enable_version_counter=False
    )
    # Lightning's save_last only writes when the best changes; resume needs every epoch.
    last = ModelCheckpoint(dirpath=directory, filename="last", monitor=None, enable_version_counter=False)
    # extra callbacks first: their epoch-end collectives (training/margins.py) must come before EpochSummary's
    # rank-zero-only read of the epoch metrics, which syncs them on rank zero alone
    callbacks: list[Callback] = [*(extra_callbacks or []), checkpoint, last, EpochThroughput(), EpochSummary()]
    if params.train.freeze_backbone_epochs:
        callbacks.append(FreezeBackbone(params.train.freeze_backbone_epochs))
    if params.train.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitored, mode="max", patience=params.train.early_stopping_patience))
    from components.tuning.pruning import trial_callbacks

    # a trial of `visionflow tune`: report the metric per epoch, stop when pruned
    callbacks += trial_callbacks(monitored)
    trainer = L.Trainer(
        max_epochs=params.train.max_epochs,
        accelerator=params.trainer.accelerator,
        devices=devices,
        strategy=params.trainer.strategy,
        num_nodes=params.trainer.num_nodes,
        precision=params.trainer.precision,
        sync_batchnorm=sync_batchnorm,
        logger=logger,
        callbacks=callbacks,
        accumulate_grad_batches=accumulate_grad_batches,
        enable_progress_bar=spec.progress_bar,
        enable_model_summary=False,
        default_root_dir=spec.run_dir,
        plugins=checkpoint_plugins(params.trainer),
    )
    return trainer, checkpoint


class WaitingAsyncCheckpointIO(AsyncCheckpointIO):
    """Lightning's AsyncCheckpointIO (the tensors are copied on the training thread, then serialised and written by
    a background thread while training goes on; the trainer's teardown waits for the last write), except that a load
    or a removal first waits for the writes in flight: the Tuner saves a checkpoint and restores it a few steps
    later. Device tensors come to host memory on the training thread, where Lightning's would copy them on the
    device: that would need the checkpoint's size again in GPU memory, which a batch size found by the Tuner may
    not leave."""

    def save_checkpoint(self, checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        on_host = apply_to_collection(checkpoint, torch.Tensor, lambda t: t if t.device.type == "cpu" else t.cpu())
        super().save_checkpoint(on_host, *args, **kwargs)  # copies the host tensors: training goes on changing them

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.teardown()  # waits for the pending writes (and raises a failed one's error); the next save restarts it
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.teardown()
        super().remove_checkpoint(*args, **kwargs)


def checkpoint_plugins(trainer: TrainerParams) -> list:
    """The trainer's checkpoint writer: WaitingAsyncCheckpointIO with trainer.async_checkpoints, but not under FSDP,
    which writes its sharded checkpoints itself."""
    if not trainer.async_checkpoints or trainer.strategy == "fsdp":
        return []
    return [WaitingAsyncCheckpointIO()]


# MLflow's asynchronous logging thread polls its queue with a 1-s timeout unless it buffers; buffering, it waits
# on its stop event instead, so the flush that ends a fit (the logger's set_terminated) returns at once (0.05 s
# against 0.95 s measured). Metrics still carry the time they were logged at; they reach the store up to 1 s later.
# MLflow reads the value as an int (a float stops its logging thread, and a flush then waits forever).
ASYNC_LOGGING_ENV = {"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1"}


def async_logger(experiment: str, tracking_uri: str | None, run_id: str) -> MLFlowLogger:
    """Lightning's MLflow logger for the run `run_id`, asynchronous (a metric write, an SQLite transaction or an
    HTTP call, must not stall the step), with ASYNC_LOGGING_ENV where the environment does not set it or sets a
    value MLflow cannot read (said in one line)."""
    for key, value in ASYNC_LOGGING_ENV.items():
        given = os.environ.setdefault(key, value)
        if not given.strip().isascii() or not given.strip().isdigit():
            # int() fails on "0.5" (MLflow's logging thread stops) and reads "-1" (it would spin without waiting)
            print(f"[visionflow] {key}={given} is not a whole number of seconds ≥ 0 (MLflow's logging would stop "
                  f"or spin): {value} used", flush=True)  # fmt: skip
            os.environ[key] = value
    return MLFlowLogger(experiment_name=experiment, tracking_uri=tracking_uri, run_id=run_id, synchronous=False)


def finish_system_metrics(monitor) -> None:
    """Stop MLflow's system-metrics monitor and publish the samples it took since its last publication
    (MLflow drops them, so a training shorter than one sampling interval would log none)."""
    monitor.finish()
    pending = monitor.aggregate_metrics()
    if pending:
        monitor.publish_metrics(pending)
        monitor.mlflow_logger.flush()


def require_resolved(params: PipelineParams) -> None:
    """Refuse params that still hold `auto` (one line naming them): the plan resolves them before training."""
    unresolved = unresolved_fields(params) + (["train.lr"] if params.train.lr == "auto" else [])
    if unresolved:
        raise VisionflowError(
            f"params still set to auto reached the training process ({', '.join(unresolved)}): resolve them with "
            "components.planning (the pipeline's plan task does)"
        )


def fit(spec: FitSpec) -> FitResult:
    """Train the model the spec describes; returns the FitResult (also written to spec.result_path by rank 0)."""
    params = spec.params
    plan = plan_devices(params.trainer)
    require_resolved(params)
    L.seed_everything(params.train.seed, workers=True, verbose=False)
    rows = read_manifest(spec.manifest_path)
    task_classes = task_classes_of(rows, params)
    if params.train.optimizer == "gd":
        accumulate = gd_accumulation(rows, params, plan.world_size)
    else:
        accumulate = params.trainer.accumulate_grad_batches
    effective_batch = effective_batch_size(params, plan, accumulate)
    lr = scaled_lr(params, effective_batch)
    module = ClassifierModule(
        spec=model_spec_from_params(params, len(spec.classes), task_classes).model_dump(),
        optim={**params.train.model_dump(), "lr": lr},
        classes=spec.classes,
        augment=params.augment.model_dump(),
        class_weights=class_weights(rows, spec.classes) if params.train.class_balance == "loss" else None,
        task_classes=task_classes,
        task_weights=params.multitask.loss_weights,
        task=params.data.task,
        pos_weight=positive_weights(rows, spec.classes)
        if _multilabel(params) and params.train.pos_weight == "auto"
        else None,
    )
    data = datamodule_from_params(params, rows, spec.classes, task_classes, plan, params.train.suspicious_labels)
    run_id = spec.mlflow_run_id or os.environ.get("MLFLOW_RUN_ID")
    logger = async_logger(params.run.experiment, spec.tracking_uri, run_id) if run_id else False
    train_rows = [row for row in rows if row["split"] == "train"]
    # A margin (given label's logit minus the largest other) needs one label per image: none for multi-label.
    margins = MarginRecorder(len(train_rows)) if params.train.suspicious_labels and not _multilabel(params) else None
    trainer, checkpoint = build_trainer(spec, logger, accumulate, plan, [margins] if margins else None)
    last = Path(spec.run_dir) / "checkpoints" / "last.ckpt"
    resume_from = str(last) if params.train.resume and last.is_file() else None
    if params.train.find and resume_from is None:
        effective_batch, lr = find_batch_and_lr(trainer, module, data, params, plan.world_size, accumulate, logger)
    _announce(trainer, logger, params, plan, accumulate, effective_batch, lr, data.batch_size)
    monitor = None
    if run_id and trainer.is_global_zero:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=2, tracking_uri=spec.tracking_uri)
        monitor.start()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
        suspicious = report_suspicious_labels(margins, spec, train_rows, logger) if trainer.is_global_zero else None
    finally:
        if monitor is not None:
            finish_system_metrics(monitor)
        if logger:
            import mlflow

            mlflow.flush_async_logging()
    best_score = checkpoint.best_model_score
    return FitResult(
        best_checkpoint=checkpoint.best_model_path or None,
        last_checkpoint=str(last) if last.is_file() else None,
        best_val_acc=float(best_score) if best_score is not None else None,
        epochs=trainer.current_epoch,
        final_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
        global_rank=trainer.global_rank,
        world_size=trainer.world_size,
        effective_batch_size=effective_batch,
        lr=lr,
        weights_sha256=state_dict_sha256(module),
        suspicious_labels=suspicious,
    )


def report_suspicious_labels(
    margins: MarginRecorder | None, spec: FitSpec, train_rows: list[ManifestRow], logger: MLFlowLogger | bool
) -> SuspiciousLabels | None:
    """Rank zero: write the suspicious-label ranking into the run directory, log it to the MLflow run (artifacts
    under suspicious_labels/, metric train/suspicious_labels) and print its summary line. A failure to write it
    (an image that no longer decodes, a full disk) is printed and leaves the training's result as it is."""
    if margins is None:
        return None
    params = spec.params
    try:
        found = write_suspicious_labels(
            margins,
            train_rows,
            spec.classes,
            Path(spec.run_dir),
            params.train.suspicious_top_k,
            params.data.channels,
            params.data.max_pixels,
        )
    except Exception as err:  # a report, never a reason to lose the trained model
        print(f"[visionflow] suspicious labels not written: {type(err).__name__}: {err}", flush=True)
        return None
    print(f"[visionflow] {found.summary}", flush=True)
    if logger:
        client = logger.experiment
        for path in (found.csv, found.grid):
            if path:
                client.log_artifact(logger.run_id, path, "suspicious_labels")
        client.log_metric(logger.run_id, "train/suspicious_labels", found.flagged)
    return found


def _announce(trainer, logger, params, plan: DevicePlan, accumulate: int, effective_batch: int, lr: float, batch: int):
    """Rank zero prints the processes, effective batch and lr, and logs them as params."""
    if not trainer.is_global_zero:
        return
    rule = _lr_rule(params, effective_batch) if "lr" not in params.train.find else f"found by lr_find: {lr:g}"
    print(
        f"[visionflow] {plan.world_size} process(es) on {plan.accelerator} ({plan.launcher or 'no launcher'}), "
        f"effective batch {effective_batch} = {batch} × {plan.world_size} × {accumulate} accumulated; "
        f"lr {lr:g} ({rule})",
        flush=True,
    )
    if logger:
        scale = {
            "trainer.world_size": plan.world_size,
            "trainer.effective_batch_size": effective_batch,
            "train.lr_effective": lr,
            "train.lr_rule": rule,
        }
        from mlflow.entities import Param

        try:  # synchronous: a refused batch is caught here, and no metric shares its fate in the logging queue
            logger.experiment.log_batch(logger.run_id, params=[Param(k, str(v)) for k, v in scale.items()])
        except Exception as err:  # MLflow params are immutable: a resume on other devices keeps the first values
            print(
                f"[visionflow] note: batch/lr params of the first attempt kept in MLflow ({type(err).__name__})",
                flush=True,
            )


def find_batch_and_lr(trainer, module, data, params, world_size: int, accumulate: int, logger) -> tuple[int, float]:
    """Lightning's Tuner for what the plan left to it (train.find): scale_batch_size (power mode, from
    train.batch_size up to train.batch_size_max) and lr_find. Prints the found values, logs them as tuner.* params
    and the lr-finder curve as a figure. Returns (effective batch size, lr). Refuses (one line) under DDP, which
    Lightning's batch-size tuner does not support, rather than hang."""
    from lightning.pytorch.tuner import Tuner

    if world_size > 1:
        raise VisionflowError(
            f"train.find ({', '.join(params.train.find)}) runs Lightning's Tuner, which needs one training process "
            f"(this one has {world_size}); set train.batch_size and train.lr to numbers for DDP"
        )
    tuner, found = Tuner(trainer), {}
    if "batch_size" in params.train.find:
        found["tuner.batch_size"] = tuner.scale_batch_size(
            module,
            datamodule=data,
            mode="power",
            init_val=params.train.batch_size,
            max_val=params.train.batch_size_max,
            steps_per_trial=3,
        )
        data.batch_size = found["tuner.batch_size"]
    lr = float(module.optim["lr"])
    if "lr" in params.train.find:
        finder = tuner.lr_find(module, datamodule=data, min_lr=1e-6, max_lr=1.0, num_training=100, update_attr=False)
        suggestion = lr_from_curve(finder.results) if finder is not None else None
        if not suggestion and trainer.is_global_zero:
            print(f"[visionflow] lr_find's curve gave no suggestion; lr stays {lr:g}", flush=True)
        lr = float(suggestion) if suggestion else lr
        module.optim["lr"] = module.hparams["optim"]["lr"] = lr
        found["tuner.lr"] = lr
        if logger and finder is not None and trainer.is_global_zero:
            logger.experiment.log_figure(logger.run_id, finder.plot(suggest=True), "tuner/lr_find.png")
    if trainer.is_global_zero:
        print(f"[visionflow] tuner found {', '.join(f'{k[6:]} {v:g}' for k, v in found.items())}", flush=True)
        if logger:
            logger.log_hyperparams(found)
    return data.batch_size * world_size * accumulate, lr


def lr_from_curve(results: dict[str, list[float]], skip_begin: int = 10, skip_end: int = 5) -> float | None:
    """The learning rate a finder curve suggests: a tenth of the rate at the lowest smoothed loss, leaving out
    the first points (the smoothing's start-up: on the digits the first point read 1.16 where the loss was 2.3)
    and the last (where the loss blows up); None for a curve too short or without a finite loss. Lightning's own
    pick (the steepest descent) swung between 1.4e-5 and 7.6e-4 on the digits, where 2e-3 trains to 0.99."""
    import math

    lrs, losses = results.get("lr", []), results.get("loss", [])
    candidates = [i for i in range(skip_begin, len(losses) - skip_end) if math.isfinite(losses[i])]
    if not candidates:
        return None
    best = min(candidates, key=lambda i: losses[i])
    return float(lrs[best]) / 10


def _lr_rule(params: PipelineParams, effective_batch: int) -> str:
    train = params.train
    if train.lr_scaling == "none":
        return f"no scaling: lr {train.lr:g}"
    factor = "×" if train.lr_scaling == "linear" else "× sqrt"
    return f"{train.lr_scaling}: {train.lr:g} {factor}({effective_batch}/{train.lr_base_batch_size})"


def state_dict_sha256(module: torch.nn.Module | Mapping[str, Any]) -> str:
    """sha256 over a module's state_dict, or a checkpoint's (names, dtypes, shapes and bytes of every tensor, in key
    order)."""
    digest = hashlib.sha256()
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    for name, tensor in sorted(state.items()):
        if isinstance(tensor, torch.Tensor):
            value = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}\n".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fit_in_process(
    module: L.LightningModule, params: PipelineParams, rows: list[ManifestRow], classes: list[str], epochs: int
) -> L.Trainer:
    """Train `module` for `epochs` on the manifest rows' train/val splits in this process (one device,
    no logger, no checkpoints): for short fine-tuning and distillation runs. Returns the Trainer.
    train.num_workers "auto" means 0 here: this runs inside the flow's process, which should not fork workers."""
    L.seed_everything(params.train.seed, workers=True, verbose=False)
    if params.train.num_workers == "auto":
        params = params.model_copy(update={"train": params.train.model_copy(update={"num_workers": 0})})
    data = datamodule_from_params(params, rows, classes)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=params.trainer.accelerator,
        devices=1,
        precision=params.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def _global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _is_rank_zero() -> bool:
    return (
        int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
        and int(os.environ.get("NODE_RANK", "0")) == 0
    )


def main(argv: list[str] | None = None) -> int:
    """Run `fit` on the spec file named by argv[0]; returns the exit code (0 ok, 3 a reported error)."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(LOG_FILE_ENV):  # started by the CLI: third-party noise to its log file, not the terminal
        route_output(os.environ[LOG_FILE_ENV], verbose=os.environ.get(VERBOSE_ENV) == "1")
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
    rank = result.global_rank if result.error is None else _global_rank()
    if rank == 0 and _is_rank_zero():
        Path(spec.result_path).write_text(result.model_dump_json(indent=2))
    elif spec.rank_results:
        Path(f"{spec.result_path}.rank{rank}").write_text(result.model_dump_json(indent=2))
    return code


if __name__ == "__main__":
    from components.fast_exit import exit_now

    exit_now(main())  # the result, checkpoints and MLflow queue are written: skip Python's module teardown
