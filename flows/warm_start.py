"""Fixed costs paid while other work goes on: Prefect's temporary server and the training process's imports.

- `early_start()`: the CLI's `run` / `resume` call it before importing the pipeline's modules. Without a
  PREFECT_API_URL, Prefect's temporary server starts in a thread (its own process does the work); a training
  process starts and imports torch, Lightning and MLflow (components/training/warm.py). `wait_for_server()`
  joins the thread before the flow asks Prefect for a client.
- `prestart_training_process()`: the pipeline flow calls it first, so callers that skip the CLI (a deployment,
  a sweep's subflows, the tests) get the same head start over ingest, validate, plan and the preview.
- `training_process(spec_path, env)`: the train task's process. The waiting one is handed the spec and `env` when
  it was started in the same directory with the same environment (MLFLOW_RUN_ID, Prefect's per-run variables
  aside, which it takes from `env`); otherwise it is closed and `python -m components.training.fit SPEC` starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

# Variables that may change between the start of the waiting process and the hand-over: the run's own, and those
# the flow's imports set in its environment (cv2, Lightning, MLflow), which the waiting process's imports set too.
_HANDED_OVER = (
    "MLFLOW_RUN_ID",
    "MLFLOW_TRACKING_URI",
    "PYTHONUNBUFFERED",
    "LD_LIBRARY_PATH",
    "PYTORCH_NVML_BASED_CUDA_CHECK",
    "TORCHINDUCTOR_CACHE_DIR",
    "_MLFLOW_TELEMETRY_SESSION_ID",
    # scikit-learn's import sets these two (the bundled digits are read with it, on a fresh snapshot only); they
    # steer OpenMP's start, long done in the waiting process: without them here every first run started anew.
    "KMP_DUPLICATE_LIB_OK",
    "KMP_INIT_AT_FORK",
)
_HANDED_OVER_PREFIXES = ("PREFECT__",)


@dataclass
class _Waiting:
    process: subprocess.Popen
    env: dict[str, str]
    cwd: str


_log = logging.getLogger(__name__)
_lock = threading.Lock()
_waiting: _Waiting | None = None
_server_thread: threading.Thread | None = None


def changed_variables(waiting: dict[str, str], env: dict[str, str]) -> list[str]:
    """The variables (sorted) that differ between a waiting process's environment and a run's, leaving out those
    handed over with the spec."""
    names = {*waiting, *env} - set(_HANDED_OVER)
    return sorted(k for k in names if not k.startswith(_HANDED_OVER_PREFIXES) and waiting.get(k) != env.get(k))


def prestart_training_process() -> None:
    """Start a training process that imports what training needs and waits for its spec (no-op when one waits)."""
    global _waiting
    env = dict(os.environ)
    with _lock:
        if _waiting is not None and _waiting.process.poll() is None:
            return
        process = subprocess.Popen(
            [sys.executable, "-m", "components.training.warm"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        _waiting = _Waiting(process, env, os.getcwd())


def discard_training_process() -> None:
    """Close the waiting process's stdin (it exits once its imports are done)."""
    global _waiting
    with _lock:
        waiting, _waiting = _waiting, None
    if waiting is not None:
        _close(waiting.process)


def _close(process: subprocess.Popen) -> None:
    try:
        if process.stdin:
            process.stdin.close()
    except OSError:
        pass


def _hand_over(process: subprocess.Popen, spec_path: Path, env: dict[str, str]) -> bool:
    """Send the waiting process its order (components.training.warm); False when it is gone meanwhile."""
    try:
        assert process.stdin is not None
        process.stdin.write((json.dumps({"spec": str(spec_path), "env": env}) + "\n").encode())
        process.stdin.close()
    except OSError:
        return False
    return True


def training_process(spec_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """A training process for the spec at `spec_path` with environment `env`, its output on a pipe: the waiting
    one when it matches (same directory, same environment but for the handed-over variables), else a new one."""
    global _waiting
    with _lock:
        waiting, _waiting = _waiting, None
    if waiting is not None:
        changed = changed_variables(waiting.env, env)
        same_place = waiting.cwd == os.getcwd()
        usable = waiting.process.poll() is None and same_place and not changed
        if usable and _hand_over(waiting.process, spec_path, env):
            return waiting.process
        _log.info("training process started anew (the waiting one: exit code %s, same directory %s, variables "
                  "changed %s)", waiting.process.poll(), same_place, changed)  # fmt: skip
        _close(waiting.process)
    return subprocess.Popen(
        [sys.executable, "-m", "components.training.fit", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _start_server(server) -> None:
    # A terminal's Ctrl-C signals the whole foreground process group. The server's process is started from this
    # thread with SIGINT blocked (a child keeps the mask across exec), so it outlives Ctrl-C and the flow can still
    # record the interruption; Prefect stops it with SIGTERM when this process exits.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start()
    except Exception:  # not up in time: stop its process; the flow's own start tries again and reports
        server.stop()


def early_start() -> None:
    """Start Prefect's temporary server (when no API URL is set) and a waiting training process, both in the
    background; call before importing the pipeline's modules, and wait_for_server() before the flow."""
    global _server_thread
    prestart_training_process()
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not settings.api.url and settings.server.ephemeral.enabled and _server_thread is None:
        # Imported here, not in the thread: two threads importing Prefect's modules at once could meet a
        # partly initialised module. The thread only starts the server's process and polls its health.
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        _server_thread = threading.Thread(target=_start_server, args=(server,), name="prefect-server", daemon=True)
        _server_thread.start()


def wait_for_server() -> None:
    """Wait until the temporary server early_start() began is up (or failed to start)."""
    if _server_thread is not None:
        _server_thread.join()
