"""The model bundle: write/verify round trip, tamper and traversal refusal, pack/unpack, model card."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from components.bundle_format import (
    CHECKSUMS_FILE,
    REQUIRED_FILES,
    BundleError,
    unpack_bundle,
    verify_bundle,
    write_checksums,
)
from components.config import AugmentParams
from components.data.augment import eval_preprocess_spec
from components.packaging.archive import pack_bundle
from components.packaging.bundle import write_bundle
from components.packaging.model_card import model_card

LABELS = ["circle", "square", "triangle"]


def tiny_onnx_model(path: Path, outputs: int = 3, seed: int = 0) -> Path:
    """Export a small real CNN (3x16x16 in, `outputs` logits out, dynamic batch) to `path`."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, outputs)
    ).eval()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 16, 16),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    return path


def preprocess_16(resize_ratio: float = 1.25) -> tuple[AugmentParams, dict]:
    """Eval parameters for 16x16 RGB (resize 20, center-crop 16) and their preprocess.json."""
    params = AugmentParams(image_size=16, eval_resize_ratio=resize_ratio, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    return params, eval_preprocess_spec(params, 3)


def make_bundle(folder: Path, onnx_path: Path, extra_files: dict[str, Path] | None = None) -> Path:
    metrics = {"accuracy": 0.9, "macro_f1": 0.88, "per_class": {"circle": {"f1": 0.9}}, "ece": float("nan")}
    card = model_card("shapes", "bundled:shapes", "abc123", {"train": 70, "val": 15, "test": 15}, metrics)
    return write_bundle(folder / "bundle", onnx_path, LABELS, preprocess_16()[1], metrics, card, extra_files)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    return tiny_onnx_model(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture
def bundle(tmp_path, onnx_file) -> Path:
    return make_bundle(tmp_path, onnx_file)


def test_round_trip(bundle, onnx_file, tmp_path):
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted([*REQUIRED_FILES, CHECKSUMS_FILE])
    contents = verify_bundle(bundle)
    assert contents["labels"] == LABELS
    assert contents["preprocess"] == preprocess_16()[1]
    assert contents["metrics"]["accuracy"] == 0.9 and contents["metrics"]["ece"] is None
    lines = (bundle / CHECKSUMS_FILE).read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == sorted(REQUIRED_FILES)
    assert all(len(line.split("  ")[0]) == 64 for line in lines)
    assert (bundle / "model.onnx").read_bytes() == onnx_file.read_bytes()
    # writing again replaces the bundle as a whole
    assert make_bundle(tmp_path, onnx_file) == bundle
    verify_bundle(bundle)


def test_extra_files_listed(tmp_path, onnx_file):
    profile = tmp_path / "profile.json"
    profile.write_text("{}")
    bundle = make_bundle(tmp_path, onnx_file, {"model.int8.onnx": onnx_file, "reference_profile.json": profile})
    assert set(verify_bundle(bundle)["files"]) == {*REQUIRED_FILES, "model.int8.onnx", "reference_profile.json"}


def test_tampered_model_refused(bundle):
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch: model.onnx"):
        verify_bundle(bundle)


def test_missing_file_refused(bundle):
    (bundle / "labels.json").unlink()
    with pytest.raises(BundleError, match="missing file: labels.json"):
        verify_bundle(bundle)


def test_missing_checksums_refused(bundle):
    (bundle / CHECKSUMS_FILE).unlink()
    with pytest.raises(BundleError, match="missing file: SHA256SUMS"):
        verify_bundle(bundle)


def test_unlisted_file_refused(bundle):
    (bundle / "x").write_text("surprise")
    with pytest.raises(BundleError, match="unlisted file: x"):
        verify_bundle(bundle)


def test_symlink_in_bundle_refused(bundle, tmp_path):
    (tmp_path / "elsewhere").write_text("x")
    (bundle / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match="link not allowed in a bundle: link"):
        verify_bundle(bundle)


@pytest.mark.parametrize("name", ["weights.pt", "model.pth", "last.ckpt", "scaler.pkl"])
def test_pickles_refused(tmp_path, onnx_file, name):
    pickle = tmp_path / name
    pickle.write_bytes(b"\x80\x04N.")
    with pytest.raises(BundleError, match="pickled"):
        make_bundle(tmp_path, onnx_file, {name: pickle})
    assert not (tmp_path / "bundle").exists()


def test_external_data_outside_refused(bundle, tmp_path):
    model = onnx.load(str(bundle / "model.onnx"))
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../outside.bin"), ("offset", "0"), ("length", "4")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4)
    onnx.save_model(model, str(bundle / "model.onnx"))
    write_checksums(bundle)  # consistent checksums: only the external path is wrong
    with pytest.raises(BundleError, match=r"external data outside the bundle: model.onnx -> '../outside.bin'"):
        verify_bundle(bundle)


def test_external_data_source_made_self_contained(tmp_path, onnx_file):
    model = onnx.load(str(onnx_file))
    split = tmp_path / "split"
    split.mkdir()
    onnx.save_model(model, str(split / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    bundle = make_bundle(tmp_path, split / "m.onnx")
    assert "m.onnx.data" not in verify_bundle(bundle)["files"]
    loaded = onnx.load(str(bundle / "model.onnx"))
    assert all(len(t.external_data) == 0 for t in loaded.graph.initializer)


def test_pack_unpack_round_trip(bundle, tmp_path):
    archive = pack_bundle(bundle)
    assert archive == bundle.with_name("bundle.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names == ["bundle", *(f"bundle/{n}" for n in sorted([*REQUIRED_FILES, CHECKSUMS_FILE]))]
    first = archive.read_bytes()
    assert pack_bundle(bundle).read_bytes() == first  # deterministic
    out = unpack_bundle(archive, tmp_path / "unpacked")
    assert out == tmp_path / "unpacked" / "bundle"
    assert verify_bundle(out)["labels"] == LABELS
    for name in REQUIRED_FILES:
        assert (out / name).read_bytes() == (bundle / name).read_bytes()
    assert unpack_bundle(archive, tmp_path / "unpacked") == out  # the same archive again: reused
    (out / "x").write_text("added")
    with pytest.raises(BundleError, match="already exists with other contents"):
        unpack_bundle(archive, tmp_path / "unpacked")
    assert sorted(p.name for p in (tmp_path / "unpacked").iterdir()) == ["bundle"]  # no staging left


def test_unpack_tampered_archive_refused(bundle, tmp_path):
    (bundle / "metrics.json").write_text('{"accuracy": 1.0}\n')  # after checksums: pack must refuse
    with pytest.raises(BundleError, match="checksum mismatch: metrics.json"):
        pack_bundle(bundle)
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match="checksum mismatch: metrics.json"):
        unpack_bundle(archive, dest)
    assert not (dest / "bundle").exists()


def _archive_with(path: Path, bundle: Path, evil: tarfile.TarInfo, payload: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(bundle, arcname="bundle")
        tar.addfile(evil, io.BytesIO(payload) if evil.isfile() else None)
    return path


def _file(name: str, payload: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "member, message",
    [
        (_file("/tmp/visionflow-evil-abs.txt", b"pwned"), "absolute path"),
        (_file("../x", b"pwned"), "path traversal"),
        (_file("bundle/../../x", b"pwned"), "path traversal"),
        (_symlink("bundle/link", "/etc/passwd"), "link"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink"],
)
def test_unsafe_archives_refused(bundle, tmp_path, member, message):
    archive = _archive_with(tmp_path / "evil.tar.gz", bundle, member, b"pwned")
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(BundleError, match=message):
        unpack_bundle(archive, dest)
    assert not dest.exists()  # nothing extracted, not even the destination folder
    assert not (tmp_path / "dest" / "x").exists() and not (tmp_path / "x").exists()
    assert not Path("/tmp/visionflow-evil-abs.txt").exists()


def test_device_member_refused(bundle, tmp_path):
    device = tarfile.TarInfo("bundle/null")
    device.type = tarfile.CHRTYPE
    archive = _archive_with(tmp_path / "dev.tar.gz", bundle, device)
    with pytest.raises(BundleError, match="device"):
        unpack_bundle(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_not_an_archive_refused(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar file at all")
    with pytest.raises(BundleError, match="cannot read bundle archive"):
        unpack_bundle(junk, tmp_path / "dest")


def test_model_card_contents():
    compression = [
        {"variant": "fp32", "size_mb": 1.5, "accuracy": 0.95},
        {"variant": "int8", "size_mb": 0.4, "accuracy": 0.94},
    ]
    card = model_card(
        "digits-cnn",
        "bundled:digits",
        "f00dfeed",
        {"train": 1257, "val": 270, "test": 270},
        {"accuracy": 0.9712, "per_class": {"0": {"f1": 1.0}}, "confusion": [[1, 0], [0, 1]], "n": np.int64(270)},
        confusion_matrix_image="confusion_matrix.png",
        compression_table=compression,
        labels=["0", "1"],
    )
    assert card.startswith("# Model card: digits-cnn")
    assert "`f00dfeed`" in card and "train 1257, val 270, test 270" in card
    assert "| accuracy | 0.9712 |" in card and "| per_class.0.f1 | 1.0000 |" in card and "| n | 270 |" in card
    assert "confusion |" not in card
    assert "![Confusion matrix](confusion_matrix.png)" in card
    assert "| variant | size_mb | accuracy |" in card and "| int8 | 0.4000 | 0.9400 |" in card
    assert "## Intended use" in card and "## Limitations" in card
    custom = model_card("m", "d", "f", {}, {}, intended_use="Only for tests.", limitations="Many.")
    assert "Only for tests." in custom and "Many." in custom and "Compression" not in custom
    assert json.dumps(card)  # plain text
