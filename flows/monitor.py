"""The monitor flow: compare a window of the server's prediction log with the bundle's reference
profile, log the drift report to MLflow and as a Prefect artifact, and emit the Prefect event
`visionflow.drift.detected` exactly when a threshold of `monitor.*` is crossed.

An automation turns that event into a run of the retrain deployment: `retrain_trigger()` gives the
trigger to attach to the retrain deployment (`to_deployment(triggers=[...])`, Prefect then creates
and owns the automation), `create_retrain_automation()` creates the same automation through the API
for a deployment that already exists. `monitor_deployment()` is the scheduled monitor deployment.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from pydantic import BaseModel

from components import tracking
from components.bundle_format import MODEL_FILE, verify_bundle
from components.config import PipelineParams, params_to_flat_dict
from components.monitoring.drift import DriftReport, compare_window
from components.monitoring.profile import read_reference_profile
from components.monitoring.report import drift_markdown, write_drift_report

DRIFT_EVENT = "visionflow.drift.detected"
MONITOR_STAGE = "monitor"


def model_resource_id(model_name: str) -> str:
    """The Prefect resource id drift events of registered model `model_name` are about."""
    return f"visionflow.model.{model_name}"


class MonitorResult(BaseModel):
    """What one monitor run found and where its report is."""

    drift_detected: bool
    triggered: list[str]
    computed: list[str]
    not_computed: dict[str, str]
    notes: list[str]
    window_predictions: int
    live_accuracy: float | None
    report_markdown: str
    report_html: str
    run_id: str
    event_id: str | None = None


def default_bundle_source(params: PipelineParams) -> str:
    """The bundle the monitor compares with: monitor.bundle, else the registry's champion of package.model_name."""
    return params.monitor.bundle or f"models:/{params.package.model_name}@{tracking.CHAMPION}"


@task(name="drift-report")
def drift_task(
    log_dir: str, bundle_dir: str, feedback: str | None, params: PipelineParams, out_dir: str
) -> tuple[MonitorResult, dict]:
    """Compare the log window with the bundle's profile under an MLflow run; write and log the report.

    Returns (MonitorResult, the event payload: triggered checks and their values).
    """
    logger = get_run_logger()
    contents = verify_bundle(Path(bundle_dir))
    profile = read_reference_profile(Path(bundle_dir))
    reference_accuracy = contents["metrics"].get("accuracy")
    report: DriftReport = compare_window(
        Path(log_dir),
        profile,
        params.monitor,
        contents["files"][MODEL_FILE],
        Path(feedback) if feedback else None,
        labels=contents["labels"],
        reference_accuracy=reference_accuracy if isinstance(reference_accuracy, (int, float)) else None,
        model_name=params.package.model_name,
    )
    for note in report.notes:
        logger.warning(note)
    tags = {
        tracking.STAGE_TAG: MONITOR_STAGE,
        "visionflow.model_name": params.package.model_name,
        "visionflow.model_sha256": report.model_sha256 or "",
        "visionflow.drift": str(report.drift_detected).lower(),
    }
    with tracking.run_scope(params.run.experiment, MONITOR_STAGE, tags) as run:
        run_id = run.run_id
        files = write_drift_report(report, Path(out_dir))
        tracking.log_params(
            run_id,
            {
                **params_to_flat_dict(params.monitor),
                "log_dir": log_dir,
                "bundle": bundle_dir,
                "feedback": feedback or "",
            },
        )
        tracking.log_metrics(run_id, report.metrics())
        tracking.log_artifacts(run_id, [files.markdown_path, files.html_path, files.json_path, *files.plots], "drift")
    create_markdown_artifact(
        key="drift-report",
        markdown=drift_markdown(report)
        + f"\nMLflow: {tracking.run_link(run_id)} (plots and report.html under drift/)\n",
        description=f"drift report: {'drift' if report.drift_detected else 'no drift'}",
    )
    live = report.metrics().get("live/accuracy")
    result = MonitorResult(
        drift_detected=report.drift_detected,
        triggered=report.triggered,
        computed=[c.name for c in report.checks if c.computed],
        not_computed={c.name: c.reason or "" for c in report.checks if not c.computed},
        notes=report.notes,
        window_predictions=report.window.predictions,
        live_accuracy=live,
        report_markdown=files.markdown_path,
        report_html=files.html_path,
        run_id=run_id,
    )
    payload = {
        "triggered": report.triggered,
        "values": {c.name: c.value for c in report.checks if c.drifted},
        "window_predictions": report.window.predictions,
        "mlflow_run_id": run_id,
    }
    return result, payload


