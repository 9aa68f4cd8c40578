"""One function per compression variant: each takes the params and its inputs (paths: the trained
checkpoint, the validated manifest, an output folder), builds the variant's ONNX file, measures it
on the test split and returns a VariantOutcome. MLflow runs and logging are the caller's.

Variants: the fp32 ONNX reference, int8 (static, dynamic), structured pruning with fine-tuning,
unstructured magnitude pruning, and a student trained with the teacher (distilled) or without it
(its baseline)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from components.config import DistillParams, PipelineParams, PruneParams
from components.data.augment import build_eval_transform
from components.data.dataset import eval_arrays
from components.data.ingest import read_manifest
from components.data.manifest import rows_of_split
from components.optimization.distill import DistillationModule, check_teacher_classes
from components.optimization.int8_fallback import quantize_with_fallback
from components.optimization.measure import VariantResult, machine_summary, measure_onnx
from components.optimization.prune import count_macs_params, prune_structured, prune_unstructured, save_pruned
from components.optimization.quantize import quantize_dynamic, quantize_static
from components.packaging.export import export_onnx
from components.training.fit import fit_in_process, model_spec_from_params
from components.training.module import Classifier, ClassifierModule, load_classifier

REFERENCE = "fp32"
QuantizeMode = Literal["static", "dynamic"]


class VariantOutcome(BaseModel):
    """A measured variant, the metrics its run logs beyond the VariantResult's own figures, and warnings
    worth showing (a MACs count that could not be made, say)."""

    result: VariantResult
    extra_metrics: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    files: list[str] = Field(default_factory=list)  # logged beside the model (the int8 fallback report)


class _TestSet(NamedTuple):
    classifier: Classifier
    images: np.ndarray
    targets: np.ndarray


def quantized_name(mode: QuantizeMode) -> str:
    """The variant name of int8 quantization in `mode`."""
    return f"int8-{mode}"


def pruned_name(prune: PruneParams) -> str:
    """The variant name of structured pruning at prune.ratio."""
    return f"pruned-{int(prune.ratio * 100)}"


def sparse_name(amount: float) -> str:
    """The variant name of unstructured pruning of `amount` of the weights."""
    return f"sparse-{int(amount * 100)}"


def student_name(distill: DistillParams, with_teacher: bool) -> str:
    """The variant name of the student trained with the teacher (distilled) or without it (baseline)."""
    return f"student-{distill.student}-{'distilled' if with_teacher else 'baseline'}"


def _test_set(checkpoint: str, manifest: str, max_pixels: int) -> _TestSet:
    classifier = load_classifier(checkpoint)
    rows = rows_of_split(read_manifest(manifest), "test")
    transform = build_eval_transform(classifier.augment)
    multilabel = classifier.task == "multilabel"  # 0/1 targets per label: measure_onnx gates on mAP
    images, targets = eval_arrays(
        rows, classifier.classes, transform, classifier.spec.in_channels, max_pixels, multilabel
    )
    return _TestSet(classifier, images, targets)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_macs(model: nn.Module, images: np.ndarray, warnings: list[str]) -> int | None:
    """MACs of one forward pass on the first test image, or None (and a warning) where torch-pruning cannot
    count them."""
    try:
        return count_macs_params(model, torch.from_numpy(images[:1]))[0]
    except Exception as err:  # a MACs figure is informative only; never fail a variant for it
        warnings.append(f"could not count MACs of {type(model).__name__}: {err}")
        return None


def _measured(
    name: str, method: str, onnx_path: Path, test: _TestSet, settings: PipelineParams, **extra
) -> VariantResult:
    """measure_onnx of the file on the test set as a VariantResult; `extra` fills the other fields (params,
    macs, note)."""
    o = settings.optimize
    figures = measure_onnx(
        onnx_path, test.images, test.targets, test.classifier.classes, threads=o.threads, repeats=o.latency_repeats
    )
    return VariantResult(
        name=name,
        method=method,
        artifact=str(onnx_path),
        threads=o.threads,
        machine=machine_summary(o.threads),
        **{**figures, **extra},
    )


def reference_variant(checkpoint: str, manifest: str, params: PipelineParams, out_dir: str) -> VariantOutcome:
    """The trained model exported to fp32 ONNX (out_dir/fp32/model.onnx) and measured: the reference every
    variant is gated against."""
    test = _test_set(checkpoint, manifest, params.data.max_pixels)
    model, warnings = test.classifier.model, []
    onnx_path = export_onnx(model, test.classifier.spec, Path(out_dir) / REFERENCE / "model.onnx")
    result = _measured(
        REFERENCE,
        "onnx fp32",
        onnx_path,
        test,
        params,
        params=_count_params(model),
        macs=_count_macs(model, test.images, warnings),
    )
    return VariantOutcome(result=result, warnings=warnings)


def _split_arrays(classifier: Classifier, manifest: str, split: str, limit: int, max_pixels: int):
    """(images, targets) of the first `limit` rows of a split through the model's eval transform ([] when empty)."""
    rows = rows_of_split(read_manifest(manifest), split)[:limit]
    if not rows:
        return [], []
    transform = build_eval_transform(classifier.augment)
    multilabel = classifier.task == "multilabel"
    return eval_arrays(rows, classifier.classes, transform, classifier.spec.in_channels, max_pixels, multilabel)


