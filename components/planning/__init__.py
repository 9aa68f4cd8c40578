"""A plan from the data: every `auto` param resolved from the validated data's fingerprint, with reasons."""

from __future__ import annotations

import json
from pathlib import Path

from components.config import PipelineParams
from components.data.ingest import read_manifest
from components.models.weights import check_weights
from components.planning.fingerprint import DataFingerprint, fingerprint_of
from components.planning.machine import Machine, machine_of
from components.planning.mirror import MirrorTest, mirror_test
from components.planning.plan import Decision, Plan, PlanError, format_plan, plan_params

__all__ = [
    "DataFingerprint",
    "Decision",
    "Machine",
    "MirrorTest",
    "Plan",
    "PlanError",
    "fingerprint_of",
    "format_plan",
    "machine_of",
    "mirror_test",
    "plan_for_manifest",
    "plan_params",
    "plan_source",
    "save_plan",
]


def plan_for_manifest(params: PipelineParams, manifest_path: str | Path) -> Plan:
    """The plan of `params` on a clean manifest (its fingerprint, the mirror test when flips are auto) on this
    machine. Raises PlanError (one line) when the plan cannot run here, WeightsError when the weights it asks for
    are missing offline or do not fit the model."""
    rows = read_manifest(manifest_path)
    mirror = mirror_test(rows, params.data.max_pixels) if params.augment.hflip_p == "auto" else None
    plan = plan_params(params, fingerprint_of(rows, mirror, params.data.task), machine_of(params.trainer))
    model = plan.params.model
    check_weights(
        model.name, model.pretrained, model.weights
    )  # missing or unfitting weights: one line, nothing trained
    return plan


def plan_source(params: PipelineParams, out_dir: str | Path) -> Plan:
    """Ingest and validate `params.data` into out_dir, then plan (what `visionflow plan` shows; nothing is trained).
    Raises DataError / PlanError (one line) for data or a plan that cannot be used."""
    from components.data.ingest import ingest
    from components.data.validate import validate

    out_dir = Path(out_dir)
    snapshot = ingest(params.data, out_dir / "snapshot", Path(params.run.cache_dir))
    report = validate(snapshot, params.data, out_dir / "data")
    return plan_for_manifest(params, report.clean_manifest_path)


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan as JSON (decisions, fingerprint, machine, resolved params); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.model_dump(mode="json"), indent=2) + "\n")
    return path
