"""Packaging stage: export with parity check, bundle, register, champion/challenger gate — in the
pipeline or alone on a finished run (`visionflow package --from-run`); and the registry commands
(promote, rollback) and bundle resolution for `visionflow serve`."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from components import tracking
from components.bundle_format import TASK_FILE
from components.config import PipelineParams, load_params
from components.data.ingest import read_manifest
from components.data.manifest import ManifestRow, rows_of_split
from components.errors import VisionflowError
from components.evaluation.results import EvalReport, read_report
from components.packaging.gate import GateDecision, bundle_incompatibility, decide_promotion, refuse_comparison
from components.packaging.resolve import BUNDLE_ARTIFACTS
from components.packaging.results import PackagedModel
from flows import warm_start
from flows.runs import finished_pipeline_run
from flows.tasks import publish_summary

DATA_FINGERPRINT_TAG = "visionflow.data_fingerprint"


class PackageResult(BaseModel):
    """What packaging produced: the bundle, its registry version and the gate's decision."""

    bundle_dir: str
    archive: str
    model_name: str
    version: str
    promoted: bool
    reason: str
    challenger_accuracy: float
    champion_accuracy: float | None
    run_id: str | None = Field(None, description="The MLflow run the bundle and the registered version belong to.")


def _champion_bundle(name: str, cache_dir: str) -> tuple[object, Path] | None:
    champion = tracking.alias_version(name, tracking.CHAMPION)
    if champion is None:
        return None
    dest = Path(cache_dir) / "registry" / name / str(champion.version)
    bundle = dest / BUNDLE_ARTIFACTS
    if not bundle.is_dir():
        tracking.download_run_artifacts(champion.run_id, BUNDLE_ARTIFACTS, dest)
    return champion, bundle


def _gate(
    name: str,
    version: str,
    bundle_dir: Path,
    accuracy: float,
    test_rows: list[ManifestRow],
    params: PipelineParams,
    run_id: str,
) -> GateDecision:
    """The champion/challenger decision for `version`: compared on the same test rows when the champion
    has the same labels and input shape, else refused (champion unchanged, the reason says what to do).
    A comparison attaches the champion → challenger diff to the decision's run `run_id` (flows.diff)."""
    champion = _champion_bundle(name, params.run.cache_dir)
    margin = params.package.promote_margin
    if champion is None:
        return decide_promotion(accuracy, None, margin)
    why = bundle_incompatibility(bundle_dir, champion[1])
    if why:
        return refuse_comparison(accuracy, why, name, version, str(champion[0].version), margin)
    champion_accuracy = _bundle_accuracy(champion[1], test_rows, params.data.max_pixels)
    what = f"the gate's test split, {name} v{champion[0].version} → v{version}"
    diff_dir = bundle_dir.parent / "diff"
    from flows.diff import gate_diff  # a comparison only: the diff's modules

    gate_diff(champion[0].run_id, champion[1], run_id, bundle_dir, test_rows, diff_dir, params.data.max_pixels, what)
    return decide_promotion(accuracy, champion_accuracy, margin)


def _bundle_accuracy(bundle_dir: Path, rows: list[ManifestRow], max_pixels: int) -> float:
    """components.packaging.package.bundle_accuracy, in the training process when it serves, else here."""
    return warm_start.call("components.packaging.package:bundle_accuracy", bundle_dir, rows, max_pixels)