def _static_int8(
    reference_onnx: str, test: _TestSet, manifest: str, params: PipelineParams, out: Path
) -> tuple[str, dict[str, float], list[str]]:
    """Static int8 of the fp32 file into `out` with the fp32 fallback search; returns (note, metrics, warnings)."""
    q, classifier = params.optimize.quantize, test.classifier
    calibration, _ = _split_arrays(classifier, manifest, "train", q.calibration_images, params.data.max_pixels)
    held_out, targets = _split_arrays(classifier, manifest, "val", 10**9, params.data.max_pixels)
    if len(held_out) == 0:  # no validation split: judge the search on the test split the gate uses
        held_out, targets = test.images, test.targets

    def score(path: Path) -> float:
        return measure_onnx(path, held_out, targets, classifier.classes, repeats=1, warmup=0)["accuracy"]

    if len(calibration) == 0:
        quantize_static(Path(reference_onnx), calibration, out)  # raises its one-line error
    report = quantize_with_fallback(
        Path(reference_onnx),
        calibration,
        out,
        score,
        target=score(Path(reference_onnx)) - params.optimize.tolerance,
        max_layers=q.fallback_layers,
        per_channel=q.per_channel,
        activation_type=q.activation_type,
        reduce_range=q.reduce_range,
    )
    (out.parent / "int8_fallback.json").write_text(report.model_dump_json(indent=2))
    metrics = {"fallback_full_int8_score": report.full_int8_score, "fallback_fp32_nodes": len(report.excluded_nodes)}
    if report.full_int8_path:
        full = measure_onnx(
            Path(report.full_int8_path),
            test.images,
            test.targets,
            classifier.classes,
            threads=params.optimize.threads,
            repeats=params.optimize.latency_repeats,
        )
        metrics |= {f"fallback_full_int8_{k}": full[k] for k in ("accuracy", "latency_b1_ms", "latency_b32_ms")}
    if report.full_int8_score >= report.target:
        return "", metrics, []
    if report.passed:
        note = f"kept in fp32 to pass: {', '.join(report.excluded_nodes)}"
        return note, metrics, [f"int8-static missed the tolerance fully quantized; {note}"]
    tried = f"{len(report.tries)} fp32 fallback tries" if report.tries else "no fp32 fallback (fallback_layers 0)"
    return f"misses the tolerance after {tried}", metrics, [f"int8-static misses the tolerance after {tried}"]


def quantized_variant(
    reference_onnx: str, mode: QuantizeMode, checkpoint: str, manifest: str, params: PipelineParams, out_dir: str
) -> VariantOutcome:
    """int8 post-training quantization of the fp32 ONNX file with onnxruntime: static QDQ calibrated on the
    first optimize.quantize.calibration_images training images, or dynamic. Writes out_dir/int8-MODE/model.onnx.

    A static model that misses the tolerance on the validation split (the test split when there is none)
    keeps its most damaged layers in fp32 until it passes or optimize.quantize.fallback_layers runs out
    (int8_fallback.json beside the model says what was tried); the note names the layers kept in fp32 and
    the run logs the fully quantized model's score and latency, so the speed cost shows."""
    test = _test_set(checkpoint, manifest, params.data.max_pixels)
    name = quantized_name(mode)
    out = Path(out_dir) / name / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    note, metrics, warnings = "", {}, []
    if mode == "static":
        note, metrics, warnings = _static_int8(reference_onnx, test, manifest, params, out)
    else:
        quantize_dynamic(Path(reference_onnx), out)
    if "fallback_full_int8_latency_b32_ms" in metrics:
        note += f" (speed cost at batch 32: {metrics['fallback_full_int8_latency_b32_ms']:.2f} ms fully int8 → "
    result = _measured(
        name, f"onnxruntime {mode} int8", out, test, params, params=_count_params(test.classifier.model), note=note
    )
    if "fallback_full_int8_latency_b32_ms" in metrics:
        result = result.model_copy(update={"note": f"{note}{result.latency_b32_ms:.2f} ms)"})
    files = [str(f) for f in [out.parent / "int8_fallback.json"] if f.is_file()]
    return VariantOutcome(result=result, extra_metrics=metrics, warnings=warnings, files=files)


