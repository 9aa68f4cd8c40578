"""MLflow helpers: runs addressed by id (safe across threads and processes), params, metrics,
artifacts, data set inputs. Every MLflow call of the pipeline goes through here or the tasks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from components.data.manifest import ManifestRow
from components.errors import StageError

STAGE_TAG = "visionflow.stage"
RUN_DIR_TAG = "visionflow.run_dir"
FAILED_STAGE_TAG = "visionflow.failed_stage"
PARENT_TAG = "mlflow.parentRunId"


class RunStatus(StrEnum):
    """The MLflow run statuses the pipeline sets (members compare equal to MLflow's status strings)."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


def tracking_uri() -> str:
    """The MLflow tracking URI: MLFLOW_TRACKING_URI, else MLflow's default sqlite:///mlflow.db in the
    current directory (made absolute so the training process and later commands find the same store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + str(Path("mlflow.db").resolve())


def _artifact_location(experiment: str) -> str | None:
    """Artifacts of a local sqlite store go beside the database file, not into the current directory."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts" / experiment).resolve().as_uri()


def client() -> MlflowClient:
    """An MlflowClient on tracking_uri()."""
    return MlflowClient(tracking_uri())


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created when missing (restored when deleted)."""
    c = client()
    experiment = c.get_experiment_by_name(name)
    if experiment is None:
        return c.create_experiment(name, artifact_location=_artifact_location(name))
    if experiment.lifecycle_stage == "deleted":
        c.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def start_run(experiment: str, name: str | None, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """Create a RUNNING run (nested under parent_run_id when given); returns its id."""
    tags = dict(tags)
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = client().create_run(ensure_experiment(experiment), run_name=name, tags=tags)
    return run.info.run_id


def reopen_run(run_id: str) -> None:
    """Mark an ended run RUNNING again (resume re-attaches to the same run)."""
    client().update_run(run_id, status=RunStatus.RUNNING)


def end_run(run_id: str, status: RunStatus = RunStatus.FINISHED) -> None:
    """End a run with status FINISHED, FAILED or KILLED."""
    client().set_terminated(run_id, status=status)


def fail_stale_runs(run_id: str) -> list[str]:
    """End run `run_id` and its child runs FAILED where they are still RUNNING because their process was killed
    (a search resumed after a kill uses this); returns the ids ended."""
    run = get_run(run_id)
    children = client().search_runs(
        [run.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run_id}' and attributes.status = 'RUNNING'"
    )
    stale = [r.info.run_id for r in [run, *children] if r.info.status == RunStatus.RUNNING]
    for stale_id in stale:
        end_run(stale_id, RunStatus.FAILED)
    return stale


def ended_status(error: BaseException | None) -> RunStatus:
    """The status a run ends with: FINISHED without error, FAILED on an exception, KILLED on what is not an
    Exception (Ctrl-C, SIGTERM turned into KeyboardInterrupt, an orchestrator's termination signal)."""
    if error is None:
        return RunStatus.FINISHED
    return RunStatus.FAILED if isinstance(error, Exception) else RunStatus.KILLED


@dataclass
class ScopedRun:
    """The run a `run_scope` holds. Set `stage` to the stage now running: if the scope ends in an error,
    that stage is tagged as the failed one."""

    run_id: str
    stage: str | None = None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, turn SIGTERM into KeyboardInterrupt while the block runs (unless a handler is set)."""
    installed = threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    )
    if installed:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def run_scope(
    experiment: str | None = None,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    *,
    reopen: str | None = None,
    stage: str | None = None,
    stage_errors: tuple[type[Exception], ...] = (),
) -> Iterator[ScopedRun]:
    """The one owner of an MLflow run's life: start it (or `reopen` an ended one) with `tags`, nested under
    `parent_run_id`; end it FINISHED when the block returns, FAILED on an exception and KILLED on Ctrl-C or
    SIGTERM, tagging the failed stage and the error first. The error is re-raised unchanged, except an
    expected one (an instance of `stage_errors`, e.g. VisionflowError) while a stage is set: that becomes a
    StageError naming the stage, so the user reads which stage failed and why in one line."""
    if reopen:
        reopen_run(reopen)
        if tags:
            set_tags(reopen, tags)
        run = ScopedRun(reopen, stage)
    else:
        run = ScopedRun(start_run(experiment or "Default", name, tags or {}, parent_run_id), stage)
    with _sigterm_as_interrupt():
        try:
            yield run
        except BaseException as err:
            try:
                failure = {"visionflow.error": (str(err) or type(err).__name__)[:500]}
                if run.stage:
                    failure[FAILED_STAGE_TAG] = run.stage
                set_tags(run.run_id, failure)
            finally:
                end_run(run.run_id, ended_status(err))
            if run.stage and isinstance(err, stage_errors) and not isinstance(err, StageError):
                raise StageError(run.stage, str(err)) from err
            raise
        end_run(run.run_id, RunStatus.FINISHED)


def get_run(run_id: str):
    """The mlflow Run entity (info, data.params, data.metrics, data.tags)."""
    return client().get_run(run_id)


def child_run(parent_run_id: str, stage: str) -> str | None:
    """The id of the newest child run of `parent_run_id` for `stage`, or None."""
    parent = get_run(parent_run_id)
    runs = client().search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{STAGE_TAG}` = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log params (values stringified, None as empty); the same value may be logged again on resume."""
    items = [Param(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
    c = client()
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log numeric metrics at `step` (non-numbers are skipped)."""
    import time

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    if items:
        client().log_batch(run_id, metrics=items)


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    """Set run tags (values stringified)."""
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(run_id: str, paths: Iterable[str | Path | None], artifact_path: str | None = None) -> None:
    """Upload files (None entries skipped) into the run's artifacts under `artifact_path`."""
    c = client()
    for path in paths:
        if path is not None and Path(path).is_file():
            c.log_artifact(run_id, str(path), artifact_path)


def log_dataset(run_id: str, rows: list[ManifestRow], fingerprint: str, source: str, name: str, context: str) -> None:
    """Log a manifest as an MLflow data set input of the run, with the fingerprint as its digest."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    frame = pd.DataFrame(rows)
    dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=fingerprint[:36], targets="label")
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
    client().log_inputs(run_id, datasets=[entity])


def git_commit(path: str | Path = ".") -> str | None:
    """The git commit of `path`'s checkout, or None outside a checkout."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ui_hint(uri: str | None = None) -> str:
    """The command that opens the MLflow UI on this store."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def run_link(run_id: str, uri: str | None = None) -> str:
    """A link to one run: its MLflow UI URL on a tracking server, else the run id and the command that opens the UI."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            experiment_id = client().get_run(run_id).info.experiment_id
        except Exception:
            return f"{uri.rstrip('/')} (run {run_id})"
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} (open with: mlflow ui --backend-store-uri {uri})"


def recent_runs(
    experiment: str | None = None, last: int = 10, tag: tuple[str, str] | None = None, top_level_only: bool = True
) -> list[dict[str, Any]]:
    """The newest runs (of one experiment, or of all), newest first, as plain dicts:
    run_id, run_name, experiment, status, start_time (ms), duration_s, params, metrics, tags.

    `tag` keeps runs with that tag value; `top_level_only` leaves out nested stage runs.
    Raises VisionflowError for an unknown experiment name.
    """
    from components.errors import VisionflowError

    c = client()
    if experiment:
        found = c.get_experiment_by_name(experiment)
        if found is None:
            known = ", ".join(sorted(e.name for e in c.search_experiments())) or "none"
            raise VisionflowError(f"no MLflow experiment {experiment!r} in {tracking_uri()} (known: {known})")
        experiments = {found.experiment_id: found.name}
    else:
        experiments = {e.experiment_id: e.name for e in c.search_experiments()}
    if not experiments:
        return []
    filter_string = f"tags.`{tag[0]}` = '{tag[1]}'" if tag else ""
    runs = c.search_runs(
        list(experiments),
        filter_string,
        order_by=["attributes.start_time DESC"],
        max_results=min(5000, max(last * 20, 100)),
    )
    out = []
    for run in runs:
        if top_level_only and PARENT_TAG in run.data.tags:
            continue
        info = run.info
        end = info.end_time or None
        out.append(
            {
                "run_id": info.run_id,
                "run_name": info.run_name,
                "experiment": experiments.get(info.experiment_id, ""),
                "status": info.status,
                "start_time": info.start_time,
                "duration_s": (end - info.start_time) / 1000 if end and info.start_time else None,
                "params": dict(run.data.params),
                "metrics": dict(run.data.metrics),
                "tags": dict(run.data.tags),
            }
        )
        if len(out) >= last:
            break
    return out


# --- model registry -----------------------------------------------------------------------------

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "visionflow.history"


def register_onnx(run_id: str, onnx_path: str | Path, name: str, input_example, tags: dict[str, str]) -> str:
    """Log an ONNX model to `run_id` with mlflow.onnx (signature inferred from `input_example`,
    requirements given, one self-contained file) and register it under `name`; returns the version."""
    import mlflow
    import mlflow.onnx
    import onnx

    from components.quiet import mlflow_prints_to_log

    mlflow_prints_to_log()
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            input_example=input_example,
            pip_requirements=["onnxruntime", "numpy"],
            save_as_external_data=False,
            registered_model_name=name,
            await_registration_for=60,
        )
    version = str(info.registered_model_version)
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value))
    return version


def alias_version(name: str, alias: str):
    """The ModelVersion behind `name@alias`, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def registry_history(name: str) -> list[dict[str, Any]]:
    """The promotion/rollback history of a registered model (oldest first)."""
    import json

    model = client().get_registered_model(name)
    return json.loads(model.tags.get(HISTORY_TAG, "[]"))


def set_alias(name: str, alias: str, version: str, reason: str) -> None:
    """Point `name@alias` at `version` and append the change to the model's history (and the version's tags)."""
    import json
    import time

    c = client()
    previous = alias_version(name, alias)
    c.set_registered_model_alias(name, alias, version)
    history = registry_history(name)
    history.append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "alias": alias,
            "version": str(version),
            "previous": str(previous.version) if previous else None,
            "reason": reason,
        }
    )
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-200:]))
    c.set_model_version_tag(name, str(version), f"visionflow.{alias}_since", history[-1]["time"])


def download_run_artifacts(run_id: str, path: str, dest: str | Path) -> Path:
    """Download the artifact folder `path` of a run into `dest`; returns the local folder."""
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, dst_path=str(dest), tracking_uri=tracking_uri()
    )
    return Path(local)
