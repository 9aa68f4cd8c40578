"""Export a trained network: ONNX (one self-contained file, dynamic batch), TorchScript and
ExecuTorch (.pte, XNNPACK-delegated, for on-device runtimes).

The ONNX file takes "image" (N, C, S, S) float32 — already normalised the way the model's eval
transform does it — and returns "logits" (N, sum of task sizes). torch.onnx's dynamo exporter is
tried first (external_data=False, so no .onnx.data file beside it); a model it cannot export, or
whose export does not run at two batch sizes in onnxruntime, is exported by the legacy
TorchScript-based exporter instead. The .pte program takes one image of the same input and returns
its logits; it needs the optional `executorch` package (pip install 'visionflow[executorch]'), imported only when
a .pte is asked for.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from components.bundle_format import external_data, external_data_escapes, uses_external_data
from components.errors import VisionflowError
from components.models import ModelSpec

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# The ExecuTorch release this code is tested with (torch 2.14.1); it declares no torch pin of its own.
EXECUTORCH_TESTED = "1.5.1"


def _example(model: nn.Module, spec: ModelSpec, batch: int) -> torch.Tensor:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, generator=generator)
    return x.to(device)


def check_onnx_file(onnx_path: Path) -> Path:
    """Refuse an ONNX file whose external-data references point outside its own directory.

    Takes the path of a .onnx file; reads only the graph (not external tensors). Returns the path;
    raises ValueError naming the tensor and its location when a reference is absolute, climbs out
    with "..", or resolves (through links) outside the model's directory (the bundle format's rule,
    components.bundle_format.external_data_escapes).
    """
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor_name, location in external_data(model):
        if external_data_escapes(location, onnx_path.parent):
            raise ValueError(
                f"{onnx_path}: external data of tensor {tensor_name!r} points outside the model directory "
                f"({location!r}); refusing to load it"
            )
    return onnx_path


def _runs_at_two_batch_sizes(onnx_path: Path, spec: ModelSpec) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.zeros((batch, spec.in_channels, spec.image_size, spec.image_size), dtype=np.float32)
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        if logits.shape[0] != batch:
            raise RuntimeError(f"ONNX model returned {logits.shape[0]} rows for a batch of {batch}")


def _export_dynamo(model: nn.Module, example: torch.Tensor, out_path: Path, opset: int) -> None:
    # Quiet: the dynamo exporter prints its progress to stdout.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )


def _export_torchscript(model: nn.Module, example: torch.Tensor, out_path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


# package.onnx_exporter -> the exporters export_onnx tries, in order
EXPORTER_ORDER = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}


def export_onnx(model: nn.Module, spec: ModelSpec, out_path: Path, *, opset: int = 18, exporter: str = "auto") -> Path:
    """Export `model` (run in eval mode; its train/eval mode is restored afterwards) to one
    self-contained ONNX file at `out_path` (parent folders are created).

    Takes the network, its ModelSpec (channels and image size of the input), the output path and
    the ONNX opset. The graph has input "image" (batch, C, S, S) float32 with a dynamic batch axis
    and output "logits". `exporter` (EXPORTER_ORDER) picks PyTorch's exporter: "auto" tries the
    TorchScript-based one first (it traces the model: 0.1 s for the digits CNN, 0.7 s for resnet18 on a
    2-core Xeon, where torch.export's dynamo exporter took 2.1 s and 3.7 s, for graphs onnxruntime runs
    alike) and the dynamo exporter when it fails or its file does not run in onnxruntime at batch 1 and 3.
    Returns `out_path`.
    Raises ValueError when the written file references external data outside its directory or is
    not self-contained, RuntimeError when neither exporter succeeds.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    example = _example(model, spec, batch=2)
    errors = []
    try:
        exporters = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}
        for name in EXPORTER_ORDER[exporter]:
            try:
                exporters[name](model, example, out_path, opset)
                _runs_at_two_batch_sizes(out_path, spec)
                break
            except Exception as err:  # an exporter's failure is any exception; the next one is tried
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                errors.append(f"{name}: {first_line}")
        else:
            raise RuntimeError(f"could not export {spec.name} to ONNX ({'; '.join(errors)})")
    finally:
        model.train(was_training)
    check_onnx_file(out_path)
    graph = onnx.load(str(out_path), load_external_data=False)
    if uses_external_data(graph):
        raise ValueError(f"{out_path} is not self-contained (its weights are in external data files)")
    return out_path


