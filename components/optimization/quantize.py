"""int8 post-training quantization of an exported ONNX model with onnxruntime.quantization.

Static QDQ quantization (calibrated activation ranges, per-channel weight scales) is the fast
path on CPUs with int8 instructions; dynamic quantization only suits Linear-heavy models (it made
CNNs slower on the development machines). Report the CPU model beside any int8 latency.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
)
from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
from onnxruntime.quantization import quantize_static as ort_quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from components.packaging.export import INPUT_NAME, check_onnx_file

CALIBRATION_BATCH = 16


class _ArrayReader(CalibrationDataReader):
    """Feeds a (N, C, S, S) array to the calibrator in batches (onnxruntime requires this base class)."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int):
        self._batches = iter([{input_name: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._batches, None)


def _input_name(onnx_path: Path) -> str:
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return INPUT_NAME if INPUT_NAME in names else names[0]


def _preprocessed(onnx_path: Path, work_dir: Path) -> Path:
    """quant_pre_process (symbolic shape inference + graph optimisation) when it succeeds, else the input."""
    out = work_dir / "preprocessed.onnx"
    try:
        quant_pre_process(str(onnx_path), str(out), skip_symbolic_shape=False)
        return out
    except Exception as err:  # pre-processing is an optional improvement; quantize the raw graph instead
        logging.getLogger(__name__).warning("quant_pre_process skipped for %s: %s", onnx_path, err)
        return onnx_path


def quantize_static(onnx_path: Path, calibration: np.ndarray, out_path: Path, per_channel: bool = True) -> Path:
    """Static int8 QDQ quantization of an fp32 ONNX model with onnxruntime.

    Takes the fp32 .onnx path, calibration images as an (N, C, S, S) float32 array already
    normalised like the model's eval input, the output path and whether weight scales are
    per output channel. Activations and weights are QInt8 (symmetric weights), ranges from MinMax
    calibration over the array. The graph is first run through quant_pre_process (shape inference
    and optimisation) when that succeeds. Returns `out_path`.
    Raises ValueError for an empty calibration set or a badly shaped one.
    """
    images = np.asarray(calibration, dtype=np.float32)
    if images.size == 0 or len(images) == 0:
        raise ValueError("calibration set is empty: static int8 quantization needs at least one calibration image")
    if images.ndim != 4:
        raise ValueError(f"calibration images must be an (N, C, S, S) array, got shape {images.shape}")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    check_onnx_file(onnx_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="visionflow-quant-") as work:
        source = _preprocessed(onnx_path, Path(work))
        ort_quantize_static(
            str(source),
            str(out_path),
            calibration_data_reader=_ArrayReader(images, _input_name(source), CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    return out_path


def quantize_dynamic(onnx_path: Path, out_path: Path) -> Path:
    """Dynamic int8 quantization (weights int8 ahead of time, activations quantized at run time).

    Takes the fp32 .onnx path and the output path. Weights are QInt8, except in graphs with
    convolutions, whose ConvInteger kernels onnxruntime's CPU provider only has for QUInt8
    weights. The graph goes through quant_pre_process first when that succeeds. Returns `out_path`.
    Suits Linear/RNN-heavy models; convolutional ones often get slower.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    check_onnx_file(onnx_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(onnx_path), load_external_data=False)
    has_conv = any(node.op_type == "Conv" for node in model.graph.node)
    with tempfile.TemporaryDirectory(prefix="visionflow-quant-") as work:
        source = _preprocessed(onnx_path, Path(work))
        ort_quantize_dynamic(str(source), str(out_path), weight_type=QuantType.QUInt8 if has_conv else QuantType.QInt8)
    return out_path
