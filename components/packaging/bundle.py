"""Writing a bundle directory: the files, SHA256SUMS, then one verification of the result (the format
itself, checksums, verification and unpacking live in components.bundle_format)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from components.bundle_format import (
    CARD_FILE,
    CHECKSUMS_FILE,
    LABELS_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PREPROCESS_FILE,
    REQUIRED_FILES,
    BundleError,
    check_labels,
    check_preprocess,
    is_pickle,
    plain_name,
    uses_external_data,
    verify_bundle,
    write_checksums,
)


def _json_safe(value: Any) -> Any:
    """Numpy scalars to Python numbers, non-finite floats to None, tuples to lists (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, value: Any, sort_keys: bool) -> None:
    path.write_text(json.dumps(_json_safe(value), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def _copy_onnx(src: Path, dest: Path) -> None:
    """Copy an ONNX model; one with external data is rewritten self-contained (or, past protobuf's
    2 GB limit, with its weights in `<name>.data` beside it)."""
    header = onnx.load(str(src), load_external_data=False)
    if not uses_external_data(header):
        shutil.copyfile(src, dest)
        return
    model = onnx.load(str(src))  # onnx refuses external paths that leave the model's own folder
    try:
        onnx.save_model(model, str(dest))
    except ValueError:  # the protobuf would exceed 2 GB
        onnx.save_model(
            model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=dest.name + ".data"
        )


def write_bundle(
    out_dir: Path,
    onnx_path: Path,
    labels: list[str],
    preprocess: dict,
    metrics: dict,
    model_card: str,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write a verified bundle directory.

    Takes the output directory (replaced as a whole when it exists), the ONNX model (a model with
    external data is made self-contained), the class labels in output-column order, the eval
    preprocessing (components.data.augment.eval_preprocess_spec), the metrics dict (non-finite floats
    become null), the MODEL_CARD.md text and extra files as {name in bundle: source path} (plain names
    only; pickles .pt/.pth/.ckpt/.pkl are refused). Writes model.onnx, labels.json, preprocess.json,
    MODEL_CARD.md, metrics.json, the extras and SHA256SUMS, then verifies the result.
    Returns the bundle directory. Raises BundleError.
    """
    out_dir = Path(out_dir)
    onnx_path = Path(onnx_path)
    extra_files = dict(extra_files or {})
    for name, src in extra_files.items():
        if is_pickle(name) or is_pickle(str(src)):
            raise BundleError(f"refusing pickled file in a bundle: {name} (export weights as ONNX or safetensors)")
        if not plain_name(name):
            raise BundleError(f"extra file name must be a plain file name: {name!r}")
        if name in REQUIRED_FILES or name == CHECKSUMS_FILE:
            raise BundleError(f"extra file would overwrite a bundle file: {name}")
        if not Path(src).is_file():
            raise BundleError(f"extra file not found: {name} ({src})")
    if not onnx_path.is_file():
        raise BundleError(f"ONNX model not found: {onnx_path}")
    check_labels(labels)
    check_preprocess(preprocess)
    if not isinstance(metrics, dict):
        raise BundleError(f"{METRICS_FILE}: metrics must be a dict")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _copy_onnx(onnx_path, staging / MODEL_FILE)
        _write_json(staging / LABELS_FILE, labels, sort_keys=False)
        _write_json(staging / PREPROCESS_FILE, preprocess, sort_keys=True)
        _write_json(staging / METRICS_FILE, metrics, sort_keys=True)
        (staging / CARD_FILE).write_text(model_card if model_card.endswith("\n") else model_card + "\n")
        for name, src in sorted(extra_files.items()):
            if name.lower().endswith(".onnx"):
                _copy_onnx(Path(src), staging / name)
            else:
                shutil.copyfile(src, staging / name)
        os.chmod(staging, 0o755)
        write_checksums(staging)
        verify_bundle(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() and not out_dir.is_symlink() else out_dir.unlink()
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
