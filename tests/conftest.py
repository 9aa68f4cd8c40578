"""Shared test set-up: an offline environment, temp Prefect home and MLflow store per session."""

import atexit
import os
import shutil
import tempfile

# One compute thread per process (before anything imports torch, which reads it once): the two xdist workers share
# two cores with the training processes and servers they start, and two OpenMP threads each kept them waiting on one
# another. Measured on 2 cores, one run after the other (2026-12-03): 22.1 → 18.6 CPU-minutes, 893 s → 792 s of
# tests; the default job's test 145 s → 72 s. A value in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
