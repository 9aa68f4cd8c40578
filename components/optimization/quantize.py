"""int8 post-training quantization of an exported ONNX model with onnxruntime.quantization.

Static QDQ quantization (calibrated activation ranges, per-channel weight scales) is the fast
path on CPUs with int8 instructions; dynamic quantization only suits Linear-heavy models (it made
CNNs slower on the development machines). Report the CPU model beside any int8 latency.

Activations are uint8 (weights int8) by default: on x86 onnxruntime fuses a QDQ Conv into its
integer QLinearConv kernel only for uint8 activations (its "QDQIsInt8Allowed" is off on x86), so
int8 activations leave every Conv in fp32 between extra Quantize/Dequantize nodes — slower than
the fp32 model (measured on resnet18: 45 ms fp32, 51 ms int8-activation QDQ, 13 ms uint8 at batch
32). x86 CPUs without VNNI can saturate uint8×int8 products, so there weights use 7 bits
(reduce_range) unless told otherwise.
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
ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# CPU flags of the instructions that multiply uint8 by int8 without 16-bit saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def auto_reduce_range(flags: set[str] | None = None) -> bool:
    """Whether weights should use 7 bits: on x86 CPUs without VNNI / AMX int8 (their uint8×int8
    instruction can saturate), never elsewhere."""
    import platform

    flags = cpu_flags() if flags is None else flags
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    return x86 and not any(f in flags for f in VNNI_FLAGS)


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


def preprocessed(onnx_path: Path, work_dir: Path) -> Path:
    """quant_pre_process (symbolic shape inference + graph optimisation) when it succeeds, else the input."""
    out = work_dir / "preprocessed.onnx"
    try:
        quant_pre_process(str(onnx_path), str(out), skip_symbolic_shape=False)
        return out
    except Exception as err:  # pre-processing is an optional improvement; quantize the raw graph instead
        logging.getLogger(__name__).warning("quant_pre_process skipped for %s: %s", onnx_path, err)
        return onnx_path


def quantize_static(
    onnx_path: Path,
    calibration: np.ndarray,
    out_path: Path,
    per_channel: bool = True,
    activation_type: str = "uint8",
    reduce_range: bool | None = None,
    nodes_to_exclude: list[str] | None = None,
    preprocess: bool = True,
) -> Path:
    """Static int8 QDQ quantization of an fp32 ONNX model with onnxruntime.

    Takes the fp32 .onnx path, calibration images as an (N, C, S, S) float32 array already
    normalised like the model's eval input, the output path, whether weight scales are per output
    channel, the activation type ("uint8", the fast one on x86, or "int8"), whether weights use 7
    bits (None: `auto_reduce_range`), the names of nodes left in fp32 and whether the graph is
    first run through quant_pre_process (shape inference and optimisation; skipped when it fails).
    Weights are symmetric QInt8, activation ranges from MinMax calibration over the array.
    Returns `out_path`. Raises ValueError for an empty or badly shaped calibration set or an
    unknown activation type.
    """
    if activation_type not in ACTIVATION_TYPES:
        raise ValueError(f"activation type must be one of {', '.join(ACTIVATION_TYPES)}, got {activation_type!r}")
    images = np.asarray(calibration, dtype=np.float32)
    if images.size == 0 or len(images) == 0:
        raise ValueError("calibration set is empty: static int8 quantization needs at least one calibration image")
    if images.ndim != 4:
        raise ValueError(f"calibration images must be an (N, C, S, S) array, got shape {images.shape}")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    check_onnx_file(onnx_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="visionflow-quant-") as work:
        source = preprocessed(onnx_path, Path(work)) if preprocess else onnx_path
        ort_quantize_static(
            str(source),
            str(out_path),
            calibration_data_reader=_ArrayReader(images, _input_name(source), CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=auto_reduce_range() if reduce_range is None else reduce_range,
            activation_type=ACTIVATION_TYPES[activation_type],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude or []),
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
        source = preprocessed(onnx_path, Path(work))
        ort_quantize_dynamic(str(source), str(out_path), weight_type=QuantType.QUInt8 if has_conv else QuantType.QInt8)
    return out_path