def pruned_variant(checkpoint: str, manifest: str, params: PipelineParams, out_dir: str) -> VariantOutcome:
    """Structured channel pruning of a copy of the trained model (torch-pruning), fine-tuned for
    optimize.prune.finetune_epochs, saved (pruned_state.pth), exported and measured. Raises ValueError where
    torch-pruning cannot prune the network."""
    test = _test_set(checkpoint, manifest, params.data.max_pixels)
    p, classifier = params.optimize.prune, test.classifier
    model = copy.deepcopy(classifier.model)
    counts = prune_structured(model, torch.from_numpy(test.images[:1]), p.ratio, p.importance, p.global_pruning)
    if p.finetune_epochs:
        model.train()  # loaded in eval mode, and Lightning keeps a module's mode: BatchNorm must learn again
        module = ClassifierModule(
            classifier.spec.model_dump(),
            params.train.model_dump(),
            classifier.classes,
            classifier.augment.model_dump(),
            network=model,
        )
        fit_in_process(module, params, read_manifest(manifest), classifier.classes, p.finetune_epochs)
    directory = Path(out_dir) / pruned_name(p)
    save_pruned(model.eval(), directory / "pruned_state.pth")
    onnx_path = export_onnx(model.eval(), classifier.spec, directory / "model.onnx")
    result = _measured(
        pruned_name(p),
        f"structured {p.importance} pruning {p.ratio:.0%} + {p.finetune_epochs} epochs fine-tuning",
        onnx_path,
        test,
        params,
        params=counts["params_after"],
        macs=counts["macs_after"],
    )
    return VariantOutcome(result=result)


def sparse_variant(checkpoint: str, manifest: str, params: PipelineParams, out_dir: str) -> VariantOutcome:
    """Global unstructured magnitude pruning of optimize.prune.unstructured_amount of the weights: sparse
    weights, same dense shapes (no speed-up on dense kernels). Its run also logs the achieved sparsity."""
    test = _test_set(checkpoint, manifest, params.data.max_pixels)
    amount = params.optimize.prune.unstructured_amount
    name = sparse_name(amount)
    model = copy.deepcopy(test.classifier.model)
    sparsity = prune_unstructured(model, amount)
    onnx_path = export_onnx(model.eval(), test.classifier.spec, Path(out_dir) / name / "model.onnx")
    result = _measured(
        name,
        f"unstructured magnitude pruning ({sparsity:.0%} zeros; dense kernels, no speed-up)",
        onnx_path,
        test,
        params,
        params=_count_params(model),
        note=f"sparsity {sparsity:.2f}",
    )
    return VariantOutcome(result=result, extra_metrics={"sparsity": sparsity})


def _student_params(params: PipelineParams) -> PipelineParams:
    d = params.optimize.distill
    student = {"name": d.student, "dropout": d.student_dropout, "width": d.student_width, "pretrained": False}
    return params.model_copy(update={"model": params.model.model_copy(update=student)})


def student_variant(
    checkpoint: str, manifest: str, params: PipelineParams, out_dir: str, with_teacher: bool
) -> VariantOutcome:
    """The student architecture (optimize.distill) trained with the trained model as teacher (Hinton loss)
    or, as the baseline, without it; checkpointed (student.ckpt), exported and measured. Raises ValueError
    when the teacher's classes are not the data's."""
    test = _test_set(checkpoint, manifest, params.data.max_pixels)
    d, classifier, warnings = params.optimize.distill, test.classifier, []
    rows = read_manifest(manifest)
    check_teacher_classes(classifier.classes, sorted({r["label"] for r in rows}))
    student_params = _student_params(params)
    spec = model_spec_from_params(student_params, len(classifier.classes)).model_dump()
    optim, augment = params.train.model_dump(), classifier.augment.model_dump()
    if with_teacher:
        module = DistillationModule(
            spec, optim, classifier.classes, augment, teacher=classifier.model, temperature=d.temperature, alpha=d.alpha
        )
        method = f"{d.student} student distilled (T={d.temperature:g}, alpha={d.alpha:g})"
    else:
        module = ClassifierModule(spec, optim, classifier.classes, augment)
        method = f"{d.student} student trained without teacher"
    trainer = fit_in_process(module, student_params, rows, classifier.classes, d.epochs)
    directory = Path(out_dir) / student_name(d, with_teacher)
    directory.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(directory / "student.ckpt")
    student_spec = load_classifier(str(directory / "student.ckpt")).spec
    onnx_path = export_onnx(module.model.eval(), student_spec, directory / "model.onnx")
    result = _measured(
        student_name(d, with_teacher),
        method,
        onnx_path,
        test,
        params,
        params=_count_params(module.model),
        macs=_count_macs(module.model, test.images, warnings),
    )
    return VariantOutcome(result=result, warnings=warnings)


def with_checkpoint_channels(params: PipelineParams, checkpoint: str) -> PipelineParams:
    """`params` with data.channels set to the input channels of the model in `checkpoint` (so the data is read
    the way that model was trained)."""
    channels = load_classifier(checkpoint).spec.in_channels
    return params.model_copy(update={"data": params.data.model_copy(update={"channels": channels})})
