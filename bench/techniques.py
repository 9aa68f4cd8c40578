"""Train every model family and every optimizer on the bundled digits at fixed epochs; print a table.

All runs land in one MLflow experiment (`visionflow-techniques`) so they can be compared in the
MLflow UI. Each row is a full pipeline run (ingest → validate → train → evaluate; packaging off).

    python bench/techniques.py [--epochs 10] [--only cnn,vit]
"""

from __future__ import annotations

import argparse
import os
import time

from components.quiet import set_offline_defaults  # noqa: E402 - before prefect / mlflow / albumentations

set_offline_defaults()
for key, value in {
    # Prefect's 20 s default for its temporary server is too short on a loaded machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(key, value)

from rich.console import Console
from rich.table import Table

from components.config import load_params
from components.models import ModelSpec, build_model

RUNS = {
    # name: (params file, overrides)
    "cnn + adam": ("params/default.yaml", []),
    "cnn + adamw": ("params/default.yaml", ["train.optimizer=adamw", "train.weight_decay=0.01"]),
    "cnn + sgd": ("params/default.yaml", ["train.optimizer=sgd", "train.lr=0.05"]),
    "cnn + momentum (nesterov)": (
        "params/default.yaml",
        ["train.optimizer=momentum", "train.nesterov=true", "train.lr=0.05"],
    ),
    "cnn + gd (full batch)": ("params/gd.yaml", []),
    "cnn + all regularizers": ("params/regularized.yaml", []),
    "rnn (bi-GRU over rows)": ("params/rnn.yaml", []),
    "vit (4x4 patches)": ("params/vit.yaml", []),
    "resnet18": ("params/resnet18.yaml", []),
    "mobilenet_v3_small": (
        "params/resnet18.yaml",
        ["model.name=mobilenet_v3_small", "train.optimizer=adam", "train.lr=0.003", "train.scheduler=cosine"],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs for every run (gd gets 10x: one step per epoch)")
    parser.add_argument("--only", default="", help="comma-separated substrings of run names to keep")
    args = parser.parse_args()
    from flows.pipeline import pipeline

    table = Table(title=f"visionflow techniques on bundled digits ({args.epochs} epochs; {os.cpu_count()} CPUs)")
    for column in ("run", "test acc", "macro F1", "wall s", "parameters"):
        table.add_column(column)
    for name, (path, overrides) in RUNS.items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        full_batch = load_params(path, overrides).train.optimizer == "gd"
        epochs = args.epochs * 10 if full_batch else args.epochs
        params = load_params(
            path,
            [
                *overrides,
                f"train.max_epochs={epochs}",
                "train.early_stopping_patience=0",
                "train.progress_bar=false",
                "package.enabled=false",
                "run.experiment=visionflow-techniques",
                f"run.run_name={name}",
            ],
        )
        start = time.perf_counter()
        result = pipeline(params)
        wall = time.perf_counter() - start
        spec = ModelSpec(
            name=params.model.name,
            num_classes=10,
            in_channels=params.data.channels,
            image_size=params.augment.image_size,
            rnn=params.model.rnn,
            vit=params.model.vit,
        )
        n_params = sum(p.numel() for p in build_model(spec).parameters())
        table.add_row(
            name,
            f"{result.metrics['test/accuracy']:.4f}",
            f"{result.metrics['test/macro_f1']:.4f}",
            f"{wall:.0f}",
            f"{n_params:,}",
        )
        print(
            f"[techniques] {name}: test accuracy {result.metrics['test/accuracy']:.4f}, "
            f"macro F1 {result.metrics['test/macro_f1']:.4f}, {wall:.0f} s, {n_params:,} parameters",
            flush=True,
        )
    Console().print(table)


if __name__ == "__main__":
    main()
