"""Shared test set-up: an offline environment, temp Prefect home and MLflow store per session."""

import atexit
import os
import shutil
import tempfile

from components.quiet import set_offline_defaults

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
