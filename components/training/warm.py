"""A training process started before its spec exists: `python -m components.training.warm`.

The pipeline starts it while the stages before training run (flows/warm_start.py), so the seconds spent importing
torch, Lightning and MLflow are off the train stage's path. It imports the training entry point
(`components.training.fit`) and the MLflow modules training uses, then reads one JSON line on stdin:
`{"spec": PATH, "env": {NAME: VALUE, ...}}`. It takes that environment as its own (the one a process started
for the spec would get), names the spec in `sys.argv` and runs `components.training.fit.main`: from there on
it is the process `python -m components.training.fit PATH` would be. Lightning's DDP launcher re-runs
`sys.argv`, so its other ranks start as `python -m components.training.warm PATH` and train at once. Stdin
closed without a line (its pipeline's process died): exit 0. A pipeline that ends before training stops it
(SIGTERM): it holds no work.

Rank zero writes `process_timings.json` beside the spec: when the process started, when its imports were done,
when it read the spec and when training returned (epoch seconds), for bench/train_overhead.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

TIMINGS_FILE = "process_timings.json"


def preload() -> None:
    """Import what a training run imports, lazily or not (the expensive part of starting the process)."""
    import lightning.pytorch.loggers.mlflow  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")  # the suspicious-label grid is drawn at the end of training, headless
    import matplotlib.pyplot  # noqa: F401
    import mlflow  # noqa: F401
    import mlflow.system_metrics.system_metrics_monitor  # noqa: F401

    import components.training.fit  # noqa: F401 - torch, Lightning, the data, model and module code
    import components.tuning.pruning  # noqa: F401
    from components.tracking import tracking_uri

    if not tracking_uri().startswith(("http:", "https:", "databricks")):
        # the MLflow logger's store for a database URI (sqlite, postgresql): about 1 s of imports at the first epoch
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def read_order(stream=None) -> tuple[str, dict[str, str]] | None:
    """The spec path and environment of the one JSON line on `stream` (stdin), or None when it closes first."""
    line = (stream or sys.stdin).readline().strip()
    if not line:
        return None
    order = json.loads(line)
    return str(order["spec"]), {str(k): str(v) for k, v in order["env"].items()}


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def main(argv: list[str] | None = None) -> int:
    """Wait for the order (no argument) or train at once (a SPEC argument: a DDP rank); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        from components.training import fit

        return fit.main(argv)
    timings = {"process_start": _process_start()}
    preload()
    timings["imported"] = time.time()
    order = read_order()
    if order is None:
        return 0
    spec_path, env = order
    timings["spec_read"] = time.time()
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [sys.argv[0], spec_path]
    from components.training import fit

    code = fit.main([spec_path])
    timings["returned"] = time.time()
    if fit._is_rank_zero():
        Path(spec_path).with_name(TIMINGS_FILE).write_text(json.dumps(timings, indent=2))
    return code


if __name__ == "__main__":
    from components.fast_exit import exit_now

    exit_now(main())  # the result, checkpoints and MLflow queue are written: skip Python's module teardown
