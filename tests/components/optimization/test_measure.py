"""Measuring variants the same way, the tolerance gate, the best variant and the comparison files."""

import csv

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from components.optimization.measure import (
    VariantResult,
    best_variant,
    gate,
    machine_summary,
    measure_onnx,
    slower_than,
    unmade_variant,
    write_comparison,
)
from tests.helpers.tiny import CLASSES, tiny_data, trained_cnn_onnx


def _variant(name, accuracy, size, latency, **extra):
    return VariantResult(
        name=name,
        method=name,
        artifact=f"{name}.onnx",
        size_bytes=size,
        params=1000,
        macs=None,
        accuracy=accuracy,
        macro_f1=accuracy,
        latency_b1_ms=latency,
        latency_b32_ms=latency * 10,
        threads=1,
        **extra,
    )


def test_measure_onnx_reports_accuracy_size_and_latency():
    path = trained_cnn_onnx()
    x, y = tiny_data(45, seed=5)
    figures = measure_onnx(path, x.numpy(), y.numpy(), CLASSES, threads=1, repeats=3, warmup=1)
    assert set(figures) == {"accuracy", "macro_f1", "size_bytes", "latency_b1_ms", "latency_b32_ms"}
    assert figures["accuracy"] >= 0.9 and 0 < figures["macro_f1"] <= 1
    assert figures["size_bytes"] == path.stat().st_size
    assert figures["latency_b1_ms"] > 0 and figures["latency_b32_ms"] > 0
    result = VariantResult(name="fp32", method="onnx", artifact=str(path), threads=1, **figures)
    assert result.params is None


def test_measure_counts_only_the_primary_task_of_a_multitask_model(tmp_path):
    # A hand-made "multi-task" graph: 3 primary logits that are right, then 4 extra-task columns
    # that would win the arg-max if they were counted.
    x, y = tiny_data(12)
    weight = np.zeros((256, 7), np.float32)
    bias = np.array([0, 0, 0, 50, 50, 50, 50], np.float32)
    images = np.zeros((12, 1, 16, 16), np.float32)
    images.reshape(12, -1)[np.arange(12), y.numpy()] = 1.0
    weight[np.arange(3), np.arange(3)] = 10.0
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "multitask",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 7])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    path = tmp_path / "mt.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    figures = measure_onnx(path, images, y.numpy(), CLASSES, repeats=3, warmup=1)
    assert figures["accuracy"] == 1.0


def test_gate_rejects_a_variant_that_drops_too_much():
    variants = [_variant("fp32", 0.95, 1000, 2.0), _variant("int8", 0.945, 300, 1.0), _variant("bad", 0.5, 100, 0.5)]
    gated = gate(variants, "fp32", tolerance=0.01)
    assert [v.accepted for v in gated] == [True, True, False]
    assert gated[1].accuracy_drop == pytest.approx(0.005) and gated[2].accuracy_drop == pytest.approx(0.45)
    assert gated[0].accuracy_drop == 0.0
    assert variants[2].accepted  # inputs are not modified
    assert gate([_variant("fp32", 0.9, 1, 1), _variant("x", 0.89, 1, 1)], "fp32", 0.01)[1].accepted  # drop == tolerance
    with pytest.raises(ValueError, match="no variant named"):
        gate(variants, "missing", 0.01)


def test_best_variant_by_objective_among_accepted_only():
    gated = gate(
        [
            _variant("fp32", 0.95, 1000, 2.0),
            _variant("int8", 0.95, 300, 1.5),
            _variant("pruned", 0.945, 500, 0.8),
            _variant("bad", 0.5, 100, 0.1),
        ],
        "fp32",
        0.01,
    )
    assert best_variant(gated, "smallest").name == "int8"
    assert best_variant(gated, "fastest").name == "pruned"
    assert best_variant([v.model_copy(update={"accepted": False}) for v in gated], "smallest") is None


def test_a_variant_slower_than_fp32_is_never_best_for_speed():
    """int8-static faster at batch 1 but slower at batch 32 than fp32 (as measured on some x86 CPUs), int8-dynamic
    smallest and slower at both: neither is best for speed, and the smallest is the one not slower than fp32."""
    fp32 = _variant("fp32", 0.95, 1000, 2.0)
    static = _variant("int8-static", 0.95, 300, 1.5).model_copy(update={"latency_b32_ms": 25.0})
    dynamic = _variant("int8-dynamic", 0.95, 290, 5.0)
    pruned = _variant("pruned", 0.95, 500, 1.0)
    gated = gate([fp32, static, dynamic, pruned], "fp32", 0.01)
    assert slower_than(gated[1], fp32) == ["batch 32: 25.00 ms against 20.00 ms fp32"]
    assert len(slower_than(gated[2], fp32)) == 2 and slower_than(gated[3], fp32) == []
    assert best_variant(gated[1:], "fastest", fp32).name == "pruned"
    assert best_variant(gated[1:], "smallest", fp32).name == "pruned"
    assert best_variant(gated[1:3], "fastest", fp32) is None  # every accepted variant is slower than fp32
    assert best_variant(gated[1:3], "smallest", fp32).name == "int8-dynamic"  # by size, when none is as fast
    assert best_variant(gated[1:], "smallest").name == "int8-dynamic"  # without a reference: size alone


def test_write_comparison_writes_table_and_plot(tmp_path):
    variants = gate(
        [
            _variant("fp32", 0.95, 1_000_000, 2.0),
            _variant("int8-static", 0.94, 260_000, 0.9),
            _variant("bad|name", 0.4, 100_000, 0.4, note="deliberately bad"),
        ],
        "fp32",
        0.02,
    )
    csv_path, md_path, png_path = write_comparison(variants, tmp_path / "cmp")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["name"] for r in rows] == ["fp32", "int8-static", "bad|name"]
    assert rows[2]["accepted"] == "False"
    text = md_path.read_text().splitlines()
    assert "thread" in text[0] and ("on " in text[0])
    assert "int8 instruction sets" in text[0] and "onnxruntime" in text[0]  # which machine measured it
    assert machine_summary(1) in text[0]
    table = [line for line in text if line.startswith("|")]
    assert len(table) == 2 + len(variants)  # header, separator, one row per variant
    assert "**no**" in table[-1]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000


def test_a_variant_that_could_not_be_made_is_a_rejected_row(tmp_path):
    variants = gate(
        [
            _variant("fp32", 0.95, 1000, 2.0),
            unmade_variant("pruned-50", "structured l2 pruning 50%", "torch-pruning cannot prune Net: boom", 1),
            _variant("int8-static", 0.95, 300, 1.0),
        ],
        "fp32",
        0.01,
    )
    assert [v.accepted for v in variants] == [True, False, True]
    assert best_variant(variants[1:], "fastest", variants[0]).name == "int8-static"
    _, md_path, png_path = write_comparison(variants, tmp_path)
    row = next(line for line in md_path.read_text().splitlines() if line.startswith("| pruned-50"))
    assert "not made: torch-pruning cannot prune Net: boom" in row and "**no**" in row
    assert png_path.stat().st_size > 5000