def _register_and_gate(
    packaged: PackagedModel, params: PipelineParams, fingerprint: str, test_rows: list[ManifestRow], run_id: str
) -> PackageResult:
    """Register the packaged model under package.model_name (alias challenger), gate it against the champion
    and record the decision (metrics, tags, a Prefect summary); returns the PackageResult."""
    logger = get_run_logger()
    name = params.package.model_name
    challenger_accuracy = _bundle_accuracy(Path(packaged.bundle_dir), test_rows, params.data.max_pixels)
    gate_metric = "mAP" if (Path(packaged.bundle_dir) / TASK_FILE).is_file() else "accuracy"  # multi-label: mAP
    version = tracking.register_onnx(
        run_id,
        packaged.onnx_path,
        name,
        packaged.input_example,
        {"visionflow.test_accuracy": f"{challenger_accuracy:.6f}", DATA_FINGERPRINT_TAG: fingerprint},
    )
    decision = _gate(name, version, Path(packaged.bundle_dir), challenger_accuracy, test_rows, params, run_id)
    champion_accuracy = decision.champion_accuracy
    tracking.set_alias(name, tracking.CHALLENGER, version, "new model version")
    if decision.promote:
        tracking.set_alias(name, tracking.CHAMPION, version, decision.reason)
    tracking.log_metrics(
        run_id,
        {
            "registry/challenger_accuracy": challenger_accuracy,
            **({"registry/champion_accuracy": champion_accuracy} if champion_accuracy is not None else {}),
            "registry/promoted": float(decision.promote),
            "registry/compared": float(decision.compared),
        },
    )
    tracking.set_tags(run_id, {"visionflow.model_version": version, "visionflow.gate": decision.reason})
    logger.info("registered %s version %s: %s", name, version, decision.reason)
    publish_summary(
        "registry-gate",
        f"{name} v{version}: {'promoted to champion' if decision.promote else 'kept as challenger'}",
        {
            f"challenger {gate_metric} (test split)": f"{challenger_accuracy:.4f}",
            f"champion {gate_metric} (same split)": "-" if champion_accuracy is None else f"{champion_accuracy:.4f}",
            "margin": f"{params.package.promote_margin}",
            "decision": decision.reason,
            "bundle": packaged.archive,
        },
        tracking.run_link(run_id),
    )
    return PackageResult(
        bundle_dir=packaged.bundle_dir,
        archive=packaged.archive,
        model_name=name,
        version=version,
        promoted=decision.promote,
        reason=decision.reason,
        challenger_accuracy=challenger_accuracy,
        champion_accuracy=champion_accuracy,
        run_id=run_id,
    )


@task(name="package")
def package_task(
    checkpoint: str,
    params: PipelineParams,
    data_source: str,
    fingerprint: str,
    clean_manifest: str,
    evaluation: EvalReport,
    split_counts: dict[str, int],
    run_dir: str,
    run_id: str,
    int8_onnx: str | None = None,
    comparison_md: str | None = None,
) -> PackageResult:
    """Export, check parity, bundle and register the model; gate it against the champion on the same test split.

    Takes the checkpoint, the params, the data source and fingerprint (for the model card and the
    version's tags), the validated manifest (its test split scores challenger and champion), the
    evaluation, the split sizes, the folder to write `package/` into, the MLflow run to log into and,
    optionally, an accepted int8 ONNX file and the compression table. Returns a PackageResult.
    """
    logger = get_run_logger()
    test_rows = rows_of_split(read_manifest(clean_manifest), "test")
    # in the training process when it serves (torch and onnx imported there), else here
    packaged = warm_start.call(
        "components.packaging.package:package_checkpoint",
        checkpoint,
        test_rows,
        Path(run_dir) / "package",
        params.package,
        evaluation,
        data_source,
        fingerprint,
        split_counts,
        params.data.max_pixels,
        int8_onnx=int8_onnx,
        comparison_md=comparison_md,
    )
    logger.info(
        "ONNX parity: max |logit diff| %.2e, top-1 agreement %.4f",
        packaged.parity["max_abs_logit_diff"],
        packaged.parity["top1_agreement"],
    )
    tracking.log_metrics(run_id, {f"package/parity_{k}": v for k, v in packaged.parity.items()})
    if packaged.executorch_parity:
        logger.info(
            "ExecuTorch parity: max |logit diff| %.2e, top-1 agreement %.4f",
            packaged.executorch_parity["max_abs_logit_diff"],
            packaged.executorch_parity["top1_agreement"],
        )
        tracking.log_metrics(
            run_id, {f"package/executorch_parity_{k}": v for k, v in packaged.executorch_parity.items()}
        )
    tracking.log_artifacts(run_id, sorted(Path(packaged.bundle_dir).iterdir()), BUNDLE_ARTIFACTS)
    tracking.log_artifacts(run_id, [packaged.archive])

    return _register_and_gate(packaged, params, fingerprint, test_rows, run_id)


class _RunToPackage(BaseModel):
    """What packaging needs from a finished pipeline run, read back from its run directory and tags."""

    checkpoint: str
    params: PipelineParams
    data_source: str
    fingerprint: str
    clean_manifest: str
    evaluation: EvalReport
    split_counts: dict[str, int]
    run_dir: str
    experiment: str
    int8_onnx: str | None
    comparison_md: str | None


def _accepted_int8(comparison_md: str | None) -> str | None:
    """The int8-static ONNX file of a pipeline's compression table, when it was accepted and still exists."""
    if not comparison_md:
        return None
    table = Path(comparison_md).with_name("comparison.csv")
    if not table.is_file():
        return None
    with table.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["name"] == "int8-static" and row["accepted"] == "True" and Path(row["artifact"]).is_file():
                return row["artifact"]
    return None


