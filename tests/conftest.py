"""Shared test set-up: an offline environment, temp Prefect home and MLflow store per session."""

import os
import tempfile

_SESSION_DIR = tempfile.mkdtemp(prefix="visionflow-tests-")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_DIR, "prefect")
os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + os.path.join(_SESSION_DIR, "mlflow.db")
os.environ["VISIONFLOW_STACK_DIR"] = os.path.join(_SESSION_DIR, "stack")
