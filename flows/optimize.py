"""Compression stage: fp32 ONNX reference, int8 (static, dynamic), structured / unstructured pruning,
knowledge distillation with its no-teacher baseline — every variant measured the same way on the
same test split, gated against the reference, compared in one table and plot."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel

from components import tracking
from components.config import PipelineParams, load_params
from components.errors import VisionflowError
from components.optimization.measure import (
    VariantResult,
    best_variant,
    gate,
    slower_than,
    unmade_variant,
    write_comparison,
)
from components.optimization.variants import (
    REFERENCE,
    QuantizeMode,
    VariantOutcome,
    pruned_name,
    pruned_variant,
    quantized_name,
    quantized_variant,
    reference_variant,
    sparse_name,
    sparse_variant,
    student_name,
    student_variant,
    with_checkpoint_channels,
)
from flows.runs import finished_pipeline_run


class OptimizeResult(BaseModel):
    """The compression stage's variants, the best accepted one and where the comparison is."""

    run_id: str
    variants: list[VariantResult]
    best: str | None
    objective: str
    comparison_csv: str
    comparison_md: str
    tradeoff_png: str
    int8_onnx: str | None


@contextmanager
def _variant_run(parent_run_id: str, experiment: str, name: str, params: dict):
    """A nested MLflow run for one variant; ended FAILED (or KILLED) when the block raises."""
    tags = {tracking.STAGE_TAG: "optimize", "visionflow.variant": name}
    with tracking.run_scope(experiment, name, tags, parent_run_id=parent_run_id) as run:
        tracking.log_params(run.run_id, params)
        yield run.run_id


