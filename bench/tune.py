"""Search against grid on the bundled digits: the same number of trials as a grid sweep over the same space
and as `visionflow tune` (TPE + median pruning); best validation accuracy, the test accuracy of that best
run, wall time and epochs trained for each, and the time pruning saved; prints one table.

    python bench/tune.py [--trials 6] [--epochs 6]

The space: train.lr on a log scale and the optimizer (the grid takes evenly spaced log levels of lr times
every optimizer). Both run in this process, one trial after another, with a temporary MLflow store.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_TMP = Path(tempfile.mkdtemp(prefix="visionflow-bench-tune-"))
for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "MLFLOW_TRACKING_URI": f"sqlite:///{_TMP / 'mlflow.db'}",
}.items():
    os.environ.setdefault(key, value)

from rich.console import Console
from rich.table import Table

from components import tracking
from components.config import load_params

SPACE = {
    "study": "bench-digits",
    "pruner": "median",
    "warmup_epochs": 2,
    "startup_trials": 2,
    "seed": 0,
    "params": {
        "train.lr": {"low": 0.00001, "high": 0.05, "log": True},
        "train.optimizer": {"choices": ["sgd", "adam"]},
    },
}


def _base_sets(epochs: int) -> list[str]:
    return [
        f"train.max_epochs={epochs}",
        "train.early_stopping_patience=0",
        "train.progress_bar=false",
        "package.enabled=false",
        "run.experiment=bench-tune",
        f"run.output_dir={_TMP / 'runs'}",
        f"run.cache_dir={_TMP / 'cache'}",
    ]


def _grid(trials: int) -> list[list[str]]:
    optimizers = SPACE["params"]["train.optimizer"]["choices"]
    levels = max(1, math.ceil(trials / len(optimizers)))
    low, high = SPACE["params"]["train.lr"]["low"], SPACE["params"]["train.lr"]["high"]
    lrs = [low * (high / low) ** (i / max(1, levels - 1)) for i in range(levels)] if levels > 1 else [high]
    combos = [[f"train.lr={lr:.6g}", f"train.optimizer={opt}"] for lr, opt in itertools.product(lrs, optimizers)]
    return combos[:trials]


def _train_metrics(run_id: str) -> tuple[float, float]:
    train = tracking.get_run(tracking.child_run(run_id, "train"))
    return train.data.metrics.get("best_val_acc", float("nan")), train.data.metrics.get("epochs", float("nan"))


def run_grid(trials: int, epochs: int) -> dict:
    from flows.pipeline import pipeline

    start, best, epochs_total = time.perf_counter(), (-1.0, float("nan")), 0.0
    for combo in _grid(trials):
        result = pipeline(load_params("params/default.yaml", [*_base_sets(epochs), *combo]))
        val, trained = _train_metrics(result.run_id)
        epochs_total += trained
        if val > best[0]:
            best = (val, result.metrics.get("test/accuracy", float("nan")))
    return {"wall": time.perf_counter() - start, "val": best[0], "test": best[1], "epochs": epochs_total}


def run_search(trials: int, epochs: int) -> dict:
    from flows.tune import STUDY_TAG, TRIAL_TAG, plan_tune, tune

    params_file, space_file = _TMP / "params.yaml", _TMP / "space.yaml"
    params_file.write_text(
        yaml.safe_dump(load_params("params/default.yaml", _base_sets(epochs)).model_dump(mode="json"))
    )
    space_file.write_text(yaml.safe_dump(SPACE))
    start = time.perf_counter()
    plan = plan_tune(str(params_file), [], str(space_file), trials, storage=f"sqlite:///{_TMP / 'optuna.db'}")
    result = tune(plan)
    wall = time.perf_counter() - start
    experiment = tracking.client().get_experiment_by_name("bench-tune").experiment_id
    runs = tracking.client().search_runs([experiment], filter_string=f"tags.`{STUDY_TAG}` = '{plan.study}'")
    epochs_total, test = 0.0, float("nan")
    for run in runs:
        if TRIAL_TAG not in run.data.tags:
            continue
        epochs_total += _train_metrics(run.info.run_id)[1]
        if run.data.tags[TRIAL_TAG] == str(result.best_trial):
            test = run.data.metrics.get("test/accuracy", float("nan"))
    pruned = result.trials.get("PRUNED", 0)
    return {"wall": wall, "val": result.best_value, "test": test, "epochs": epochs_total, "pruned": pruned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    grid = run_grid(args.trials, args.epochs)
    search = run_search(args.trials, args.epochs)
    per_epoch = grid["wall"] / max(grid["epochs"], 1)
    saved = (args.trials * args.epochs - search["epochs"]) * per_epoch
    table = Table(title=f"{args.trials} trials x {args.epochs} epochs on the bundled digits ({os.cpu_count()} CPUs)")
    for column in ("method", "best val acc", "test acc (best val run)", "wall s", "epochs trained", "pruned"):
        table.add_column(column)
    table.add_row(
        "grid sweep", f"{grid['val']:.4f}", f"{grid['test']:.4f}", f"{grid['wall']:.0f}", f"{grid['epochs']:.0f}", "-"
    )
    table.add_row(
        "tune (TPE + median pruner)",
        f"{search['val']:.4f}",
        f"{search['test']:.4f}",
        f"{search['wall']:.0f}",
        f"{search['epochs']:.0f}",
        str(search["pruned"]),
    )
    Console().print(table)
    print(f"pruning saved about {saved:.0f} s of training ({per_epoch:.1f} s per epoch in the grid, all included)")


if __name__ == "__main__":
    main()
