"""int8 quantization with onnxruntime: static QDQ (calibrated) and dynamic."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from components.optimization.quantize import quantize_dynamic, quantize_static
from tests.helpers.tiny import tiny_data, trained_cnn_onnx


@pytest.fixture(scope="module")
def fp32():
    return trained_cnn_onnx()


def _predict(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images})[0]


def test_static_int8_runs_is_smaller_and_agrees_with_fp32(fp32, tmp_path):
    calibration = tiny_data(48, seed=1)[0].numpy()
    out = quantize_static(fp32, calibration, tmp_path / "int8.onnx", per_channel=True)
    assert out.is_file() and out.stat().st_size < fp32.stat().st_size / 2.5
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    test_x, test_y = tiny_data(60, seed=2)
    reference = _predict(fp32, test_x.numpy())
    quantized = _predict(out, test_x.numpy())
    assert quantized.shape == reference.shape
    assert (quantized.argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert (reference.argmax(1) == test_y.numpy()).mean() >= 0.9  # the tiny model really learnt


def test_static_int8_per_tensor_also_works(fp32, tmp_path):
    out = quantize_static(fp32, tiny_data(8, seed=1)[0].numpy(), tmp_path / "pt.onnx", per_channel=False)
    assert _predict(out, tiny_data(5)[0].numpy()).shape == (5, 3)


@pytest.mark.parametrize("empty", [np.zeros((0, 1, 16, 16), np.float32), []])
def test_empty_calibration_set_is_refused(fp32, tmp_path, empty):
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize_static(fp32, empty, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_dynamic_int8_runs_and_is_smaller(fp32, tmp_path):
    out = quantize_dynamic(fp32, tmp_path / "dyn.onnx")
    assert out.stat().st_size < fp32.stat().st_size / 2.5
    test_x, _ = tiny_data(30, seed=3)
    agreement = (_predict(out, test_x.numpy()).argmax(1) == _predict(fp32, test_x.numpy()).argmax(1)).mean()
    assert agreement >= 0.9