def _logged(run_id: str, outcome: VariantOutcome) -> VariantResult:
    """Log a variant's figures (and extra metrics) and its ONNX file to its run; returns its VariantResult."""
    for warning in outcome.warnings:
        get_run_logger().warning(warning)
    result = outcome.result
    figures = {k: v for k, v in result.model_dump().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(run_id, {**outcome.extra_metrics, **figures})
    tracking.log_artifacts(run_id, [result.artifact, *outcome.files], "model")
    return result


def _unmade(name: str, method: str, err: Exception, params: PipelineParams) -> VariantResult:
    """The table row of a variant that could not be made (its own MLflow run ended FAILED), with a warning."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    get_run_logger().warning("%s could not be made, the other variants go on: %s", name, reason)
    return unmade_variant(name, method, reason, params.optimize.threads)


@task(name="optimize-reference")
def reference_task(
    checkpoint: str, manifest: str, params: PipelineParams, out_dir: str, parent_run_id: str
) -> VariantResult:
    """Export the trained model to fp32 ONNX and measure it: the reference every variant is gated against."""
    with _variant_run(parent_run_id, params.run.experiment, REFERENCE, {"method": "onnx fp32"}) as run_id:
        return _logged(run_id, reference_variant(checkpoint, manifest, params, out_dir))


@task(name="optimize-quantize")
def quantize_task(
    reference_onnx: str,
    mode: QuantizeMode,
    checkpoint: str,
    manifest: str,
    params: PipelineParams,
    out_dir: str,
    parent_run_id: str,
) -> VariantResult:
    """int8 post-training quantization of the fp32 ONNX model with onnxruntime (static QDQ or dynamic)."""
    q = params.optimize.quantize
    name = quantized_name(mode)
    run_params = {"method": name, **{k: v for k, v in q.model_dump().items() if k not in ("static", "dynamic")}}
    try:
        with _variant_run(parent_run_id, params.run.experiment, name, run_params) as run_id:
            outcome = quantized_variant(reference_onnx, mode, checkpoint, manifest, params, out_dir)
            return _logged(run_id, outcome)
    except Exception as err:  # a model onnxruntime cannot quantize: its row says so, the stage goes on
        return _unmade(name, f"onnxruntime {mode} int8", err, params)


@task(name="optimize-prune")
def prune_task(
    checkpoint: str, manifest: str, params: PipelineParams, out_dir: str, parent_run_id: str
) -> VariantResult:
    """Structured channel pruning (torch-pruning), fine-tuned, exported and measured."""
    p = params.optimize.prune
    run_params = {f"prune.{k}": v for k, v in p.model_dump().items()}
    try:
        with _variant_run(parent_run_id, params.run.experiment, pruned_name(p), run_params) as run_id:
            return _logged(run_id, pruned_variant(checkpoint, manifest, params, out_dir))
    except Exception as err:  # a network torch-pruning cannot prune: its row says so, the stage goes on
        return _unmade(pruned_name(p), f"structured {p.importance} pruning {p.ratio:.0%}", err, params)


@task(name="optimize-sparsify")
def sparsify_task(
    checkpoint: str, manifest: str, params: PipelineParams, out_dir: str, parent_run_id: str
) -> VariantResult:
    """Global unstructured magnitude pruning: sparse weights, same dense shapes (no speed-up on dense kernels)."""
    amount = params.optimize.prune.unstructured_amount
    name = sparse_name(amount)
    with _variant_run(parent_run_id, params.run.experiment, name, {"unstructured_amount": amount}) as run_id:
        return _logged(run_id, sparse_variant(checkpoint, manifest, params, out_dir))


@task(name="optimize-distill")
def distill_task(
    checkpoint: str, manifest: str, params: PipelineParams, out_dir: str, parent_run_id: str, with_teacher: bool
) -> VariantResult:
    """Train the student architecture with the teacher (Hinton loss) or, as the baseline, without it."""
    d = params.optimize.distill
    name = student_name(d, with_teacher)
    run_params = {f"distill.{k}": v for k, v in d.model_dump().items()} | {"with_teacher": with_teacher}
    with _variant_run(parent_run_id, params.run.experiment, name, run_params) as run_id:
        return _logged(run_id, student_variant(checkpoint, manifest, params, out_dir, with_teacher))


def _flag_slower(gated: list[VariantResult]) -> list[VariantResult]:
    """Warn about, and note in the table, every variant slower than the fp32 reference on this machine."""
    reference = next(v for v in gated if v.name == REFERENCE)
    flagged = []
    for v in gated:
        slower = slower_than(v, reference) if v.name != REFERENCE else []
        if slower:
            get_run_logger().warning(
                "%s is slower than fp32 on this machine (%s): %s", v.name, v.machine or "?", "; ".join(slower)
            )
            note = "; ".join(filter(None, [v.note, f"slower than fp32 at {', '.join(slower)}"]))
            v = v.model_copy(update={"note": note})
        flagged.append(v)
    return flagged


@task(name="optimize-compare")
def compare_task(
    variants: list[VariantResult], params: PipelineParams, out_dir: str, parent_run_id: str
) -> tuple[list[VariantResult], str | None, tuple[str, str, str]]:
    """Gate every variant against the fp32 reference, pick the best accepted one, write and log the comparison."""
    o = params.optimize
    gated = _flag_slower(gate(variants, REFERENCE, o.tolerance))
    reference = next(v for v in gated if v.name == REFERENCE)
    best = best_variant([v for v in gated if v.name != REFERENCE], o.objective, reference)
    files = write_comparison(gated, Path(out_dir))
    tracking.log_artifacts(parent_run_id, files, "optimize")
    tags = {"visionflow.best_variant": best.name if best else "none", "visionflow.measured_on": reference.machine}
    tracking.set_tags(parent_run_id, tags)
    for v in (v for v in gated if v.artifact):  # a variant that could not be made has no figures
        tracking.log_metrics(
            parent_run_id,
            {
                f"optimize/{v.name}/accuracy": v.accuracy,
                f"optimize/{v.name}/latency_b1_ms": v.latency_b1_ms,
                f"optimize/{v.name}/size_bytes": v.size_bytes,
            },
        )
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key="compression-comparison",
        markdown=f"{Path(files[1]).read_text()}\n\nMLflow: {tracking.run_link(parent_run_id)}\n",
        description="Compression variants against the fp32 reference",
    )
    get_run_logger().info("best accepted variant (%s): %s", o.objective, best.name if best else "none")
    return gated, (best.name if best else None), tuple(str(f) for f in files)


def optimize_stage(
    checkpoint: str, manifest: str, params: PipelineParams, run_dir: str, parent_run_id: str
) -> OptimizeResult:
    """Run every enabled variant task and the comparison; returns the OptimizeResult."""
    o = params.optimize
    out_dir = str(Path(run_dir) / "optimize")
    reference = reference_task(checkpoint, manifest, params, out_dir, parent_run_id)
    variants = [reference]
    for mode, enabled in (("static", o.quantize.static), ("dynamic", o.quantize.dynamic)):
        if enabled:
            variants.append(
                quantize_task(reference.artifact, mode, checkpoint, manifest, params, out_dir, parent_run_id)
            )
    if o.prune.enabled:
        variants.append(prune_task(checkpoint, manifest, params, out_dir, parent_run_id))
    if o.prune.unstructured_amount > 0:
        variants.append(sparsify_task(checkpoint, manifest, params, out_dir, parent_run_id))
    if o.distill.enabled:
        variants.append(distill_task(checkpoint, manifest, params, out_dir, parent_run_id, with_teacher=True))
        if o.distill.baseline:
            variants.append(distill_task(checkpoint, manifest, params, out_dir, parent_run_id, with_teacher=False))
    gated, best, (csv_path, md_path, png_path) = compare_task(variants, params, out_dir, parent_run_id)
    int8 = next((v for v in gated if v.name == quantized_name("static") and v.accepted), None)
    return OptimizeResult(
        run_id=parent_run_id,
        variants=gated,
        best=best,
        objective=o.objective,
        comparison_csv=csv_path,
        comparison_md=md_path,
        tradeoff_png=png_path,
        int8_onnx=int8.artifact if int8 else None,
    )


@flow(name="visionflow-optimize", log_prints=True)
def optimize_flow(
    checkpoint: str, manifest: str, params: PipelineParams, run_dir: str, source_run_id: str | None = None
) -> OptimizeResult:
    """Compress a trained checkpoint on a validated manifest under a new MLflow run; returns the OptimizeResult."""
    tags = {
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
        "visionflow.source_run": source_run_id or "",
        tracking.RUN_DIR_TAG: run_dir,
    }
    name = f"optimize-{Path(checkpoint).stem}"
    expected = (VisionflowError, ValueError)  # ValueError: a pruning ratio torch-pruning cannot honour
    with tracking.run_scope(params.run.experiment, name, tags, stage="optimize", stage_errors=expected) as run:
        optimize_params = {f"optimize.{k}": v for k, v in params.optimize.model_dump().items()}
        tracking.log_params(run.run_id, {"checkpoint": checkpoint, **optimize_params})
        return optimize_stage(checkpoint, manifest, params, run_dir, run.run_id)


def optimize_from_run(run_id: str, overrides: list[str]) -> OptimizeResult:
    """Compress the model of a finished pipeline run (its params, checkpoint and validated manifest)."""
    run_dir, finished = finished_pipeline_run(run_id, "optimize")
    params = load_params(run_dir / "params.yaml", ["optimize.enabled=true", *overrides])
    checkpoint = finished["checkpoint"]
    out = run_dir / f"optimize-{time.strftime('%Y%m%d-%H%M%S')}"
    return optimize_flow(
        checkpoint, str(run_dir / "data" / "manifest.clean.csv"), params, str(out), source_run_id=run_id
    )


def optimize_from_checkpoint(checkpoint: str, params: PipelineParams) -> OptimizeResult:
    """Compress a checkpoint on a data set given by params.data (ingested and validated first)."""
    from components.data.ingest import ingest
    from components.data.validate import validate

    run_dir = (Path(params.run.output_dir) / f"optimize-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    params = with_checkpoint_channels(params, checkpoint)
    snapshot = ingest(params.data, run_dir / "snapshot", Path(params.run.cache_dir))
    report = validate(snapshot, params.data, run_dir / "data")
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return optimize_flow(checkpoint, report.clean_manifest_path, params, str(run_dir))
