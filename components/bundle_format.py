"""The bundle format: one directory (and its .tar.gz) a user can trust and serve.

A bundle holds model.onnx, labels.json, preprocess.json, MODEL_CARD.md, metrics.json, optional extra
files (an int8 variant, a reference profile, the confusion-matrix image) and SHA256SUMS, which lists
the SHA-256 of every other file in `sha256sum` format. Loading a bundle verifies every checksum and
refuses missing, unlisted or tampered files, pickles, links and ONNX external data that points outside
the bundle. Unpacking an archive refuses absolute paths, `..`, links and devices before anything is
extracted.

This module is the format's one owner (file names, checksums, verification, safe unpacking) and a leaf:
it imports only components.errors and components.safety, so packaging (which writes bundles), serving
and monitoring (which read them) all depend on it and not on each other.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import onnx

from components import safety
from components.errors import VisionflowError
from components.safety import file_sha256

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "MODEL_CARD.md"
CHECKSUMS_FILE = "SHA256SUMS"
# Optional: {"temperature": T, ...}; the served probabilities are softmax(logits / T). Without it, T = 1.
CALIBRATION_FILE = "calibration.json"
# Optional: {"task": "multilabel"} for a sigmoid model (one yes/no per label); it then needs THRESHOLDS_FILE,
# {"thresholds": {label: t}}: a label is answered when its sigmoid probability is at least t.
TASK_FILE = "task.json"
THRESHOLDS_FILE = "thresholds.json"
TASKS = ("single", "multilabel")
REQUIRED_FILES = (MODEL_FILE, LABELS_FILE, PREPROCESS_FILE, CARD_FILE, METRICS_FILE)

# Files that unpickle (and can so run code) when loaded: never part of a bundle.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")

PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "channels")

# Largest total size of the files an archive may unpack to (a guard against gzip bombs).
DEFAULT_MAX_UNPACKED_BYTES = 8 * 1024**3

_SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class BundleError(VisionflowError):
    """A bundle that cannot be written, packed, unpacked or trusted; the message names the file."""


def is_pickle(name: str) -> bool:
    """True for a file name that unpickles when loaded (.pt, .pth, .ckpt, .pkl, ...)."""
    return name.lower().endswith(PICKLE_SUFFIXES)


def plain_name(name: str) -> bool:
    """A file name without folders, `..`, hidden-file dots or control characters."""
    return (
        bool(name)
        and name not in (".", "..")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and all(ch.isprintable() for ch in name)
    )


def check_labels(labels: Any) -> list[str]:
    """The labels when they are a non-empty list of unique non-empty strings; raises BundleError otherwise."""
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise BundleError(f"{LABELS_FILE}: labels must be a non-empty list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise BundleError(f"{LABELS_FILE}: labels must be unique")
    return labels


def check_preprocess(preprocess: Any) -> dict[str, Any]:
    """The preprocessing spec when it is an object with every PREPROCESS_KEYS key; raises BundleError otherwise."""
    if not isinstance(preprocess, dict):
        raise BundleError(f"{PREPROCESS_FILE}: must be a JSON object")
    missing = [key for key in PREPROCESS_KEYS if key not in preprocess]
    if missing:
        raise BundleError(f"{PREPROCESS_FILE}: missing keys {', '.join(missing)}")
    return preprocess


def check_calibration(calibration: Any) -> float:
    """The temperature of a calibration.json object: a finite number > 0; raises BundleError otherwise."""
    value = calibration.get("temperature") if isinstance(calibration, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise BundleError(f"{CALIBRATION_FILE}: temperature must be a finite number > 0, got {value!r}")
    return float(value)


def check_task(bundle_dir: Path, listed: dict[str, str], labels: list[str]) -> tuple[str, dict[str, float] | None]:
    """(task, {label: threshold} or None) of a verified bundle: "single" without task.json; a multilabel bundle
    must carry thresholds.json with a threshold in [0, 1] for every label. Raises BundleError (one line)."""
    if TASK_FILE not in listed:
        return "single", None
    task = _load_json(bundle_dir, TASK_FILE)
    task = task.get("task") if isinstance(task, dict) else None
    if task not in TASKS:
        raise BundleError(f"{TASK_FILE}: task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "single":
        return task, None
    if THRESHOLDS_FILE not in listed:
        raise BundleError(f"multilabel bundle without {THRESHOLDS_FILE}: its per-label thresholds are missing")
    raw = _load_json(bundle_dir, THRESHOLDS_FILE)
    thresholds = raw.get("thresholds") if isinstance(raw, dict) else None
    if not isinstance(thresholds, dict):
        raise BundleError(f"{THRESHOLDS_FILE}: must hold an object 'thresholds' (label -> threshold)")
    for label in labels:
        value = thresholds.get(label)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise BundleError(f"{THRESHOLDS_FILE}: label {label!r} needs a threshold in [0, 1], got {value!r}")
    return task, {label: float(thresholds[label]) for label in labels}


def write_checksums(bundle_dir: Path) -> Path:
    """(Re)write SHA256SUMS for every other regular file in a bundle directory.

    Takes the bundle directory; returns the SHA256SUMS path. Lines are `<hex>  <name>`, sorted by name.
    """
    bundle_dir = Path(bundle_dir)
    names = sorted(p.name for p in bundle_dir.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE)
    lines = [f"{file_sha256(bundle_dir / name)}  {name}\n" for name in names]
    path = bundle_dir / CHECKSUMS_FILE
    path.write_text("".join(lines))
    return path


def read_checksums(bundle_dir: Path) -> dict[str, str]:
    """{file name: sha256} as SHA256SUMS lists them (parsed strictly; nothing is hashed here)."""
    bundle_dir = Path(bundle_dir)
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
        if not plain_name(name) or name == CHECKSUMS_FILE:
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


def external_data(model: onnx.ModelProto) -> Iterator[tuple[str, str]]:
    """(tensor name, external-data `location`) of every tensor of a model that keeps its data in a file
    (initializers, sparse and attribute tensors, subgraphs, functions)."""
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
            yield tensor.name, entries.get("location", "")


def external_locations(model: onnx.ModelProto) -> Iterator[str]:
    """Every external-data `location` in a model (see external_data)."""
    return (location for _, location in external_data(model))


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True when any tensor of the model keeps its data in an external file."""
    return any(True for _ in external_locations(model))


