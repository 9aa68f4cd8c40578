"""Shared test set-up: an offline environment, temp Prefect home and MLflow store per session."""

import os
import tempfile

from components.quiet import set_offline_defaults

_SESSION_DIR = tempfile.mkdtemp(prefix="visionflow-tests-")
set_offline_defaults()
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_DIR, "prefect")
os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + os.path.join(_SESSION_DIR, "mlflow.db")
os.environ["VISIONFLOW_STACK_DIR"] = os.path.join(_SESSION_DIR, "stack")
