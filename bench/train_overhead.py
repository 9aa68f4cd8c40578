"""Overhead of the visionflow train stage against a plain PyTorch loop.

Same data (the default params' data set), model, transforms, epochs and batch size; early stopping
off so both do the same number of epochs. Prints a table of wall times and the ratio.

    python bench/train_overhead.py [--params params/default.yaml] [--set train.max_epochs=10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from components.quiet import set_offline_defaults  # noqa: E402 - before prefect / mlflow / albumentations

set_offline_defaults()
for key, value in {
    # Prefect's 20 s default for its temporary server is too short on a loaded machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(key, value)

import torch
from rich.console import Console
from rich.table import Table

from components.config import load_params
from components.data.ingest import ingest, read_manifest
from components.data.validate import validate
from components.models import build_model
from components.training.fit import datamodule_from_params, model_spec_from_params


def plain_loop(params, manifest: str, classes: list[str]) -> float:
    """Train with a hand-written loop (train + val pass per epoch); returns wall seconds.

    The image cache is built before the clock starts (the pipeline, run next, then finds it built
    too); the loaders are made once, as Lightning makes them, so their persistent workers start
    once and not every epoch."""
    torch.manual_seed(params.train.seed)
    data = datamodule_from_params(params, read_manifest(manifest), classes)
    data.prepare_data()
    model = build_model(model_spec_from_params(params, len(classes)))
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
    for _ in range(params.train.max_epochs):
        model.train()
        for batch in train_loader:
            x, y = data.normalize_batch(batch)  # uint8 batches are normalised after loading, as in training
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for batch in val_loader:
                model(data.normalize_batch(batch)[0])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/default.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="visionflow-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    params = load_params(
        args.params,
        [
            "train.early_stopping_patience=0",
            "train.progress_bar=false",
            "augment.preview_images=0",
            "package.enabled=false",
            f"run.output_dir={work / 'runs'}",
            "run.experiment=bench-train-overhead",
            *args.set,
        ],
    )
    snapshot = ingest(params.data, work / "snapshot", Path(params.run.cache_dir))
    report = validate(snapshot, params.data, work / "data")
    plain = plain_loop(params, report.clean_manifest_path, snapshot.classes)
    print(f"plain PyTorch loop: {plain:.1f} s", flush=True)

    from components import tracking
    from flows.pipeline import pipeline

    start = time.perf_counter()
    result = pipeline(params)
    whole = time.perf_counter() - start
    train_run = tracking.get_run(result.train_run_id).info
    stage = (train_run.end_time - train_run.start_time) / 1000

    table = Table(
        title=(
            f"train overhead: {params.model.name}, {params.train.max_epochs} epochs, "
            f"batch {params.train.batch_size}, {os.cpu_count()} CPUs"
        )
    )
    for column in ("what", "wall s", "× plain loop"):
        table.add_column(column)
    table.add_row("plain PyTorch loop (train + val passes)", f"{plain:.1f}", "1.00")
    table.add_row("visionflow train stage (process, Lightning, MLflow)", f"{stage:.1f}", f"{stage / plain:.2f}")
    table.add_row("whole visionflow pipeline (Prefect, ingest..evaluate)", f"{whole:.1f}", f"{whole / plain:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
