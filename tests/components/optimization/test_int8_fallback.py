"""int8 that diagnoses itself: a model whose per-tensor int8 activations are crushed by one outlier channel
fails its target fully quantized, the sensitivity pass finds the damaged layer, and keeping it in fp32 rescues it."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from components.optimization.int8_fallback import quantize_with_fallback
from components.optimization.quantize import auto_reduce_range, quantize_static
from components.packaging.export import export_onnx
from tests.helpers.tiny import SPEC, tiny_data, trained_cnn, trained_cnn_onnx

OUTLIER = 1000.0


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """The tiny trained CNN with its first conv's channel 0 scaled up OUTLIER times and the next conv's weights
    from that channel scaled down as much: the same function in fp32, an activation range 1000× too wide for
    the other 31 channels in int8. Returns (onnx path, images, the fp32 model's classes for them)."""
    model = trained_cnn()
    with torch.no_grad():
        model[0].weight[0] *= OUTLIER
        model[0].bias[0] *= OUTLIER
        model[3].weight[:, 0] /= OUTLIER
    path = export_onnx(model, SPEC, tmp_path_factory.mktemp("outlier") / "model.onnx")
    noise = np.random.default_rng(2).standard_normal((64, 1, 16, 16)).astype(np.float32) * 0.6
    images = noise + 0.3 * tiny_data(64, seed=2)[0].numpy()  # near the decision boundaries: every channel counts
    return path, images, _predict(path, images).argmax(1)


def _predict(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images})[0]


def test_the_fallback_keeps_the_crushed_layer_in_fp32_and_passes(outlier_model, tmp_path):
    path, images, targets = outlier_model

    def agreement(candidate):
        return float((_predict(candidate, images).argmax(1) == targets).mean())

    out = tmp_path / "int8.onnx"
    report = quantize_with_fallback(path, images[:32], out, agreement, target=0.98, max_layers=3)
    assert report.full_int8_score < 0.8  # fully quantized, the outlier channel ruins it
    nodes = onnx.load(str(path)).graph.node
    first_relu = next(n for n in nodes if n.op_type == "Relu")
    first_convs = [n.name for n in nodes if n.op_type == "Conv"][:2]
    assert report.ranking[0].tensor == first_relu.output[0]  # the first conv's activation is the most damaged
    assert report.passed and agreement(out) >= 0.98
    assert set(first_convs) <= set(report.excluded_nodes)  # the layers on both sides of it stay fp32
    assert len(report.tries) == 1 and report.tries[0].score >= 0.98
    quantized = onnx.load(str(out)).graph.node
    made_by = {name: n.op_type for n in quantized for name in n.output}
    weights_of = {n.name: made_by.get(n.input[1], "float initializer") for n in quantized if n.input[1:]}
    assert [weights_of[name] for name in first_convs] == ["float initializer"] * 2  # fp32 weights, no int8
    assert "DequantizeLinear" in weights_of.values()  # the rest of the model stays int8
    assert agreement(report.full_int8_path) == report.full_int8_score  # the fully quantized model kept beside it


def test_no_search_when_the_budget_is_zero_or_int8_already_passes(outlier_model, tmp_path):
    path, images, targets = outlier_model

    def agreement(candidate):
        return float((_predict(candidate, images).argmax(1) == targets).mean())

    off = quantize_with_fallback(path, images[:32], tmp_path / "off.onnx", agreement, target=0.98, max_layers=0)
    assert not off.passed and off.tries == [] and off.excluded_nodes == []
    fine = quantize_with_fallback(
        trained_cnn_onnx(), images[:32], tmp_path / "fine.onnx", lambda p: 1.0, target=0.98, max_layers=3
    )
    assert fine.passed and fine.tries == [] and fine.ranking == []


def test_static_int8_uses_uint8_activations_by_default(tmp_path):
    out = quantize_static(trained_cnn_onnx(), tiny_data(8, seed=1)[0].numpy(), tmp_path / "q.onnx")
    graph = onnx.load(str(out)).graph
    zero_points = {i.name: i.data_type for i in graph.initializer}
    activation_types = {zero_points[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert activation_types == {onnx.TensorProto.UINT8}
    with pytest.raises(ValueError, match="activation type"):
        quantize_static(trained_cnn_onnx(), tiny_data(8)[0].numpy(), tmp_path / "x.onnx", activation_type="int4")


@pytest.mark.parametrize(
    ("flags", "expected"), [({"avx2"}, True), ({"avx2", "avx512_vnni"}, False), ({"avx_vnni"}, False)]
)
def test_seven_bit_weights_only_on_x86_without_vnni(flags, expected, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert auto_reduce_range(flags) is expected
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert auto_reduce_range(flags) is False
