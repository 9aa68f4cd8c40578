"""Fixed costs paid while other work goes on: Prefect's temporary server and the training process's imports.

- `early_start()`: the CLI's `run` / `resume` call it before importing the pipeline's modules. Without a
  Prefect API URL, Prefect's temporary server starts in its own process the way Prefect starts it (uvicorn on
  the server app, UI off, the temporary server's services) and this process then talks to it through
  PREFECT_API_URL, so it never imports the server's modules (2.4 s); a training process starts and imports torch,
  Lightning and MLflow (components/training/warm.py). `wait_for_server()` waits for the server's health before
  the flow asks Prefect for a client; a server that does not come up is stopped and Prefect's own start tries
  again and reports. The server is stopped when the command exits.
- `prestart_training_process()`: the pipeline flow calls it first, so callers that skip the CLI (a deployment,
  a sweep's subflows, the tests) get the same head start over ingest, validate, plan and the preview.
- `training_process(spec_path, env, serve)`: the train task's process. The waiting one is handed the spec and `env`
  when it was started in the same directory with the same environment (MLFLOW_RUN_ID, Prefect's per-run variables
  aside, which it takes from `env`); otherwise it is closed and `python -m components.training.fit SPEC` starts.
  With `serve`, after a single-process fit it answers calls (`keep_serving`) until `discard_training_process()`.
- `call("module:function", *args)`: a component function run in the training process (waiting, or serving after
  its fit) so this process never imports torch for it; here when there is none.
"""

from __future__ import annotations

import atexit
import base64
import importlib
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
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
    # set by early_start() for the temporary server (the training process does not talk to Prefect)
    "PREFECT_API_URL",
    "PREFECT_UI_URL",
)
_HANDED_OVER_PREFIXES = ("PREFECT__",)

# glibc's allocator for the training processes. By default it hands the activations' memory back to the kernel
# after every step and faults it in again, zeroed, on the next (4,000 page faults a step for the digits CNN at
# batch 64); a fixed mmap threshold of 32 MiB and a trim threshold of 256 MiB keep it for reuse (14 faults a step,
# about 0.8x the CPU time a step). Blocks over 32 MiB are still mapped afresh each time. A value set in the
# environment wins; other C libraries ignore these variables.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def process_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a training process: ALLOCATOR_ENV's variables where `env` does not set them."""
    return {**ALLOCATOR_ENV, **env}


@dataclass
class _Waiting:
    process: subprocess.Popen
    env: dict[str, str]
    cwd: str


_log = logging.getLogger(__name__)
_lock = threading.Lock()
_waiting: _Waiting | None = None
_serving: _Waiting | None = None  # a training process that finished its fit and answers calls
_server: subprocess.Popen | None = None  # the temporary server early_start() started


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
            env=process_env(env),
        )
        _waiting = _Waiting(process, env, os.getcwd())


def discard_training_process() -> None:
    """Stop the waiting process (never handed a spec: it only imports or waits) and the one serving calls after its
    fit (its work is done and answered)."""
    global _waiting, _serving
    with _lock:
        waiting, _waiting = _waiting, None
        serving, _serving = _serving, None
    for left in (waiting, serving):
        if left is not None:
            _close(left.process)


def keep_serving(process: subprocess.Popen) -> None:
    """`process` finished its fit and answers calls now (components.training.warm, SERVING_LINE): the next calls
    go to it. A thread copies what it prints to this process's stdout until it exits."""
    global _serving

    def drain() -> None:
        assert process.stdout is not None
        while chunk := os.read(process.stdout.fileno(), 4096):
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()

    threading.Thread(target=drain, name="visionflow-serving-output", daemon=True).start()
    with _lock:
        previous, _serving = _serving, _Waiting(process, {}, os.getcwd())
    if previous is not None:
        _close(previous.process)


def _close(process: subprocess.Popen) -> None:
    """Stop a waiting process that was never handed a spec. It holds no work, so it is ended now rather than left
    importing for seconds of CPU after the command has exited (a run that failed before training)."""
    try:
        if process.stdin:
            process.stdin.close()
    except OSError:
        pass
    _stop(process, timeout=10)


def _stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; reaped either way (no-op when it has ended)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _hand_over(process: subprocess.Popen, spec_path: Path, env: dict[str, str], serve: bool) -> bool:
    """Send the waiting process its order (components.training.warm); False when it is gone meanwhile. Its stdin
    stays open when it is to serve calls after the fit."""
    if not _send(process, {"spec": str(spec_path), "env": process_env(env), "serve": serve}):
        return False
    if not serve:
        try:
            assert process.stdin is not None
            process.stdin.close()
        except OSError:
            return False
    return True


