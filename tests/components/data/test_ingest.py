"""ingest: manifest, classes, deterministic stratified content-based split, fingerprint."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import DataParams
from components.data.ingest import MANIFEST_COLUMNS, ingest, read_manifest, write_manifest
from components.errors import DataError


def _image(path: Path, seed: int, size: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def _folder(root: Path, per_class: int = 20, classes=("a", "b", "c"), seed: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _image(root / name / f"{name}_{i:03d}.png", seed * 10_000 + c * 1000 + i)
    return root


def _split_by_sha(snapshot) -> dict[str, str]:
    return {row["sha256"]: row["split"] for row in read_manifest(snapshot.manifest_path)}


def _ingest(tmp_path, source: Path | str, name: str = "snap", **params):
    return ingest(DataParams(path=str(source), **params), tmp_path / name, tmp_path / "cache")


def test_manifest_classes_and_counts(tmp_path):
    snapshot = _ingest(tmp_path, _folder(tmp_path / "data"))
    rows = read_manifest(snapshot.manifest_path)
    assert list(rows[0].keys()) == MANIFEST_COLUMNS
    assert snapshot.classes == ["a", "b", "c"]
    assert json.loads(Path(snapshot.classes_path).read_text()) == ["a", "b", "c"]
    assert snapshot.num_images == len(rows) == 60
    assert snapshot.class_counts == {"a": 20, "b": 20, "c": 20}
    assert rows[0]["width"] == "6" and rows[0]["height"] == "6" and rows[0]["mode"] == "RGB"
    assert len(rows[0]["sha256"]) == 64
    # stratified: round(0.15 * 20) = 3 test and 3 val per class
    per = Counter((row["label"], row["split"]) for row in rows)
    for name in snapshot.classes:
        assert (per[(name, "train")], per[(name, "val")], per[(name, "test")]) == (14, 3, 3)
    assert snapshot.split_counts == {"train": 42, "val": 9, "test": 9}


def test_split_is_deterministic_and_content_based(tmp_path):
    source = _folder(tmp_path / "data")
    first = _ingest(tmp_path, source, "one")
    second = _ingest(tmp_path, source, "two")
    assert first.fingerprint == second.fingerprint
    assert _split_by_sha(first) == _split_by_sha(second)
    # the same images under other names, in another folder: same split, same fingerprint
    moved = tmp_path / "moved"
    for row in read_manifest(first.manifest_path):
        target = moved / row["label"] / f"renamed_{row['sha256'][:10]}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["path"], target)
    third = _ingest(tmp_path, moved, "three")
    assert third.fingerprint == first.fingerprint
    assert _split_by_sha(third) == _split_by_sha(first)
    # another seed: another split and fingerprint
    other = _ingest(tmp_path, source, "four", seed=7)
    assert other.fingerprint != first.fingerprint
    assert _split_by_sha(other) != _split_by_sha(first)
    assert other.split_counts == first.split_counts


def test_duplicates_share_a_split(tmp_path):
    source = _folder(tmp_path / "data", per_class=10)
    for i in range(4):  # each a-image copied 3 times, also into class b
        original = source / "a" / f"a_{i:03d}.png"
        shutil.copy(original, source / "a" / f"copy1_{i}.png")
        shutil.copy(original, source / "a" / f"copy2_{i}.png")
        shutil.copy(original, source / "b" / f"cross_{i}.png")
    for seed in range(5):
        rows = read_manifest(_ingest(tmp_path, source, f"s{seed}", seed=seed).manifest_path)
        splits: dict[str, set[str]] = {}
        for row in rows:
            splits.setdefault(row["sha256"], set()).add(row["split"])
        assert all(len(s) == 1 for s in splits.values())


def test_split_folders_honoured_and_val_carved_from_train(tmp_path):
    root = tmp_path / "data"
    _folder(root / "train", per_class=20, seed=1)
    _folder(root / "test", per_class=4, seed=2)
    snapshot = _ingest(tmp_path, root)
    rows = read_manifest(snapshot.manifest_path)
    for row in rows:
        if "/test/" in row["path"]:
            assert row["split"] == "test"
        else:
            assert row["split"] in ("train", "val")
    per = Counter((row["label"], row["split"]) for row in rows)
    assert all(per[(c, "val")] == 3 and per[(c, "train")] == 17 and per[(c, "test")] == 4 for c in "abc")


def test_full_split_folders_kept_as_given(tmp_path):
    root = tmp_path / "data"
    for i, split in enumerate(("train", "validation", "test")):
        _folder(root / split, per_class=2, seed=i)
    snapshot = _ingest(tmp_path, root)
    assert snapshot.split_counts == {"train": 6, "val": 6, "test": 6}


def test_csv_extra_label_columns_reach_the_manifest(tmp_path):
    root = tmp_path / "data"
    lines = ["path,label,shape,size"]
    for i in range(12):
        _image(root / f"{i}.png", i)
        lines.append(f"{i}.png,{'ab'[i % 2]},{'xyz'[i % 3]},{i}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    snapshot = _ingest(tmp_path, root / "m.csv")
    assert snapshot.extra_label_columns == ["shape", "size"]
    rows = read_manifest(snapshot.manifest_path)
    assert list(rows[0].keys()) == MANIFEST_COLUMNS + ["shape", "size"]
    by_name = {Path(row["path"]).name: row for row in rows}
    assert by_name["5.png"]["shape"] == "z" and by_name["5.png"]["size"] == "5"


def test_csv_with_some_splits_missing_refused(tmp_path):
    _image(tmp_path / "1.png", 1)
    _image(tmp_path / "2.png", 2)
    (tmp_path / "m.csv").write_text("path,label,split\n1.png,a,train\n2.png,b,\n")
    with pytest.raises(DataError, match="1 of 2 images have no split"):
        _ingest(tmp_path, tmp_path / "m.csv")


def test_unidentifiable_files_are_kept(tmp_path):
    source = _folder(tmp_path / "data", per_class=5)
    (source / "a" / "broken.png").write_text("not an image")
    (source / "a" / "empty.png").write_bytes(b"")
    rows = read_manifest(_ingest(tmp_path, source).manifest_path)
    by_name = {Path(row["path"]).name: row for row in rows}
    assert len(rows) == 17
    assert (by_name["broken.png"]["width"], by_name["broken.png"]["height"], by_name["broken.png"]["mode"]) == (
        "0",
        "0",
        "",
    )
    assert by_name["empty.png"]["sha256"] == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_write_and_read_manifest_round_trip(tmp_path):
    rows = [
        {
            "path": "/x/1.png",
            "sha256": "ab",
            "label": "a,b",
            "split": "train",
            "width": "1",
            "height": "2",
            "mode": "L",
            "task": "q",
        },
        {
            "path": "/x/2.png",
            "sha256": "cd",
            "label": "b",
            "split": "test",
            "width": "3",
            "height": "4",
            "mode": "RGB",
            "task": "",
        },
    ]
    write_manifest(rows, tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv") == rows
    write_manifest([], tmp_path / "empty.csv", columns=MANIFEST_COLUMNS + ["task"])
    assert (tmp_path / "empty.csv").read_text().strip() == ",".join(MANIFEST_COLUMNS + ["task"])


def test_a_broken_file_moves_no_good_image_to_another_split(tmp_path):
    # a dangling link has no content hash: were it keyed by its path, the split of the good images of its
    # class would depend on where the folder lives
    splits = []
    for where in ("here", "there", "somewhere/else", "x/y/z", "elsewhere", "w"):
        root = _folder(tmp_path / where / "data", per_class=6)
        for i in range(3):
            (root / "a" / f"gone{i}.png").symlink_to(root / f"nothing{i}.png")
        splits.append({sha: split for sha, split in _split_by_sha(_ingest(tmp_path / where, root)).items() if sha})
    assert len(splits[0]) == 18 and all(other == splits[0] for other in splits[1:])
