"""The model bundle: one directory (and its .tar.gz) a user can trust and serve.

A bundle holds model.onnx, labels.json, preprocess.json, MODEL_CARD.md, metrics.json, optional extra
files (an int8 variant, a reference profile, the confusion-matrix image) and SHA256SUMS, which lists
the SHA-256 of every other file in `sha256sum` format. Loading a bundle verifies every checksum and
refuses missing, unlisted or tampered files, pickles, links and ONNX external data that points outside
the bundle. Unpacking an archive refuses absolute paths, `..`, links and devices before anything is
extracted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import onnx

from components import safety
from components.errors import VisionflowError

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "MODEL_CARD.md"
CHECKSUMS_FILE = "SHA256SUMS"
REQUIRED_FILES = (MODEL_FILE, LABELS_FILE, PREPROCESS_FILE, CARD_FILE, METRICS_FILE)

# Files that unpickle (and can so run code) when loaded: never part of a bundle.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")

PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "channels")

# Largest total size of the files an archive may unpack to (a guard against gzip bombs).
DEFAULT_MAX_UNPACKED_BYTES = 8 * 1024**3

_SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_CHUNK = 1024 * 1024


class BundleError(VisionflowError):
    """A bundle that cannot be written, packed, unpacked or trusted; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def _plain_name(name: str) -> bool:
    """A file name without folders, `..`, hidden-file dots or control characters."""
    return (
        bool(name)
        and name not in (".", "..")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and all(ch.isprintable() for ch in name)
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


def _check_labels(labels: Any) -> list[str]:
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise BundleError(f"{LABELS_FILE}: labels must be a non-empty list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise BundleError(f"{LABELS_FILE}: labels must be unique")
    return labels


def _check_preprocess(preprocess: Any) -> dict[str, Any]:
    if not isinstance(preprocess, dict):
        raise BundleError(f"{PREPROCESS_FILE}: must be a JSON object")
    missing = [key for key in PREPROCESS_KEYS if key not in preprocess]
    if missing:
        raise BundleError(f"{PREPROCESS_FILE}: missing keys {', '.join(missing)}")
    return preprocess


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(True for _ in _external_locations(model))


def _copy_onnx(src: Path, dest: Path) -> None:
    """Copy an ONNX model; one with external data is rewritten self-contained (or, past protobuf's
    2 GB limit, with its weights in `<name>.data` beside it)."""
    header = onnx.load(str(src), load_external_data=False)
    if not _uses_external_data(header):
        shutil.copyfile(src, dest)
        return
    model = onnx.load(str(src))  # onnx refuses external paths that leave the model's own folder
    try:
        onnx.save_model(model, str(dest))
    except ValueError:  # the protobuf would exceed 2 GB
        onnx.save_model(
            model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=dest.name + ".data"
        )


def write_checksums(bundle_dir: Path) -> Path:
    """(Re)write SHA256SUMS for every other regular file in a bundle directory.

    Takes the bundle directory; returns the SHA256SUMS path. Lines are `<hex>  <name>`, sorted by name.
    """
    bundle_dir = Path(bundle_dir)
    names = sorted(p.name for p in bundle_dir.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE)
    lines = [f"{_sha256(bundle_dir / name)}  {name}\n" for name in names]
    path = bundle_dir / CHECKSUMS_FILE
    path.write_text("".join(lines))
    return path


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
        if _is_pickle(name) or _is_pickle(str(src)):
            raise BundleError(f"refusing pickled file in a bundle: {name} (export weights as ONNX or safetensors)")
        if not _plain_name(name):
            raise BundleError(f"extra file name must be a plain file name: {name!r}")
        if name in REQUIRED_FILES or name == CHECKSUMS_FILE:
            raise BundleError(f"extra file would overwrite a bundle file: {name}")
        if not Path(src).is_file():
            raise BundleError(f"extra file not found: {name} ({src})")
    if not onnx_path.is_file():
        raise BundleError(f"ONNX model not found: {onnx_path}")
    _check_labels(labels)
    _check_preprocess(preprocess)
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


def _read_checksums(bundle_dir: Path) -> dict[str, str]:
    path = bundle_dir / CHECKSUMS_FILE
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"missing file: {CHECKSUMS_FILE}")
    listed: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{CHECKSUMS_FILE} is not text") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _SUM_LINE.match(line)
        if not match:
            raise BundleError(f"malformed {CHECKSUMS_FILE} line {number}")
        digest, name = match.groups()
        if not _plain_name(name) or name == CHECKSUMS_FILE:
            raise BundleError(f"{CHECKSUMS_FILE} line {number} names an invalid file: {name!r}")
        if name in listed:
            raise BundleError(f"{CHECKSUMS_FILE} lists {name} twice")
        listed[name] = digest
    return listed


def _iter_graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_graph_tensors(sub)


def _external_locations(model: onnx.ModelProto):
    """Every external-data `location` in a model (initializers, sparse and attribute tensors, subgraphs, functions)."""
    tensors = list(_iter_graph_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            entries = {entry.key: entry.value for entry in tensor.external_data}
            yield entries.get("location", "")


def _check_onnx_external_data(bundle_dir: Path, name: str, listed: dict[str, str]) -> None:
    try:
        model = onnx.load(str(bundle_dir / name), load_external_data=False)
    except Exception:  # protobuf raises DecodeError and others on a broken file
        raise BundleError(f"not a valid ONNX model: {name}") from None
    root = bundle_dir.resolve()
    for location in _external_locations(model):
        pure = PurePosixPath(location.replace("\\", "/"))
        target = (bundle_dir / location).resolve()
        if (
            not location
            or pure.is_absolute()
            or ".." in pure.parts
            or re.match(r"^[A-Za-z]:", location)
            or root not in target.parents
        ):
            raise BundleError(f"external data outside the bundle: {name} -> {location!r}")
        if target.name not in listed or target.parent != root:
            raise BundleError(f"external data not listed in {CHECKSUMS_FILE}: {name} -> {location!r}")


def _load_json(bundle_dir: Path, name: str) -> Any:
    try:
        return json.loads((bundle_dir / name).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"invalid JSON in {name}: {err}") from None


def verify_bundle(bundle_dir: Path) -> dict:
    """Check a bundle directory before anything in it is used.

    Takes the bundle directory. Checks that SHA256SUMS parses, that every required file is present and
    listed, that nothing unlisted (or a link, folder or pickle) is there, that every checksum matches,
    and that no ONNX model's external data points outside the bundle.
    Returns {"labels": list, "preprocess": dict, "metrics": dict, "files": {name: sha256}}.
    Raises BundleError naming the file ("checksum mismatch: model.onnx", "missing file: labels.json",
    "unlisted file: x", ...).
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"not a bundle directory: {bundle_dir}")
    listed = _read_checksums(bundle_dir)
    for name in REQUIRED_FILES:
        if not (bundle_dir / name).exists():
            raise BundleError(f"missing file: {name}")
        if name not in listed:
            raise BundleError(f"unlisted file: {name}")
    for name in sorted(listed):
        if not (bundle_dir / name).exists() and not (bundle_dir / name).is_symlink():
            raise BundleError(f"missing file: {name}")
    for entry in sorted(bundle_dir.iterdir(), key=lambda p: p.name):
        if entry.is_symlink():
            raise BundleError(f"link not allowed in a bundle: {entry.name}")
        if not entry.is_file():
            raise BundleError(f"unexpected entry in a bundle (not a regular file): {entry.name}")
        if entry.name != CHECKSUMS_FILE and entry.name not in listed:
            raise BundleError(f"unlisted file: {entry.name}")
        if _is_pickle(entry.name):
            raise BundleError(f"pickled file not allowed in a bundle: {entry.name}")
    for name, digest in sorted(listed.items()):
        if _sha256(bundle_dir / name) != digest:
            raise BundleError(f"checksum mismatch: {name}")
    for name in sorted(listed):
        if name.lower().endswith(".onnx"):
            _check_onnx_external_data(bundle_dir, name, listed)
    labels = _check_labels(_load_json(bundle_dir, LABELS_FILE))
    preprocess = _check_preprocess(_load_json(bundle_dir, PREPROCESS_FILE))
    metrics = _load_json(bundle_dir, METRICS_FILE)
    if not isinstance(metrics, dict):
        raise BundleError(f"{METRICS_FILE}: must be a JSON object")
    return {"labels": labels, "preprocess": preprocess, "metrics": metrics, "files": listed}


def pack_bundle(bundle_dir: Path) -> Path:
    """Verify a bundle directory and write it as `<bundle_dir>.tar.gz` beside it.

    Takes the bundle directory; the archive holds one top folder named like it with the files inside,
    in sorted order, with fixed times, owners and modes (the same bundle gives the same bytes).
    Returns the archive path. Raises BundleError when the bundle does not verify.
    """
    bundle_dir = Path(bundle_dir)
    verify_bundle(bundle_dir)
    top = bundle_dir.name
    archive = bundle_dir.with_name(top + ".tar.gz")
    partial = archive.with_name(archive.name + ".partial")

    def _entry(name: str, is_dir: bool, size: int = 0) -> tarfile.TarInfo:
        entry = tarfile.TarInfo(name)
        entry.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        entry.mode = 0o755 if is_dir else 0o644
        entry.size = size
        entry.mtime = 0
        entry.uid = entry.gid = 0
        entry.uname = entry.gname = ""
        return entry

    with open(partial, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_entry(top, True))
            for path in sorted(bundle_dir.iterdir(), key=lambda p: p.name):
                with open(path, "rb") as handle:
                    tar.addfile(_entry(f"{top}/{path.name}", False, path.stat().st_size), handle)
    partial.replace(archive)
    return archive


def _check_members(members: list[tarfile.TarInfo], max_bytes: int) -> str:
    """Refuse unsafe or unexpected members; returns the archive's one top folder."""
    tops: set[str] = set()
    total = 0
    for member in members:
        name = member.name
        pure = PurePosixPath(name)
        problem = safety.member_problem(name, safety.tar_member_kind(member))
        if problem is None and "\\" in name:  # bundles are written with "/" only
            problem = safety.TRAVERSAL
        if problem:
            raise BundleError(f"unsafe archive member ({problem}): {name!r}")
        parts = [p for p in pure.parts if p != "."]
        if not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and member.isdir()):
            raise BundleError(f"unexpected archive member (bundles are flat): {name!r}")
        if len(parts) == 1 and member.isfile():
            raise BundleError(f"unexpected archive member (outside the bundle folder): {name!r}")
        tops.add(parts[0])
        total += member.size
        if total > max_bytes:
            raise BundleError(f"archive unpacks to more than {max_bytes} bytes")
    if len(tops) != 1:
        raise BundleError(f"archive must hold exactly one bundle folder, found {len(tops)}")
    top = tops.pop()
    if not _plain_name(top):
        raise BundleError(f"unsafe bundle folder name in archive: {top!r}")
    return top


def _same_bundle(existing: Path, fresh: Path) -> bool:
    """True when `existing` is a valid bundle with exactly the checksums of the verified `fresh` one."""
    if existing.is_symlink() or not existing.is_dir():
        return False
    try:
        verify_bundle(existing)
    except BundleError:
        return False
    return (existing / CHECKSUMS_FILE).read_bytes() == (fresh / CHECKSUMS_FILE).read_bytes()


def unpack_bundle(archive: Path, dest: Path, max_bytes: int = DEFAULT_MAX_UNPACKED_BYTES) -> Path:
    """Safely unpack and verify a bundle archive written by pack_bundle.

    Takes the .tar.gz, the destination folder (created when missing) and the largest total size the
    files may have. Every member is checked before anything is extracted: absolute paths, `..`, links,
    devices, nested folders and more than one top folder are refused; extraction then uses tarfile's
    "data" filter into a staging folder, the result is verified and only then moved to
    `dest/<top folder>`. When that folder exists already it is kept if it verifies with the same
    SHA256SUMS (unpacking again is a no-op), else refused. Returns the bundle directory.
    Raises BundleError.
    """
    archive = Path(archive)
    dest = Path(dest)
    if not archive.is_file():
        raise BundleError(f"archive not found: {archive}")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            top = _check_members(members, max_bytes)
            target = dest / top
            dest.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
            try:
                limits = safety.ArchiveLimits(max_bytes=max_bytes, max_members=len(members), max_ratio=0)
                safety.extract_tar(tar, staging, limits, BundleError, members)  # counts the bytes written
                verify_bundle(staging / top)
                if target.exists() or target.is_symlink():
                    if not _same_bundle(target, staging / top):
                        raise BundleError(f"cannot unpack: {target} already exists with other contents")
                else:
                    (staging / top).rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as err:  # includes tarfile's FilterError and BadGzipFile
        raise BundleError(f"cannot read bundle archive {archive.name}: {err}") from None
    return target


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key in sorted(metrics):
        value = metrics[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, name + "."))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, (int, float)):
            rows.append((name, value))
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            rows.append((name, value.item()))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    lines = ["| " + " | ".join(_fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


DEFAULT_INTENDED_USE = (
    "Classifying images that resemble the training data (same kind of subject, framing, resolution "
    "and colour mode) into one of the listed classes. Outputs are probabilities over the known classes "
    "only; route low-confidence predictions to a person where a mistake matters."
)
DEFAULT_LIMITATIONS = (
    "The model only knows the listed classes and will give one of them for any input, including images "
    "from none of them. Accuracy was measured on a held-out split of the same data source and will be "
    "lower on images from other cameras, scanners, lighting or populations. Probabilities are not "
    "calibrated guarantees. Do not use it for decisions about people without a separate evaluation of "
    "fairness and error costs."
)


def model_card(
    model_name: str,
    data_source: str,
    fingerprint: str,
    split_counts: dict[str, int],
    metrics: dict[str, Any],
    confusion_matrix_image: str | None = None,
    compression_table: str | list[dict[str, Any]] | None = None,
    intended_use: str | None = None,
    limitations: str | None = None,
    labels: list[str] | None = None,
    architecture: str | None = None,
    version: str | None = None,
) -> str:
    """Build the MODEL_CARD.md text.

    Takes the model name, the data source (as given to ingest), the data set fingerprint, image counts
    per split ({"train": n, ...}), the test metrics (scalar numbers are listed, nested dicts with dotted
    names, lists left out), the confusion-matrix image's file name in the bundle (rendered as a
    markdown image), an optional compression comparison (markdown text, or rows as dicts rendered as a
    table), intended-use and limitations paragraphs (defaults when None), and optionally the labels,
    the architecture and a version. Returns the markdown text (no timestamps: the same inputs give the
    same card).
    """
    lines = [f"# Model card: {model_name}", ""]
    if version:
        lines += [f"Version: {version}", ""]
    lines += ["## Model", ""]
    if architecture:
        lines.append(f"- Architecture: {architecture}")
    lines += [
        f"- Format: ONNX ({MODEL_FILE}); preprocessing in {PREPROCESS_FILE}, labels in {LABELS_FILE}",
        f"- Files and their SHA-256 in {CHECKSUMS_FILE}",
    ]
    if labels:
        lines.append(f"- Classes ({len(labels)}): " + ", ".join(f"`{label}`" for label in labels))
    lines += ["", "## Data", "", f"- Source: `{data_source}`", f"- Fingerprint: `{fingerprint}`"]
    if split_counts:
        lines.append("- Images per split: " + ", ".join(f"{k} {v}" for k, v in split_counts.items()))
        lines.append(f"- Total: {sum(split_counts.values())}")
    lines += ["", "## Metrics (test split)", ""]
    rows = _flatten(metrics)
    if rows:
        lines += ["| metric | value |", "|---|---|"] + [f"| {name} | {_fmt(value)} |" for name, value in rows]
    else:
        lines.append("No metrics recorded.")
    if confusion_matrix_image:
        lines += ["", f"![Confusion matrix]({confusion_matrix_image})"]
    if compression_table:
        table = compression_table if isinstance(compression_table, str) else _table(compression_table)
        lines += ["", "## Compression", "", table.strip()]
    lines += [
        "",
        "## Intended use",
        "",
        (intended_use or DEFAULT_INTENDED_USE).strip(),
        "",
        "## Limitations",
        "",
        (limitations or DEFAULT_LIMITATIONS).strip(),
        "",
    ]
    return "\n".join(lines)