def external_data_escapes(location: str, model_dir: Path) -> bool:
    """The rule for an ONNX external-data `location`: True (refuse it) when it is empty, absolute or climbs
    with `..` (components.safety's archive-member rule), or resolves, links followed, to anything not
    below the model's folder."""
    if not location or safety.member_problem(location, "file"):
        return True
    return Path(model_dir).resolve() not in (Path(model_dir) / location).resolve().parents


def _check_onnx_external_data(bundle_dir: Path, name: str, listed: dict[str, str]) -> None:
    try:
        model = onnx.load(str(bundle_dir / name), load_external_data=False)
    except Exception:  # protobuf raises DecodeError and others on a broken file
        raise BundleError(f"not a valid ONNX model: {name}") from None
    root = bundle_dir.resolve()
    for location in external_locations(model):
        if external_data_escapes(location, bundle_dir):
            raise BundleError(f"external data outside the bundle: {name} -> {location!r}")
        target = (bundle_dir / location).resolve()
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
    Returns {"labels": list, "preprocess": dict, "metrics": dict, "files": {name: sha256}, "temperature": float}
    (the temperature from the optional calibration.json; 1.0 for a bundle without one), "task" and "thresholds"
    (task.json and thresholds.json: "single" and None for a bundle without them; see check_task).
    Raises BundleError naming the file ("checksum mismatch: model.onnx", "missing file: labels.json",
    "unlisted file: x", ...).
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"not a bundle directory: {bundle_dir}")
    listed = read_checksums(bundle_dir)
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
        if is_pickle(entry.name):
            raise BundleError(f"pickled file not allowed in a bundle: {entry.name}")
    for name, digest in sorted(listed.items()):
        if file_sha256(bundle_dir / name) != digest:
            raise BundleError(f"checksum mismatch: {name}")
    for name in sorted(listed):
        if name.lower().endswith(".onnx"):
            _check_onnx_external_data(bundle_dir, name, listed)
    labels = check_labels(_load_json(bundle_dir, LABELS_FILE))
    preprocess = check_preprocess(_load_json(bundle_dir, PREPROCESS_FILE))
    metrics = _load_json(bundle_dir, METRICS_FILE)
    if not isinstance(metrics, dict):
        raise BundleError(f"{METRICS_FILE}: must be a JSON object")
    temperature = check_calibration(_load_json(bundle_dir, CALIBRATION_FILE)) if CALIBRATION_FILE in listed else 1.0
    task, thresholds = check_task(bundle_dir, listed, labels)
    return {
        "labels": labels,
        "preprocess": preprocess,
        "metrics": metrics,
        "files": listed,
        "temperature": temperature,
        "task": task,
        "thresholds": thresholds,
    }


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
    if not plain_name(top):
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
