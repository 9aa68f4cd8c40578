"""Compression stage: fp32 ONNX reference, int8 (static, dynamic), structured / unstructured pruning,
knowledge distillation with its no-teacher baseline — every variant measured the same way on the
same test split, gated against the reference, compared in one table and plot."""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel

from components import tracking
from components.config import PipelineParams, load_params
from components.data.augment import build_eval_transform
from components.data.dataset import eval_arrays, rows_of_split
from components.data.ingest import read_manifest
from components.errors import StageError, VisionflowError
from components.optimization.distill import DistillationModule, check_teacher_classes
from components.optimization.measure import VariantResult, best_variant, gate, measure_onnx, write_comparison
from components.optimization.prune import count_macs_params, prune_structured, prune_unstructured, save_pruned
from components.optimization.quantize import quantize_dynamic, quantize_static
from components.packaging.export import export_onnx
from components.training.fit import fit_in_process, model_spec_from_params
from components.training.module import ClassifierModule, load_classifier
from flows.tasks import end_status, finished_pipeline_run

REFERENCE = "fp32"


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


def _test_set(checkpoint: str, manifest: str, max_pixels: int):
    classifier = load_classifier(checkpoint)
    rows = rows_of_split(read_manifest(manifest), "test")
    images, targets = eval_arrays(
        rows, classifier.classes, build_eval_transform(classifier.augment), classifier.spec.in_channels, max_pixels
    )
    return classifier, images, targets


@contextmanager
def _variant_run(parent_run_id: str, experiment: str, name: str, params: dict):
    """A nested MLflow run for one variant; ended FAILED (or KILLED) when the block raises."""
    run_id = tracking.start_run(
        experiment, name, {tracking.STAGE_TAG: "optimize", "visionflow.variant": name}, parent_run_id=parent_run_id
    )
    tracking.log_params(run_id, params)
    try:
        yield run_id
    except BaseException as err:
        tracking.end_run(run_id, end_status(err))
        raise
    tracking.end_run(run_id, tracking.RunStatus.FINISHED)


