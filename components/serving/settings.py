"""The model server's settings: one pydantic model whose defaults and descriptions are also the CLI's
(`visionflow serve` options). Kept light (pydantic only) so the CLI can read it without loading the server."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeSettings(BaseModel):
    """Limits and batching of the model server (extra keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        "127.0.0.1", description="Interface to bind (loopback by default; put a proxy with auth in front to share)."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    max_body_bytes: int = Field(10_000_000, gt=0, description="Largest request body; larger gets 413.")
    max_pixels: int = Field(
        40_000_000,
        gt=0,
        description="Largest image (width x height, read from the header before decoding); larger gets 413.",
    )
    max_images: int = Field(32, ge=1, description="Most images in one request; more gets 413.")
    top_k: int = Field(
        3,
        ge=1,
        description=(
            "Labels returned per image (clipped to the number of labels); a request may ask fewer or more with ?top_k=."
        ),
    )
    max_batch: int = Field(32, ge=1, description="Most images in one onnxruntime call (dynamic batching).")
    batch_timeout_ms: float = Field(
        5, ge=0, description="How long the batcher waits for more images after the first one."
    )
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (None = onnxruntime's default).")
    model_name: str | None = Field(
        None, description="Name shown by /metadata and /predict (default: the bundle folder's name)."
    )
    model_version: str | None = Field(
        None, description="Version shown by /metadata and /predict (e.g. the registry version)."
    )
    prediction_log_dir: str | None = Field(
        None, description="Folder of the prediction log read by `visionflow monitor` (None = no log)."
    )
    prediction_log_max_bytes: int = Field(
        10_000_000, ge=1024, description="Largest size of one prediction log file; the log rotates before passing it."
    )
    prediction_log_files: int = Field(
        5,
        ge=2,
        description="Most prediction log files kept (the current one included); the oldest is deleted on rotation.",
    )
    store_images: bool = Field(
        False,
        description=(
            "Also store each predicted image (PNG, base64) in the prediction log; off by default (privacy, size)."
        ),
    )