@flow(name="visionflow-monitor", log_prints=True)
def monitor_flow(
    log_dir: str | None = None,
    bundle: str | None = None,
    feedback: str | None = None,
    params: PipelineParams = PipelineParams(),
) -> MonitorResult:
    """Drift report of a prediction-log window against a bundle's reference profile.

    Writes the report under <run.output_dir>/monitor/<time>-<id>/. Takes the log folder (default
    monitor.log_dir), the bundle (a folder, a .tar.gz or models:/NAME@ALIAS; default monitor.bundle,
    else the champion of package.model_name), an optional feedback CSV of id,label
    (default monitor.feedback) and the params (monitor.* thresholds, run.experiment, package.model_name).
    Emits `visionflow.drift.detected` for resource visionflow.model.<package.model_name> exactly when a
    check drifted. Returns the MonitorResult. Raises VisionflowError when the bundle cannot be found.
    """
    from components.packaging.resolve import resolve_bundle

    log_dir = log_dir or params.monitor.log_dir
    feedback = feedback or params.monitor.feedback
    bundle_dir = resolve_bundle(bundle or default_bundle_source(params), params.run.cache_dir)
    out_dir = (
        Path(params.run.output_dir).resolve() / "monitor" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    result, payload = drift_task(str(log_dir), str(bundle_dir), feedback, params, str(out_dir))
    if result.drift_detected:
        name = params.package.model_name
        event = emit_event(
            event=DRIFT_EVENT,
            resource={"prefect.resource.id": model_resource_id(name), "prefect.resource.name": name},
            payload={**payload, "bundle": str(bundle_dir), "log_dir": str(log_dir)},
        )
        result.event_id = str(event.id) if event is not None else None
        get_run_logger().warning("drift detected (%s): event %s emitted", ", ".join(result.triggered), DRIFT_EVENT)
    return result


# --- automation and schedule ----------------------------------------------------------------------


def retrain_trigger(model_name: str, parameters: dict | None = None):
    """The trigger to attach to the retrain deployment (`retrain.to_deployment(triggers=[...])`): Prefect
    then creates an automation that runs that deployment on every drift event of `model_name`.

    Takes the registered model name and optional parameters for the triggered run (None = the
    deployment's defaults). Returns a prefect.events.DeploymentEventTrigger.
    """
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"retrain {model_name} on drift",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": model_resource_id(model_name)},
        posture="Reactive",
        threshold=1,
        parameters=parameters,
    )


def retrain_automation(deployment_id: UUID | str, model_name: str, parameters: dict | None = None):
    """An automation (not yet created) that runs deployment `deployment_id` on every drift event of
    `model_name`, with `parameters` (None = the deployment's defaults). Returns prefect.automations.Automation."""
    from prefect.automations import Automation, EventTrigger, RunDeployment

    return Automation(
        name=f"visionflow: retrain {model_name} on drift",
        description=f"Runs the retrain deployment when `visionflow monitor` emits {DRIFT_EVENT} for {model_name}.",
        trigger=EventTrigger(
            expect={DRIFT_EVENT},
            match={"prefect.resource.id": model_resource_id(model_name)},
            posture="Reactive",
            threshold=1,
        ),
        actions=[RunDeployment(source="selected", deployment_id=UUID(str(deployment_id)), parameters=parameters)],
    )


def create_retrain_automation(deployment_id: UUID | str, model_name: str, parameters: dict | None = None) -> UUID:
    """Create (or replace: same name) the retrain-on-drift automation on the Prefect API in use.

    Takes the retrain deployment's id, the registered model name and optional run parameters. Returns
    the automation's id.
    """
    from prefect import get_client

    automation = retrain_automation(deployment_id, model_name, parameters)
    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(automation.name):
            client.delete_automation(existing.id)
    return automation.create().id


def monitor_deployment(params: PipelineParams, name: str = MONITOR_STAGE):
    """The scheduled monitor deployment (cron monitor.cron in monitor.timezone), `params` as its defaults.

    Returns a RunnerDeployment for `serve` / `deploy` (flows.deploy).
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    return monitor_flow.to_deployment(
        name=name,
        parameters={"params": params.model_dump(mode="json")},
        schedules=[Cron(params.monitor.cron, timezone=params.monitor.timezone)],
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["visionflow"],
        description=(
            "Drift report of the prediction log against the bundle's reference profile; "
            "emits visionflow.drift.detected."
        ),
    )
