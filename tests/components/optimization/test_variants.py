"""The compression variants as components: each takes params and paths and returns a measured VariantOutcome."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import (
    AugmentParams,
    DataParams,
    DistillParams,
    ModelParams,
    OptimizeParams,
    PipelineParams,
    PruneParams,
    QuantizeParams,
    RunParams,
    TrainParams,
)
from components.optimization.variants import (
    pruned_variant,
    quantized_variant,
    reference_variant,
    sparse_variant,
    student_variant,
    with_checkpoint_channels,
)
from components.training.module import ClassifierModule
from tests.helpers.tiny import CLASSES, SPEC, tiny_data, trained_cnn

AUGMENT = AugmentParams(image_size=16, mean=[0.5], std=[0.5], hflip_p=0.0, eval_resize_ratio=1.0)


def _write_images(root: Path) -> Path:
    """tiny_data as 16x16 grayscale PNGs (train/val/test) and a manifest of them; returns the manifest path."""
    x, y = tiny_data(60)
    pixels = ((x[:, 0] * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).numpy()
    rows = []
    for i, (image, label) in enumerate(zip(pixels, y.tolist(), strict=True)):
        path = root / "images" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image), "L").save(path)
        rows.append({"path": str(path), "label": CLASSES[label], "split": ("train", "train", "val", "test")[i % 4]})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _write_checkpoint(path: Path) -> Path:
    """The tiny trained CNN as a visionflow checkpoint (what load_classifier reads)."""
    module = ClassifierModule(
        SPEC.model_dump(), TrainParams().model_dump(), CLASSES, AUGMENT.model_dump(), network=trained_cnn()
    )
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    params = PipelineParams(
        data=DataParams(path=str(root), channels=1, cache=False),
        augment=AUGMENT,
        model=ModelParams(name="cnn", width=1.0, pretrained=False),
        train=TrainParams(
            max_epochs=1, batch_size=16, lr=0.01, warmup_epochs=0, num_workers=0, early_stopping_patience=0
        ),
        optimize=OptimizeParams(
            latency_repeats=3,
            prune=PruneParams(ratio=0.5, finetune_epochs=1, unstructured_amount=0.5),
            quantize=QuantizeParams(calibration_images=8),
            distill=DistillParams(epochs=1, student="cnn", student_width=0.25),
        ),
        run=RunParams(output_dir=str(root / "runs"), cache_dir=str(root / "cache")),
    )
    return str(_write_checkpoint(root / "model.ckpt")), str(_write_images(root)), params, root / "optimize"


@pytest.fixture(scope="module")
def reference(inputs):
    checkpoint, manifest, params, out = inputs
    return reference_variant(checkpoint, manifest, params, str(out))


def test_reference_is_the_fp32_export_measured_on_the_test_split(reference):
    result = reference.result
    assert result.name == "fp32" and Path(result.artifact) == Path(result.artifact).parent / "model.onnx"
    assert Path(result.artifact).is_file() and result.size_bytes == Path(result.artifact).stat().st_size
    assert result.params == sum(p.numel() for p in trained_cnn().parameters())
    assert result.macs and result.macs > 0 and 0 <= result.accuracy <= 1
    assert reference.warnings == [] and reference.extra_metrics == {}


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_quantized_variants_are_new_int8_files(inputs, reference, mode):
    checkpoint, manifest, params, out = inputs
    outcome = quantized_variant(reference.result.artifact, mode, checkpoint, manifest, params, str(out))
    assert outcome.result.name == f"int8-{mode}" and Path(outcome.result.artifact).is_file()
    assert outcome.result.artifact != reference.result.artifact
    assert outcome.result.macs is None and outcome.result.params == reference.result.params
    assert "int8 instruction sets" in outcome.result.machine and "onnxruntime" in outcome.result.machine
    if mode == "static":
        assert outcome.result.size_bytes < reference.result.size_bytes
        # the fallback search's report is logged beside the model, with the fully quantized model's score
        assert [Path(f).name for f in outcome.files] == ["int8_fallback.json"]
        assert 0 <= outcome.extra_metrics["fallback_full_int8_score"] <= 1


def test_sparse_variant_reports_its_sparsity(inputs, reference):
    checkpoint, manifest, params, out = inputs
    outcome = sparse_variant(checkpoint, manifest, params, str(out))
    assert outcome.result.name == "sparse-50" and outcome.extra_metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert outcome.result.params == reference.result.params and outcome.result.note == "sparsity 0.50"


def test_pruned_variant_is_smaller_and_saved(inputs, reference):
    checkpoint, manifest, params, out = inputs
    outcome = pruned_variant(checkpoint, manifest, params, str(out))
    assert outcome.result.name == "pruned-50" and "1 epochs fine-tuning" in outcome.result.method
    assert outcome.result.params < 0.8 * reference.result.params and outcome.result.macs < reference.result.macs
    assert (Path(outcome.result.artifact).parent / "pruned_state.pth").is_file()


@pytest.mark.parametrize("with_teacher", [True, False])
def test_student_variants_train_a_smaller_network(inputs, reference, with_teacher):
    checkpoint, manifest, params, out = inputs
    outcome = student_variant(checkpoint, manifest, params, str(out), with_teacher)
    kind = "distilled" if with_teacher else "baseline"
    assert outcome.result.name == f"student-cnn-{kind}" and ("T=" in outcome.result.method) == with_teacher
    assert outcome.result.params < reference.result.params and outcome.result.macs < reference.result.macs
    assert (Path(outcome.result.artifact).parent / "student.ckpt").is_file()


def test_student_refuses_data_of_other_classes(inputs, tmp_path):
    checkpoint, manifest, params, out = inputs
    with Path(manifest).open(newline="") as f:
        rows = list(csv.DictReader(f))
    other = tmp_path / "other.csv"
    with other.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        # a class the teacher never saw, among the training images only (the test split still loads)
        writer.writerows(
            {**row, "label": "z"} if row["split"] == "train" and row["label"] == "c" else row for row in rows
        )
    with pytest.raises(ValueError, match="classes differ"):
        student_variant(checkpoint, str(other), params, str(tmp_path / "optimize"), with_teacher=True)


def test_checkpoint_channels_set_the_data_channels(inputs):
    checkpoint, _, params, _ = inputs
    three = params.model_copy(update={"data": params.data.model_copy(update={"channels": 3})})
    assert with_checkpoint_channels(three, checkpoint).data.channels == 1
