"""Packaging stage: export with parity check, bundle, register, champion/challenger gate; and the
registry commands (promote, rollback) and bundle resolution for `visionflow serve`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from components import tracking
from components.config import PipelineParams
from components.data.dataset import rows_of_split
from components.data.ingest import DatasetSnapshot, read_manifest
from components.errors import VisionflowError
from components.evaluation.report import EvalReport
from components.packaging.bundle import unpack_bundle, verify_bundle
from components.packaging.gate import decide_promotion
from components.packaging.package import bundle_accuracy, package_checkpoint
from flows.tasks import publish_summary

BUNDLE_ARTIFACTS = "bundle"


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


def _champion_bundle(name: str, cache_dir: str) -> tuple[object, Path] | None:
    champion = tracking.alias_version(name, tracking.CHAMPION)
    if champion is None:
        return None
    dest = Path(cache_dir) / "registry" / name / str(champion.version)
    bundle = dest / BUNDLE_ARTIFACTS
    if not bundle.is_dir():
        tracking.download_run_artifacts(champion.run_id, BUNDLE_ARTIFACTS, dest)
    return champion, bundle


@task(name="package")
def package_task(
    checkpoint: str,
    params: PipelineParams,
    snapshot: DatasetSnapshot,
    clean_manifest: str,
    evaluation: EvalReport,
    split_counts: dict[str, int],
    run_dir: str,
    run_id: str,
    int8_onnx: str | None = None,
    comparison_md: str | None = None,
) -> PackageResult:
    """Export, check parity, bundle and register the model; gate it against the champion on the same test split."""
    logger = get_run_logger()
    test_rows = rows_of_split(read_manifest(clean_manifest), "test")
    packaged = package_checkpoint(
        checkpoint, test_rows, Path(run_dir) / "package", params.package, evaluation, snapshot.source,
        snapshot.fingerprint, split_counts, params.data.max_pixels, int8_onnx=int8_onnx, comparison_md=comparison_md,
    )
    logger.info("ONNX parity: max |logit diff| %.2e, top-1 agreement %.4f",
                packaged.parity["max_abs_logit_diff"], packaged.parity["top1_agreement"])
    tracking.log_metrics(run_id, {f"package/parity_{k}": v for k, v in packaged.parity.items()})
    tracking.log_artifacts(run_id, sorted(Path(packaged.bundle_dir).iterdir()), BUNDLE_ARTIFACTS)
    tracking.log_artifacts(run_id, [packaged.archive])

    name = params.package.model_name
    challenger_accuracy = bundle_accuracy(Path(packaged.bundle_dir), test_rows, params.data.max_pixels)
    version = tracking.register_onnx(
        run_id, packaged.onnx_path, name, packaged.input_example,
        {"visionflow.test_accuracy": f"{challenger_accuracy:.6f}", "visionflow.data_fingerprint": snapshot.fingerprint},
    )
    champion = _champion_bundle(name, params.run.cache_dir)
    champion_accuracy = None
    if champion is not None:
        champion_accuracy = bundle_accuracy(champion[1], test_rows, params.data.max_pixels)
    decision = decide_promotion(challenger_accuracy, champion_accuracy, params.package.promote_margin)
    tracking.set_alias(name, tracking.CHALLENGER, version, "new model version")
    if decision.promote:
        tracking.set_alias(name, tracking.CHAMPION, version, decision.reason)
    tracking.log_metrics(run_id, {
        "registry/challenger_accuracy": challenger_accuracy,
        **({"registry/champion_accuracy": champion_accuracy} if champion_accuracy is not None else {}),
        "registry/promoted": float(decision.promote),
    })
    tracking.set_tags(run_id, {"visionflow.model_version": version, "visionflow.gate": decision.reason})
    logger.info("registered %s version %s: %s", name, version, decision.reason)
    publish_summary(
        "registry-gate", f"{name} v{version}: {'promoted to champion' if decision.promote else 'kept as challenger'}",
        {"challenger accuracy (test split)": f"{challenger_accuracy:.4f}",
         "champion accuracy (same split)": "-" if champion_accuracy is None else f"{champion_accuracy:.4f}",
         "margin": f"{params.package.promote_margin}", "decision": decision.reason,
         "bundle": packaged.archive},
        tracking.ui_hint(),
    )
    return PackageResult(
        bundle_dir=packaged.bundle_dir, archive=packaged.archive, model_name=name, version=version,
        promoted=decision.promote, reason=decision.reason, challenger_accuracy=challenger_accuracy,
        champion_accuracy=champion_accuracy,
    )


def resolve_bundle(source: str, cache_dir: str = ".visionflow") -> Path:
    """A verified local bundle folder for a folder, a .tar.gz, or `models:/NAME@ALIAS` / `models:/NAME/VERSION`."""
    if source.startswith("models:/"):
        ref = source.removeprefix("models:/")
        c = tracking.client()
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = tracking.alias_version(name, alias)
            if version is None:
                raise VisionflowError(f"no model version {source} in {tracking.tracking_uri()}")
        else:
            name, _, number = ref.partition("/")
            try:
                version = c.get_model_version(name, number)
            except Exception:
                raise VisionflowError(f"no model version {source} in {tracking.tracking_uri()}") from None
        dest = Path(cache_dir) / "registry" / name / str(version.version)
        if not (dest / BUNDLE_ARTIFACTS).is_dir():
            tracking.download_run_artifacts(version.run_id, BUNDLE_ARTIFACTS, dest)
        bundle = dest / BUNDLE_ARTIFACTS
    else:
        path = Path(source)
        if not path.exists():
            raise VisionflowError(f"bundle not found: {source}")
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            bundle = unpack_bundle(path, Path(cache_dir) / "bundles" / digest)
        else:
            bundle = path
    verify_bundle(bundle)
    return bundle.resolve()


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
