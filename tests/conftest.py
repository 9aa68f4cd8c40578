"""Shared test set-up: an offline environment, temp Prefect home and MLflow store per session."""

import atexit
import os
import shutil
import tempfile

# Tests in parallel xdist workers share the cores among them: each worker, and the training processes it starts, gets
# its share of compute threads (set before anything imports torch, which reads it once). With two workers on two cores
# and two OpenMP threads each, their processes kept waiting on one another. Measured on 2 cores, one run after the other
# (2026-12-03): 22.1 → 18.6 CPU-minutes, 893 s → 792 s of tests; the default job's test 145 s → 72 s. One process
# (`make test PYTEST_PARALLEL=`) keeps torch's default; a value in the environment wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # set by xdist in a worker before conftests load
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

from components.quiet import set_offline_defaults  # noqa: E402 - after the thread setting

_SESSION_DIR = tempfile.mkdtemp(prefix="visionflow-tests-")
# Each test process (the controller and every xdist worker) makes one; about 100 MB each once the servers ran.
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)
set_offline_defaults()
# Commands run as subprocesses start Prefect's temporary server; its 20 s default start-up limit is too short
# on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_DIR, "prefect")
os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + os.path.join(_SESSION_DIR, "mlflow.db")
os.environ["VISIONFLOW_STACK_DIR"] = os.path.join(_SESSION_DIR, "stack")