def _run_to_package(run_id: str, overrides: list[str]) -> _RunToPackage:
    """Read a finished pipeline run's params (with `overrides`, package.enabled forced on), checkpoint,
    split sizes, validated manifest, evaluation and accepted int8 variant; raises VisionflowError."""
    run_dir, finished = finished_pipeline_run(run_id, "package")
    run = tracking.get_run(run_id)
    params = load_params(run_dir / "params.yaml", ["package.enabled=true", *overrides])
    manifest = run_dir / "data" / "manifest.clean.csv"
    checkpoint = Path(finished["checkpoint"])
    for needed in (manifest, checkpoint):
        if not needed.is_file():
            raise VisionflowError(f"run {run_id}: {needed} is missing, cannot package")
    try:
        evaluation = read_report(run_dir / "evaluation")
    except FileNotFoundError as err:
        raise VisionflowError(f"run {run_id}: {err}") from None
    experiment = tracking.client().get_experiment(run.info.experiment_id).name
    return _RunToPackage(
        checkpoint=str(checkpoint),
        params=params,
        data_source=params.data.path,
        fingerprint=run.data.tags.get(DATA_FINGERPRINT_TAG, ""),
        clean_manifest=str(manifest),
        evaluation=evaluation,
        split_counts=finished["split_counts"],
        run_dir=str(run_dir / f"package-{time.strftime('%Y%m%d-%H%M%S')}"),
        experiment=experiment,
        int8_onnx=_accepted_int8(finished.get("comparison")),
        comparison_md=finished.get("comparison"),
    )


@flow(name="visionflow-package", log_prints=True)
def package_flow(source_run_id: str, overrides: list[str] | None = None) -> PackageResult:
    """Package the model of a finished pipeline run again: ONNX export + parity, bundle, register, gate.

    Takes the pipeline's MLflow run id and overrides like "package.promote_margin=0.01" applied on top
    of the run's params.yaml. Reads the run directory named by the run's tags (params, checkpoint and
    split sizes from result.json, the validated manifest, the evaluation files, an accepted int8
    variant), writes into `<run dir>/package-<time>/` and logs into a new child run of the pipeline run
    (stage tag "package"): the bundle artifacts, parity and gate metrics and the registered version's
    source. The child ends FINISHED, or FAILED/KILLED when packaging raises. Returns a PackageResult;
    raises VisionflowError when the run cannot be packaged.
    """
    source = _run_to_package(source_run_id, list(overrides or []))
    params = source.params
    tags = {
        tracking.STAGE_TAG: "package",
        tracking.RUN_DIR_TAG: source.run_dir,
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
    }
    name = f"package-{Path(source.run_dir).name.removeprefix('package-')}"
    with tracking.run_scope(
        source.experiment, name, tags, source_run_id, stage="package", stage_errors=(VisionflowError,)
    ) as run:
        package_params = {f"package.{k}": v for k, v in params.package.model_dump().items()}
        tracking.log_params(run.run_id, {"checkpoint": source.checkpoint, **package_params})
        return package_task(
            source.checkpoint,
            params,
            source.data_source,
            source.fingerprint,
            source.clean_manifest,
            source.evaluation,
            source.split_counts,
            source.run_dir,
            run.run_id,
            int8_onnx=source.int8_onnx,
            comparison_md=source.comparison_md,
        )


def promote_version(name: str, version: str) -> str:
    """Make `version` the champion by hand; returns a one-line summary."""
    try:
        tracking.client().get_model_version(name, version)
    except Exception:
        raise VisionflowError(f"no version {version} of registered model {name}") from None
    tracking.set_alias(name, tracking.CHAMPION, version, "manual promotion")
    return f"{name} version {version} is now champion"


def rollback_champion(name: str) -> str:
    """Hand the champion alias back to the version that held it before the latest champion change."""
    try:
        history = [h for h in tracking.registry_history(name) if h["alias"] == tracking.CHAMPION]
    except Exception:
        raise VisionflowError(f"no registered model {name}") from None
    current = tracking.alias_version(name, tracking.CHAMPION)
    if not history or current is None or not history[-1]["previous"]:
        raise VisionflowError(f"{name} has no earlier champion to roll back to")
    previous = history[-1]["previous"]
    tracking.set_alias(name, tracking.CHAMPION, previous, f"rollback from version {current.version}")
    return f"{name}: champion rolled back from version {current.version} to {previous}"