def _measured(
    name: str, method: str, onnx_path: Path, images, targets, classes, settings: PipelineParams, run_id: str, **extra
) -> VariantResult:
    figures = measure_onnx(
        onnx_path,
        images,
        targets,
        classes,
        threads=settings.optimize.threads,
        repeats=settings.optimize.latency_repeats,
    )
    result = VariantResult(
        name=name, method=method, artifact=str(onnx_path), threads=settings.optimize.threads, **{**figures, **extra}
    )
    tracking.log_metrics(
        run_id,
        {k: v for k, v in result.model_dump().items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    )
    tracking.log_artifacts(run_id, [onnx_path], "model")
    return result


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_macs(model, images) -> int | None:
    """MACs of one forward pass on the first test image, or None where torch-pruning cannot count them."""
    import torch

    try:
        return count_macs_params(model, torch.from_numpy(images[:1]))[0]
    except Exception as err:  # a MACs figure is informative only; never fail a variant for it
        get_run_logger().warning("could not count MACs of %s: %s", type(model).__name__, err)
        return None


@task(name="optimize-reference")
def reference_task(
    checkpoint: str, manifest: str, params: PipelineParams, out_dir: str, parent_run_id: str
) -> VariantResult:
    """Export the trained model to fp32 ONNX and measure it: the reference every variant is gated against."""
    classifier, images, targets = _test_set(checkpoint, manifest, params.data.max_pixels)
    with _variant_run(parent_run_id, params.run.experiment, REFERENCE, {"method": "onnx fp32"}) as run_id:
        onnx_path = export_onnx(classifier.model, classifier.spec, Path(out_dir) / "fp32" / "model.onnx")
        return _measured(
            REFERENCE,
            "onnx fp32",
            onnx_path,
            images,
            targets,
            classifier.classes,
            params,
            run_id,
            params=_count_params(classifier.model),
            macs=_count_macs(classifier.model, images),
        )


@task(name="optimize-quantize")
def quantize_task(
    reference_onnx: str,
    mode: str,
    checkpoint: str,
    manifest: str,
    params: PipelineParams,
    out_dir: str,
    parent_run_id: str,
) -> VariantResult:
    """int8 post-training quantization of the fp32 ONNX model with onnxruntime (static QDQ or dynamic)."""
    classifier, images, targets = _test_set(checkpoint, manifest, params.data.max_pixels)
    q = params.optimize.quantize
    name = f"int8-{mode}"
    with _variant_run(
        parent_run_id,
        params.run.experiment,
        name,
        {"method": name, "per_channel": q.per_channel, "calibration_images": q.calibration_images},
    ) as run_id:
        out = Path(out_dir) / name / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        if mode == "static":
            train_rows = rows_of_split(read_manifest(manifest), "train")[: q.calibration_images]
            calibration, _ = (
                eval_arrays(
                    train_rows,
                    classifier.classes,
                    build_eval_transform(classifier.augment),
                    classifier.spec.in_channels,
                    params.data.max_pixels,
                )
                if train_rows
                else ([], [])
            )
            quantize_static(Path(reference_onnx), calibration, out, per_channel=q.per_channel)
        else:
            quantize_dynamic(Path(reference_onnx), out)
        return _measured(
            name,
            f"onnxruntime {mode} int8",
            out,
            images,
            targets,
            classifier.classes,
            params,
            run_id,
            params=_count_params(classifier.model),
        )


@task(name="optimize-prune")
def prune_task(
    checkpoint: str, manifest: str, params: PipelineParams, out_dir: str, parent_run_id: str
) -> VariantResult:
    """Structured channel pruning (torch-pruning), fine-tuned, exported and measured."""
    import torch

    classifier, images, targets = _test_set(checkpoint, manifest, params.data.max_pixels)
    p = params.optimize.prune
    name = f"pruned-{int(p.ratio * 100)}"
    with _variant_run(
        parent_run_id, params.run.experiment, name, {f"prune.{k}": v for k, v in p.model_dump().items()}
    ) as run_id:
        model = copy.deepcopy(classifier.model)
        counts = prune_structured(model, torch.from_numpy(images[:1]), p.ratio, p.importance, p.global_pruning)
        if p.finetune_epochs:
            module = ClassifierModule(
                classifier.spec.model_dump(),
                params.train.model_dump(),
                classifier.classes,
                classifier.augment.model_dump(),
                network=model,
            )
            fit_in_process(module, params, read_manifest(manifest), classifier.classes, p.finetune_epochs)
        directory = Path(out_dir) / name
        save_pruned(model.eval(), directory / "pruned_state.pth")
        onnx_path = export_onnx(model.eval(), classifier.spec, directory / "model.onnx")
        return _measured(
            name,
            f"structured {p.importance} pruning {p.ratio:.0%} + {p.finetune_epochs} epochs fine-tuning",
            onnx_path,
            images,
            targets,
            classifier.classes,
            params,
            run_id,
            params=counts["params_after"],
            macs=counts["macs_after"],
        )


@task(name="optimize-sparsify")
def sparsify_task(
    checkpoint: str, manifest: str, params: PipelineParams, out_dir: str, parent_run_id: str
) -> VariantResult:
    """Global unstructured magnitude pruning: sparse weights, same dense shapes (no speed-up on dense kernels)."""
    classifier, images, targets = _test_set(checkpoint, manifest, params.data.max_pixels)
    amount = params.optimize.prune.unstructured_amount
    name = f"sparse-{int(amount * 100)}"
    with _variant_run(parent_run_id, params.run.experiment, name, {"unstructured_amount": amount}) as run_id:
        model = copy.deepcopy(classifier.model)
        sparsity = prune_unstructured(model, amount)
        tracking.log_metrics(run_id, {"sparsity": sparsity})
        onnx_path = export_onnx(model.eval(), classifier.spec, Path(out_dir) / name / "model.onnx")
        return _measured(
            name,
            f"unstructured magnitude pruning ({sparsity:.0%} zeros; dense kernels, no speed-up)",
            onnx_path,
            images,
            targets,
            classifier.classes,
            params,
            run_id,
            params=_count_params(model),
            note=f"sparsity {sparsity:.2f}",
        )


@task(name="optimize-distill")
def distill_task(
    checkpoint: str, manifest: str, params: PipelineParams, out_dir: str, parent_run_id: str, with_teacher: bool
) -> VariantResult:
    """Train the student architecture with the teacher (Hinton loss) or, as the baseline, without it."""
    classifier, images, targets = _test_set(checkpoint, manifest, params.data.max_pixels)
    d = params.optimize.distill
    rows = read_manifest(manifest)
    check_teacher_classes(classifier.classes, sorted({r["label"] for r in rows}))
    name = f"student-{d.student}-{'distilled' if with_teacher else 'baseline'}"
    student_params = params.model_copy(
        update={
            "model": params.model.model_copy(
                update={"name": d.student, "dropout": d.student_dropout, "width": d.student_width, "pretrained": False}
            )
        }
    )
    spec = model_spec_from_params(student_params, len(classifier.classes)).model_dump()
    with _variant_run(
        parent_run_id,
        params.run.experiment,
        name,
        {f"distill.{k}": v for k, v in d.model_dump().items()} | {"with_teacher": with_teacher},
    ) as run_id:
        if with_teacher:
            module = DistillationModule(
                spec,
                params.train.model_dump(),
                classifier.classes,
                classifier.augment.model_dump(),
                teacher=classifier.model,
                temperature=d.temperature,
                alpha=d.alpha,
            )
        else:
            module = ClassifierModule(
                spec, params.train.model_dump(), classifier.classes, classifier.augment.model_dump()
            )
        trainer = fit_in_process(module, student_params, rows, classifier.classes, d.epochs)
        directory = Path(out_dir) / name
        directory.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(directory / "student.ckpt")
        onnx_path = export_onnx(
            module.model.eval(), load_classifier(str(directory / "student.ckpt")).spec, directory / "model.onnx"
        )
        return _measured(
            name,
            f"{d.student} student {f'distilled (T={d.temperature:g}, alpha={d.alpha:g})' if with_teacher else 'trained without teacher'}",
            onnx_path,
            images,
            targets,
            classifier.classes,
            params,
            run_id,
            params=_count_params(module.model),
            macs=_count_macs(module.model, images),
        )


@task(name="optimize-compare")
def compare_task(
    variants: list[VariantResult], params: PipelineParams, out_dir: str, parent_run_id: str
) -> tuple[list[VariantResult], str | None, tuple[str, str, str]]:
    """Gate every variant against the fp32 reference, pick the best accepted one, write and log the comparison."""
    o = params.optimize
    gated = gate(variants, REFERENCE, o.tolerance)
    best = best_variant([v for v in gated if v.name != REFERENCE], o.objective)
    files = write_comparison(gated, Path(out_dir))
    tracking.log_artifacts(parent_run_id, files, "optimize")
    tracking.set_tags(parent_run_id, {"visionflow.best_variant": best.name if best else "none"})
    for v in gated:
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
    int8 = next((v for v in gated if v.name == "int8-static" and v.accepted), None)
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
    run_id = tracking.start_run(
        params.run.experiment,
        f"optimize-{Path(checkpoint).stem}",
        {
            "prefect.flow_run_id": str(flow_run.id or ""),
            "prefect.flow_run_url": str(flow_run.ui_url or ""),
            "visionflow.source_run": source_run_id or "",
            tracking.RUN_DIR_TAG: run_dir,
        },
    )
    tracking.log_params(
        run_id, {"checkpoint": checkpoint, **{f"optimize.{k}": v for k, v in params.optimize.model_dump().items()}}
    )
    try:
        result = optimize_stage(checkpoint, manifest, params, run_dir, run_id)
    except BaseException as err:
        tracking.set_tags(run_id, {tracking.FAILED_STAGE_TAG: "optimize", "visionflow.error": str(err)[:500]})
        tracking.end_run(run_id, end_status(err))
        if isinstance(err, VisionflowError) and not isinstance(err, StageError):
            raise StageError("optimize", str(err)) from err
        if isinstance(err, ValueError):
            raise StageError("optimize", str(err)) from err
        raise
    tracking.end_run(run_id, tracking.RunStatus.FINISHED)
    return result


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
    params = params.model_copy(
        update={"data": params.data.model_copy(update={"channels": load_classifier(checkpoint).spec.in_channels})}
    )
    snapshot = ingest(params.data, run_dir / "snapshot", Path(params.run.cache_dir))
    report = validate(snapshot, params.data, run_dir / "data")
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return optimize_flow(checkpoint, report.clean_manifest_path, params, str(run_dir))
