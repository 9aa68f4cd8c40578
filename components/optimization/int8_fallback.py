"""int8 that diagnoses itself: when a static int8 model misses its accuracy target, find the
activations that quantization damages most and keep the layers around them in fp32 (onnxruntime's
`nodes_to_exclude`), one more at a time, until the model passes or the budget runs out.

Sensitivity is measured on the calibration images with the QDQ model itself: every activation's
value before its QuantizeLinear and after its DequantizeLinear (paired as onnxruntime's
qdq_loss_debug pairs them) gives a signal-to-quantization-noise ratio per channel; a tensor's score
is the mean over its live channels. A per-channel mean, unlike one ratio over the whole tensor, sees
an outlier channel whose range crushes every other channel to zero (the whole-tensor ratio is then
dominated by the outlier and looks fine).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.qdq_loss_debug import create_activation_matching
from pydantic import BaseModel, Field

from components.optimization.quantize import preprocessed, quantize_static

# At most this many calibration pixels (images × height × width) feed the sensitivity pass, whose
# activations of every layer are held in memory at once.
SENSITIVITY_PIXELS = 16 * 64 * 64
# Ops that pass their input's range on (onnxruntime gives their output the input's scale): the layer
# kept in fp32 around a damaged tensor extends through them to the computing op on each side.
PASS_THROUGH = {"Relu", "Clip", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
SILENT_CHANNEL = 1e-6  # a channel whose signal is below this share of the tensor's largest is not scored
MAX_DB = 80.0


class LayerSensitivity(BaseModel):
    """One quantized activation: its score and the nodes kept in fp32 to keep it in float."""

    tensor: str
    sqnr_db: float = Field(description="Mean per-channel signal-to-quantization-noise ratio (dB); lower is worse.")
    nodes: list[str] = Field(description="The node producing the tensor and the nodes consuming it.")


class FallbackTry(BaseModel):
    """One quantization of the fallback search and its score."""

    excluded_nodes: list[str]
    score: float


class FallbackReport(BaseModel):
    """What the fallback search did: the full-int8 score, each try, and the nodes finally kept in fp32."""

    target: float
    full_int8_score: float
    passed: bool
    excluded_nodes: list[str] = Field(default_factory=list)
    full_int8_path: str | None = Field(None, description="The fully quantized model, kept when a fallback passed.")
    tries: list[FallbackTry] = Field(default_factory=list)
    ranking: list[LayerSensitivity] = Field(default_factory=list)


def _named(model_path: Path) -> Path:
    """Give every unnamed node of the graph a name (nodes_to_exclude refers to nodes by name); in place."""
    model = onnx.load(str(model_path))
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name, changed = f"{node.op_type}_{i}", True
    if changed:
        onnx.save(model, str(model_path))
    return model_path


def _float_activations(qdq_path: Path, images: np.ndarray, work: Path) -> dict[str, list[np.ndarray]]:
    """Every float tensor of the QDQ model (graph input included) on `images`, unflattened, graph optimisations
    off so that the Quantize/Dequantize pairs stay visible."""
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(qdq_path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    existing = {o.name for o in model.graph.output}
    names = [
        name
        for node in model.graph.node
        for name in node.output
        if name and name not in existing and types.get(name) == onnx.TensorProto.FLOAT
    ]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    augmented = work / "augmented.onnx"
    onnx.save(model, str(augmented))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    values = dict(zip(outputs, session.run(None, {input_name: images}), strict=True))
    return {input_name: [images], **{name: [values[name]] for name in names}}


def _channel_sqnr(before: np.ndarray, after: np.ndarray) -> float:
    """Mean over live channels (axis 1) of 20·log10(|signal| / |signal − quantized|), each capped at MAX_DB."""
    if before.ndim < 2:
        before, after = before.reshape(1, -1), after.reshape(1, -1)
    axes = tuple(i for i in range(before.ndim) if i != 1)
    signal = np.sqrt((before.astype(np.float64) ** 2).sum(axis=axes))
    noise = np.sqrt(((before.astype(np.float64) - after) ** 2).sum(axis=axes))
    live = signal > SILENT_CHANNEL * max(float(signal.max()), 1e-30)
    if not live.any():
        return MAX_DB
    pairs = zip(signal[live], noise[live], strict=True)
    ratios = [MAX_DB if n <= 0 else min(MAX_DB, 20 * math.log10(s / n)) for s, n in pairs]
    return float(np.mean(ratios))


def _layer_around(graph: onnx.GraphProto, tensor: str) -> list[str]:
    """The nodes to keep in fp32 so that `tensor` stays float: its producer and consumers, extended through
    PASS_THROUGH ops up to the computing op on each side (their outputs share the damaged range)."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes: list[str] = []
    node = producers.get(tensor)
    while node is not None and node.name not in nodes:
        nodes.insert(0, node.name)
        node = producers.get(node.input[0]) if node.op_type in PASS_THROUGH and node.input else None
    frontier = list(consumers.get(tensor, []))
    while frontier:
        node = frontier.pop(0)
        if node.name in nodes:
            continue
        nodes.append(node.name)
        if node.op_type in PASS_THROUGH:
            frontier += [c for out in node.output for c in consumers.get(out, [])]
    return nodes


