"""The retrain flow: re-ingest; stop with "no new data" when the data fingerprint is the champion's;
else train a challenger, gate it against the champion on the same new test split, promote or keep.

The gate itself is the package stage of the pipeline (components/packaging/gate.py): the champion's
bundle and the challenger's are scored on the same test split; the challenger is promoted only when
it wins by `package.promote_margin`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import BaseModel

from components import tracking
from components.config import PipelineParams
from flows.pipeline import pipeline
from flows.tasks import ingest_task, publish_summary

Outcome = Literal["no_new_data", "promoted", "kept", "skipped_late"]


class RetrainResult(BaseModel):
    """What the retrain flow decided and the figures behind the decision."""

    outcome: Outcome
    reason: str
    data_fingerprint: str | None = None
    champion_fingerprint: str | None = None
    model_version: str | None = None
    challenger_accuracy: float | None = None
    champion_accuracy: float | None = None
    run_id: str | None = None
    gate_metric: str = "accuracy"  # what challenger/champion_accuracy measure: "mAP" for a multi-label model
    challenger_macro_f1: float | None = None


def champion_fingerprint(model_name: str) -> str | None:
    """The data fingerprint the current champion of `model_name` was trained on (None without a champion)."""
    champion = tracking.alias_version(model_name, tracking.CHAMPION)
    return champion.tags.get("visionflow.data_fingerprint") if champion is not None else None


def _lateness_minutes() -> float:
    scheduled = flow_run.scheduled_start_time
    return max(0.0, (datetime.now(UTC) - scheduled).total_seconds() / 60) if scheduled else 0.0


def _record(result: RetrainResult, params: PipelineParams) -> None:
    """The decision as a Prefect markdown artifact and in MLflow (the pipeline run's tags, or a small check run)."""
    tags = {"visionflow.retrain.outcome": result.outcome, "visionflow.retrain.reason": result.reason}
    if result.run_id:
        tracking.set_tags(result.run_id, tags)
    else:
        check_tags = {
            **tags,
            tracking.STAGE_TAG: "retrain",
            "prefect.flow_run_id": str(flow_run.id or ""),
            "prefect.flow_run_url": str(flow_run.ui_url or ""),
            "visionflow.data_fingerprint": result.data_fingerprint or "",
        }
        with tracking.run_scope(params.run.experiment, f"retrain-{result.outcome}", check_tags) as run:
            run_id = run.run_id
        result.run_id = run_id
    publish_summary(
        "retrain-decision",
        f"retrain: {result.outcome.replace('_', ' ')}",
        {
            "decision": result.reason,
            f"challenger {result.gate_metric} (new test split)": "-"
            if result.challenger_accuracy is None
            else f"{result.challenger_accuracy:.4f}",
            f"champion {result.gate_metric} (same split)": "-"
            if result.champion_accuracy is None
            else f"{result.champion_accuracy:.4f}",
            "challenger macro F1": "-" if result.challenger_macro_f1 is None else f"{result.challenger_macro_f1:.4f}",
            "promotion margin": str(params.package.promote_margin),
            "model version": result.model_version or "-",
            "data fingerprint": (result.data_fingerprint or "-")[:16],
            "champion's data fingerprint": (result.champion_fingerprint or "-")[:16],
            "MLflow run": result.run_id or "-",
        },
        tracking.run_link(result.run_id) if result.run_id else tracking.ui_hint(),
    )


@flow(name="visionflow-retrain", log_prints=True)
def retrain(params: PipelineParams = PipelineParams(), force: bool = False):
    """Retrain when the data changed: returns a RetrainResult (the flow run's state names the outcome).

    `force` trains a challenger even when the data fingerprint equals the champion's.
    """
    logger = get_run_logger()
    late = _lateness_minutes()
    if late > params.retrain.max_lateness_minutes:
        result = RetrainResult(
            outcome="skipped_late",
            reason=(
                f"started {late:.0f} min after its scheduled slot (limit retrain.max_lateness_minutes="
                f"{params.retrain.max_lateness_minutes}); the next slot retrains"
            ),
        )
        logger.warning(result.reason)
        _record(result, params)
        return Completed(message=result.reason, name="Skipped", data=result)

    snapshot = ingest_task(params.data, params.run.cache_dir)
    name = params.package.model_name
    previous = champion_fingerprint(name)
    if previous == snapshot.fingerprint and not force:
        result = RetrainResult(
            outcome="no_new_data",
            data_fingerprint=snapshot.fingerprint,
            champion_fingerprint=previous,
            reason=f"no new data: the fingerprint equals the one {name}@champion was trained on",
        )
        logger.info(result.reason)
        _record(result, params)
        return Completed(message=result.reason, name="NoNewData", data=result)

    run = pipeline(params.model_copy(update={"package": params.package.model_copy(update={"enabled": True})}))
    result = RetrainResult(
        outcome="promoted" if run.promoted else "kept",
        reason=run.registry_decision or "",
        data_fingerprint=snapshot.fingerprint,
        champion_fingerprint=previous,
        model_version=run.model_version,
        challenger_accuracy=run.challenger_accuracy,
        champion_accuracy=run.champion_accuracy,
        run_id=run.run_id,
        gate_metric="mAP" if "test/map" in run.metrics else "accuracy",  # the registry gate's figure
        challenger_macro_f1=run.metrics.get("test/macro_f1"),
    )
    logger.info("retrain %s: %s", result.outcome, result.reason)
    _record(result, params)
    return Completed(message=result.reason, name="Promoted" if run.promoted else "KeptChampion", data=result)