def onnx_parity(model: nn.Module, onnx_path: Path, images: torch.Tensor) -> dict[str, float]:
    """Compare PyTorch (eval mode, CPU, no grad) and onnxruntime (CPU) on the same images.

    Takes the network, the exported .onnx path and an (N, C, S, S) float32 tensor of normalised
    images. Returns {"max_abs_logit_diff": largest |difference| over all logits,
    "top1_agreement": share of images (0..1) with the same arg-max, "num_images": N}.
    The model's train/eval mode and device are restored afterwards.
    """
    import onnxruntime as ort

    check_onnx_file(onnx_path)
    x, reference = _reference_logits(model, images)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    return _agreement(logits, reference)


def _reference_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(the images as a CPU float tensor, the model's eval-mode logits for them); the model's mode is restored."""
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    x = images.detach().float().cpu()
    try:
        with torch.no_grad():
            reference = model.eval()(x.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    return x, reference


def _agreement(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "top1_agreement": float((logits.argmax(axis=1) == reference.argmax(axis=1)).mean()),
        "num_images": int(reference.shape[0]),
    }


def export_torchscript(model: nn.Module, spec: ModelSpec, out_path: Path) -> Path:
    """Trace `model` in eval mode (torch.jit.trace on an example batch from `spec`) and save it to
    `out_path` (parent folders created); the model's mode is restored. Returns `out_path`.

    The traced module takes (N, C, S, S) float32 normalised images and returns logits.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model.eval(), _example(model, spec, batch=2))
            torch.jit.save(traced, str(out_path))
    finally:
        model.train(was_training)
    return out_path


def _executorch_unavailable(reason: str) -> VisionflowError:
    return VisionflowError(
        f"ExecuTorch export not available: {reason}; install executorch=={EXECUTORCH_TESTED} matching torch "
        f"{torch.__version__} (pip install 'visionflow[executorch]') and rerun, or set package.executorch=false"
    )


def export_executorch(model: nn.Module, spec: ModelSpec, out_path: Path) -> Path:
    """Export `model` (eval mode; its mode is restored) to an ExecuTorch program at `out_path`.

    Takes the network, its ModelSpec and the .pte path (parent folders created). The program takes
    one image, (1, C, S, S) float32 normalised like the ONNX input, and returns (1, outputs) logits:
    batch 1 is what on-device callers run, and dynamic batch sizes proved unreliable here (XNNPACK
    programs traced at one batch refused others). The graph is captured with torch.export, lowered to
    the XNNPACK CPU delegate where it can be, serialised and run once. Returns `out_path`. Raises
    VisionflowError "ExecuTorch export not available: ..." when the executorch package cannot be
    imported, RuntimeError naming the first line of the failure when the model cannot be exported or
    its program does not run.
    """
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as err:
        raise _executorch_unavailable(f"cannot import executorch ({err})") from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model.eval(), (_example(model, spec, batch=1).cpu(),))
            program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as err:  # torch.export / lowering raise many types; the caller needs one clear line
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"could not export {spec.name} to ExecuTorch: {first_line}") from err
    finally:
        model.train(was_training)
    out_path.write_bytes(program.buffer)
    try:
        _run_pte(out_path, torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size))
    except Exception as err:  # the runtime raises RuntimeError with a numeric code; its log names the kernel
        raise RuntimeError(f"the ExecuTorch program of {spec.name} does not run ({err})") from None
    return out_path


def _run_pte(pte_path: Path, images: torch.Tensor) -> np.ndarray:
    """Logits of a batch-1 .pte program for (N, C, S, S) images, one image per call."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(pte_path)).load_method("forward")
    return np.concatenate([method.execute([image[None].contiguous()])[0].numpy() for image in images])


def executorch_parity(model: nn.Module, pte_path: Path, images: torch.Tensor) -> dict[str, float]:
    """Compare PyTorch (eval, CPU, no grad) and the ExecuTorch runtime on the same images.

    Takes the network, the .pte path and an (N, C, S, S) float32 tensor of normalised images (run one
    at a time through the program). Returns {"max_abs_logit_diff", "top1_agreement", "num_images"}
    like onnx_parity. Raises VisionflowError when executorch is not installed.
    """
    try:
        import executorch.runtime  # noqa: F401
    except ImportError as err:
        raise _executorch_unavailable(f"cannot import executorch.runtime ({err})") from None
    x, reference = _reference_logits(model, images)
    logits = _run_pte(pte_path, x)
    return _agreement(logits, reference)
