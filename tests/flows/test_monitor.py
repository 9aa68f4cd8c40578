"""The monitor flow on real Prefect (session harness) and a real MLflow store: a drift report logged
to MLflow and as a Prefect artifact, the drift event emitted exactly when a threshold is crossed, and
the automation that turns it into a run of the retrain deployment; the CLI on bad input."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from typer.testing import CliRunner

from components import tracking
from components.config import load_params
from components.serving.predictor import Predictor
from flows.cli import app
from flows.monitor import (
    DRIFT_EVENT,
    create_retrain_automation,
    model_resource_id,
    monitor_deployment,
    monitor_flow,
    retrain_trigger,
)
from tests.components.monitoring.test_monitoring import _inverted, write_window
from tests.helpers.digits_bundle import digits_bundle, split


@flow(name="visionflow-monitor-test-target")
def retrain_target(reason: str = "drift") -> str:
    """A stand-in for the retrain flow: the automation only has to create its runs."""
    return reason


def _wait_for(fetch, timeout: float = 60.0, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        found = fetch()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(poll)


@pytest.fixture
def monitor_params(tmp_path):
    tag = uuid.uuid4().hex[:8]
    return load_params(
        None,
        [
            f"run.experiment=test-monitor-{tag}",
            f"package.model_name=digits-{tag}",
            f"run.cache_dir={tmp_path / 'cache'}",
            f"run.output_dir={tmp_path / 'runs'}",
        ],
    )


@pytest.fixture(scope="module")
def windows(tmp_path_factory) -> dict[str, Path]:
    """Prediction logs of the held-out digits (no drift) and of the same digits inverted (drift)."""
    folder = tmp_path_factory.mktemp("windows")
    predictor = Predictor(digits_bundle())
    images, _ = split("heldout")
    write_window(predictor, list(images), folder / "calm")
    write_window(predictor, list(_inverted(images)), folder / "inverted")
    return {"calm": folder / "calm", "inverted": folder / "inverted"}


def test_monitor_flow_logs_the_report_and_emits_only_on_drift(prefect_harness, windows, monitor_params):
    bundle = str(digits_bundle())
    calm = monitor_flow(str(windows["calm"]), bundle, None, monitor_params)
    assert not calm.drift_detected and calm.event_id is None and calm.window_predictions == len(split("heldout")[0])
    drift = monitor_flow(str(windows["inverted"]), bundle, None, monitor_params)
    assert drift.drift_detected and drift.event_id is not None and "ks:brightness" in drift.triggered

    run = tracking.get_run(drift.run_id)
    assert run.data.metrics["drift/detected"] == 1.0 and run.data.metrics["drift/ks_brightness_drifted"] == 1.0
    assert run.data.tags[tracking.STAGE_TAG] == "monitor"
    artifacts = {a.path for a in tracking.client().list_artifacts(drift.run_id, "drift")}
    assert {"drift/report.md", "drift/report.html", "drift/drift.json", "drift/statistics.png"} <= artifacts
    assert tracking.get_run(calm.run_id).data.metrics["drift/detected"] == 0.0
    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts()  # the drift report as a Prefect markdown artifact
    assert any(a.key == "drift-report" and "drift detected" in a.data for a in latest)


@pytest.mark.slow
def test_drift_event_starts_the_retrain_deployment(prefect_harness, windows, monitor_params):
    model = monitor_params.package.model_name
    # the two ways an automation is made: through the API for an existing deployment, and as a
    # trigger on the deployment itself (Prefect creates the automation when the deployment is applied)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("visionflow-monitor-test-target")
        selected = client.create_deployment(flow_id=flow_id, name=f"retrain-{model}")
    automation_id = create_retrain_automation(selected, model)
    assert create_retrain_automation(selected, model) != automation_id  # replaced, not duplicated
    triggered = retrain_target.to_deployment(name=f"triggered-{model}", triggers=[retrain_trigger(model)]).apply()
    with get_client(sync_client=True) as client:
        (automation,) = client.read_automations_by_name(f"visionflow: retrain {model} on drift")
        assert automation.trigger.expect == {DRIFT_EVENT}
        assert automation.actions[0].deployment_id == selected

    bundle = str(digits_bundle())
    assert monitor_flow(str(windows["calm"]), bundle, None, monitor_params).event_id is None
    drift = monitor_flow(str(windows["inverted"]), bundle, None, monitor_params)

    event_filter = EventFilter(
        event=EventNameFilter(name=[DRIFT_EVENT]), resource=EventResourceFilter(id=[model_resource_id(model)])
    )
    with get_client(sync_client=True) as client:
        events = _wait_for(lambda: client.read_events(filter=event_filter, limit=10).events)  # server max 50
        assert [str(e.id) for e in events] == [drift.event_id]  # exactly one: the calm run emitted none
        assert "ks:brightness" in events[0].payload["triggered"]
        assert events[0].payload["mlflow_run_id"] == drift.run_id
        for deployment_id in (selected, triggered):
            only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            runs = _wait_for(lambda only=only: client.read_flow_runs(deployment_filter=only))
            assert len(runs) == 1, f"the automation did not start deployment {deployment_id}"


def test_monitor_deployment_is_scheduled():
    params = load_params(None, ["monitor.cron=*/15 * * * *", "monitor.timezone=Europe/Berlin"])
    deployment = monitor_deployment(params)
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "*/15 * * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert deployment.parameters["params"]["monitor"]["cron"] == "*/15 * * * *"


def test_cli_reports_what_it_cannot_compute(prefect_harness, tmp_path, monitor_params):
    bad_feedback = tmp_path / "feedback.csv"
    bad_feedback.write_text("id,label\nonly-one-column\nabc,not-a-digit\n")
    overrides = [f"run.{key}={getattr(monitor_params.run, key)}" for key in ("experiment", "cache_dir", "output_dir")]
    args = [
        "monitor",
        "--log",
        str(tmp_path / "missing"),
        "--bundle",
        str(digits_bundle()),
        "--feedback",
        str(bad_feedback),
    ]
    result = CliRunner().invoke(app, [*args, *sum((["--set", o] for o in overrides), [])])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # undo rich's line wrapping
    assert "no drift detected" in output and "no prediction log folder" in output
    assert "not computed" in output and "Traceback" not in output
    experiment = tracking.client().get_experiment_by_name(monitor_params.run.experiment)
    (run,) = tracking.client().search_runs([experiment.experiment_id])
    report = Path(tracking.client().download_artifacts(run.info.run_id, "drift/report.md", str(tmp_path))).read_text()
    assert "line 2: expected 2 columns" in report and "unknown label 'not-a-digit'" in report
    assert list((Path(monitor_params.run.output_dir) / "monitor").glob("*/report.html"))
    assert "Not computed: class_distribution" in report
    flow_runs = _monitor_flow_runs()
    missing_bundle = CliRunner().invoke(app, ["monitor", "--log", str(tmp_path), "--bundle", str(tmp_path / "nope")])
    assert missing_bundle.exit_code == 2 and "bundle not found" in " ".join(missing_bundle.output.split())
    assert _monitor_flow_runs() == flow_runs  # refused before a flow run was made for it


def _monitor_flow_runs() -> int:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["visionflow-monitor"]))))
