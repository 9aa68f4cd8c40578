"""A training process started before its spec exists: `python -m components.training.warm`.

The pipeline starts it while the stages before training run (flows/warm_start.py), so the seconds spent importing
torch, Lightning and MLflow are off the train stage's path. It imports the training entry point
(`components.training.fit`) and the MLflow modules training uses, then reads JSON lines on stdin.

- A call order (`answer_call`) runs a component function here, where its imports are done, and sends its result
  back through a file: the pipeline draws the augmentation preview this way while it waits to train.
- The order to train, `{"spec": PATH, "env": {NAME: VALUE, ...}}`, is the last line. The process takes that
  environment as its own (the one a process started for the spec would get), names the spec in `sys.argv` and
  runs `components.training.fit.main`: from there on it is the process `python -m components.training.fit PATH`
  would be. Lightning's DDP launcher re-runs `sys.argv`, so its other ranks start as
  `python -m components.training.warm PATH` and train at once.
- Stdin closed before that line (its pipeline's process died): exit 0. A pipeline that ends before training stops
  it (SIGTERM): it holds no work.

Rank zero writes `process_timings.json` beside the spec: when the process started, when its imports were done,
when it read the spec and when training returned (epoch seconds), for bench/train_overhead.py.
"""

from __future__ import annotations

import base64
import gc
import importlib
import json
import os
import pickle
import signal
import sys
import time
from pathlib import Path

TIMINGS_FILE = "process_timings.json"
# printed alone on a line once a fit that serves afterwards is done (the train task stops relaying there)
SERVING_LINE = "[visionflow-serving]"


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


def answer_call(order: dict) -> None:
    """Run one call order, `{"call": "module:function", "args": base64 pickle of (args, kwargs), "reply": PATH}`,
    and write the pickle of `("ok", result)` or `("error", exception)` to PATH (atomically: the caller waits
    for the file). An exception that does not survive pickling comes back as a VisionflowError (one of ours) or a
    RuntimeError with its name and message."""
    module_name, _, name = order["call"].partition(":")
    try:
        args, kwargs = pickle.loads(base64.b64decode(order["args"]))
        answer = ("ok", getattr(importlib.import_module(module_name), name)(*args, **kwargs))
    except Exception as err:  # noqa: BLE001 - the caller raises it as its own
        answer = ("error", err)
    try:
        data = pickle.dumps(answer)
        pickle.loads(data)
    except Exception:  # noqa: BLE001 - an unpicklable result or exception: its message, as the same kind of error
        from components.errors import VisionflowError

        kind = VisionflowError if isinstance(answer[1], VisionflowError) else RuntimeError
        data = pickle.dumps(("error", kind(f"{type(answer[1]).__name__}: {answer[1]}"[:2000])))
    reply = Path(order["reply"])
    partial = reply.with_name(reply.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, reply)


def read_order(stream=None) -> dict | None:
    """Answer call orders (answer_call) until the order to train, `{"spec": PATH, "env": {...}, "serve": BOOL}`,
    and return it; None when `stream` (stdin) closes first."""
    stream = stream or sys.stdin
    while line := stream.readline().strip():
        order = json.loads(line)
        if "call" not in order:
            return order
        answer_call(order)
    return None


def _serve_after_fit(spec_path: str) -> None:
    """After a single-process fit that succeeded: say so on stdout (SERVING_LINE: the train task stops relaying
    there and the train stage ends) and answer call orders until stdin closes (the evaluate stage runs here, on
    what is already imported). A DDP rank zero does not serve: its process group is torn down with the fit."""
    from components.training.spec import FitResult, FitSpec

    spec = FitSpec.model_validate_json(Path(spec_path).read_text())
    result = Path(spec.result_path)
    if not result.is_file() or FitResult.model_validate_json(result.read_text()).world_size != 1:
        return
    # The fit's Trainer, data module and optimizer sit in reference cycles: freed now, not at some later collection,
    # so an in-memory training set (up to its memory budget, on the GPU there) is not held through the evaluation.
    gc.collect()
    # A terminal's Ctrl-C reaches the whole process group: the pipeline handles it and then closes this process's
    # stdin (or stops it), so it ends without a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, (SERVING_LINE + "\n").encode())
    read_order()


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
    spec_path, env = str(order["spec"]), {str(k): str(v) for k, v in order["env"].items()}
    timings["spec_read"] = time.time()
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [sys.argv[0], spec_path]
    from components.training import fit

    code = fit.main([spec_path])
    timings["returned"] = time.time()
    if fit._is_rank_zero():
        Path(spec_path).with_name(TIMINGS_FILE).write_text(json.dumps(timings, indent=2))
        if code == 0 and order.get("serve"):
            _serve_after_fit(spec_path)
    return code


if __name__ == "__main__":
    from components.fast_exit import exit_now

    exit_now(main())  # the result, checkpoints and MLflow queue are written: skip Python's module teardown