def layer_sensitivity(float_path: Path, qdq_path: Path, calibration: np.ndarray) -> list[LayerSensitivity]:
    """Rank the quantized activations of `qdq_path` (made from `float_path`) from the most damaged.

    Takes the fp32 graph the QDQ model was quantized from (node names are looked up there), the QDQ
    model and calibration images (N, C, S, S); at most SENSITIVITY_PIXELS of them are used. Returns one
    LayerSensitivity per Quantize/Dequantize pair whose tensor exists in the fp32 graph, worst first.
    """
    images = np.ascontiguousarray(calibration, dtype=np.float32)
    keep = max(1, SENSITIVITY_PIXELS // max(1, images.shape[-1] * images.shape[-2]))
    images = images[:keep]
    graph = onnx.load(str(float_path), load_external_data=False).graph
    with tempfile.TemporaryDirectory(prefix="visionflow-sensitivity-") as work:
        pairs = create_activation_matching(_float_activations(Path(qdq_path), images, Path(work)))
    ranking = []
    for tensor, pair in pairs.items():
        nodes = _layer_around(graph, tensor)
        if nodes:
            score = _channel_sqnr(pair["pre_qdq"][0], pair["post_qdq"][0])
            ranking.append(LayerSensitivity(tensor=tensor, sqnr_db=score, nodes=nodes))
    return sorted(ranking, key=lambda s: s.sqnr_db)


def quantize_with_fallback(
    onnx_path: Path,
    calibration: np.ndarray,
    out_path: Path,
    score: Callable[[Path], float],
    target: float,
    max_layers: int,
    **quantize_options,
) -> FallbackReport:
    """Static int8 quantization that keeps the most damaged layers in fp32 until `score` reaches `target`.

    Takes the fp32 .onnx path, the calibration images (N, C, S, S), the output path, a function scoring
    a quantized .onnx file (higher is better: the gate's accuracy on held-out images), the score to
    reach, the most activations kept in float (0: quantize everything, no search) and quantize_static's
    options (per_channel, activation_type, reduce_range). Quantizes everything first; when that misses
    the target, ranks the activations (`layer_sensitivity`) and re-quantizes with the nodes around the
    worst 1, 2, ... of them excluded. The first passing model is written to `out_path`; when none passes,
    `out_path` holds the fully quantized model (else it lies beside it as NAME.full-int8.onnx).
    Returns the FallbackReport.
    """
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="visionflow-fallback-") as work:
        source = _named(shutil.copy(preprocessed(Path(onnx_path), Path(work)), Path(work) / "float.onnx"))
        quantize_static(source, calibration, out_path, preprocess=False, **quantize_options)
        first = score(out_path)
        report = FallbackReport(target=target, full_int8_score=first, passed=first >= target)
        if report.passed or max_layers <= 0:
            return report
        report.ranking = layer_sensitivity(source, out_path, calibration)[:max_layers]
        excluded: list[str] = []
        for i, layer in enumerate(report.ranking):
            excluded += [n for n in layer.nodes if n not in excluded]
            candidate = Path(work) / f"try{i}.onnx"
            quantize_static(
                source, calibration, candidate, preprocess=False, nodes_to_exclude=excluded, **quantize_options
            )
            report.tries.append(FallbackTry(excluded_nodes=list(excluded), score=score(candidate)))
            if report.tries[-1].score >= target:
                full = out_path.with_name(f"{out_path.stem}.full-int8.onnx")
                shutil.move(out_path, full)
                shutil.copy(candidate, out_path)
                report.full_int8_path = str(full)
                report.passed, report.excluded_nodes = True, list(excluded)
                break
    return report
