"""What the train task and the training process exchange: the spec written before training and the result read
after it (plain pydantic models: importing them imports neither torch nor Lightning)."""

from __future__ import annotations

from pydantic import BaseModel

from components.config import PipelineParams


class SuspiciousLabels(BaseModel):
    """The ranking the training process wrote (rank zero): files, counts and a one-line summary."""

    csv: str
    grid: str | None = None
    flagged: int  # training images whose AUM and last epoch's margin are both below 0
    scored: int  # training images with at least one unmixed visit
    summary: str
    seconds: float = 0.0  # spent in the training process recording margins and writing the ranking (rank zero)
    record_seconds: float = 0.0  # of which recording margins during training (the per-step hooks and epoch sums)


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
    rank_results: bool = False  # every rank > 0 also writes its FitResult to <result_path>.rank<N> (tests, debugging)


class FitResult(BaseModel):
    """What the training process reports back (rank zero)."""

    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    best_val_acc: float | None = None
    epochs: int = 0
    final_metrics: dict[str, float] = {}
    error: str | None = None
    global_rank: int = 0
    world_size: int = 1
    effective_batch_size: int | None = None
    lr: float | None = None
    weights_sha256: str | None = None  # of this rank's final state_dict
    suspicious_labels: SuspiciousLabels | None = None  # train.suspicious_labels: the ranking's files and counts