def call(target: str, *args, **kwargs):
    """`module:function`(*args, **kwargs) run in the training process when one waits in this directory or serves
    after its fit (its imports are done, so this process need not import torch, albumentations or Lightning for it),
    else here. Returns what the function returns; raises what it raises. A process that ends before it answers is
    let go and the function runs here."""
    answer, sent, reply = None, False, None
    try:
        with _lock:  # the order line goes before a spec another thread may hand over
            ready = [w.process for w in (_serving, _waiting) if w and w.process.poll() is None and w.cwd == os.getcwd()]
            if ready:
                reply = Path(tempfile.mkdtemp(prefix="visionflow-call-")) / "answer.pickle"
                sent = _send(ready[0], {"call": target, "args": _packed(args, kwargs), "reply": str(reply)})
        answer = _answer(ready[0], reply) if sent else None
    finally:
        if reply is not None:
            shutil.rmtree(reply.parent, ignore_errors=True)
    if answer is not None:
        status, value = answer
        if status == "error":
            raise value
        return value
    if sent:
        _log.info("%s ran in this process: the training process ended first", target)
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _packed(args: tuple, kwargs: dict) -> str:
    return base64.b64encode(pickle.dumps((args, kwargs))).decode()


def _send(process: subprocess.Popen, order: dict) -> bool:
    """Write one order line to the waiting process's stdin (kept open); False when it is gone."""
    try:
        assert process.stdin is not None
        process.stdin.write((json.dumps(order) + "\n").encode())
        process.stdin.flush()
    except OSError:
        return False
    return True


def _answer(process: subprocess.Popen, reply: Path) -> tuple[str, object] | None:
    """The waiting process's answer to a call (components.training.warm.answer_call), once its file exists; None
    when the process ends without one."""
    while not reply.exists():
        if process.poll() is not None and not reply.exists():
            return None
        time.sleep(0.01)
    return pickle.loads(reply.read_bytes())


def training_process(spec_path: Path, env: dict[str, str], serve: bool = False) -> subprocess.Popen:
    """A training process for the spec at `spec_path` with environment `env`, its output on a pipe: the waiting
    one when it matches (same directory, same environment but for the handed-over variables), else a new one.
    With `serve`, the waiting one prints SERVING_LINE after a single-process fit that succeeded and answers calls
    (keep_serving) until discard_training_process(); a new one only trains."""
    global _waiting
    with _lock:
        waiting, _waiting = _waiting, None
    if waiting is not None:
        changed = changed_variables(waiting.env, env)
        same_place = waiting.cwd == os.getcwd()
        usable = waiting.process.poll() is None and same_place and not changed
        if usable and _hand_over(waiting.process, spec_path, env, serve):
            return waiting.process
        _log.info("training process started anew (the waiting one: exit code %s, same directory %s, variables "
                  "changed %s)", waiting.process.poll(), same_place, changed)  # fmt: skip
        _close(waiting.process)
    return subprocess.Popen(
        [sys.executable, "-m", "components.training.fit", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=process_env(env),
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_temporary_server(settings) -> None:
    """Start Prefect's temporary server as Prefect does (prefect.server.api.server.SubprocessASGIServer) and point
    this process's Prefect settings at it."""
    global _server
    import prefect
    from prefect.context import refresh_global_settings_context

    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **settings.to_environment_variables(exclude_unset=True),
    }
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
               "error", "--lifespan", "on"]  # fmt: skip
    # A terminal's Ctrl-C signals the whole foreground process group. The server's process starts with SIGINT
    # blocked (a child keeps the mask across exec), so it outlives Ctrl-C and the flow can still record the
    # interruption; it is stopped with SIGTERM when this process exits.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        _server = subprocess.Popen(command, env=env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    atexit.register(_stop_server)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no dead "View at" links
    refresh_global_settings_context()
    logging.getLogger("prefect").info("Starting temporary server on http://127.0.0.1:%d", port)


def _stop_server() -> None:
    global _server
    server, _server = _server, None
    if server is None or server.poll() is not None:
        return
    logging.getLogger("prefect").info(
        "Stopping temporary server on %s", os.environ.get("PREFECT_API_URL", "").removesuffix("/api")
    )
    _stop(server, timeout=5)


def start_temporary_server() -> None:
    """Start Prefect's temporary server in the background when no API URL is set (and none was started); call
    before importing a flow's modules, and wait_for_server() before the flow."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not settings.api.url and settings.server.ephemeral.enabled and _server is None:
        _start_temporary_server(settings)


def early_start() -> None:
    """Start Prefect's temporary server (when no API URL is set) and a waiting training process, both in the
    background; call before importing the pipeline's modules, and wait_for_server() before the flow."""
    start_temporary_server()
    prestart_training_process()  # after the server: its environment has the server's URL, as the run's will


def wait_for_server() -> None:
    """Wait until the temporary server early_start() started answers; one that exits or does not answer within
    Prefect's start-up limit is stopped, and Prefect's own temporary server starts with the flow (or reports)."""
    if _server is None:
        return
    import httpx
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    url = os.environ["PREFECT_API_URL"] + "/health"
    deadline = time.monotonic() + get_current_settings().server.ephemeral.startup_timeout_seconds
    # one client for every probe: a new one per probe builds an SSL context each time (40 ms of CPU, taken from the
    # server's start); loopback, so no proxy
    with httpx.Client(timeout=2, trust_env=False) as probe:
        while _server.poll() is None and time.monotonic() < deadline:
            try:
                if probe.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    _log.warning("Prefect's temporary server did not start (exit code %s)", _server.poll())
    _stop_server()
    os.environ.pop("PREFECT_API_URL", None)
    refresh_global_settings_context()
