"""Links in an ImageFolder: followed once inside the data root (no cycles, no double counting, labels from
the class folder an image really lives in), quarantined when they lead out of it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from components.config import DataParams
from components.data.ingest import ingest, read_manifest
from components.data.validate import validate

OUTSIDE = "link outside the data set"


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def _folder(root: Path, per_class: int, classes=("cat", "dog"), seed: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _image(root / name / f"img_{i:03d}.png", seed * 10_000 + c * 1000 + i)
    return root


def _run(tmp_path: Path, root: Path, **params):
    data = DataParams(path=str(root), **params)
    snapshot = ingest(data, tmp_path / "snapshot", tmp_path / "cache")
    return snapshot, read_manifest(snapshot.manifest_path), validate(snapshot, data, tmp_path / "out")


def test_link_loop_neither_multiplies_nor_relabels(tmp_path):
    root = _folder(tmp_path / "data", per_class=20)
    os.symlink("..", root / "cat" / "loop")  # cat/loop/cat/loop/... and cat/loop/dog/...
    os.symlink(".", root / "dog" / "self")
    snapshot, rows, report = _run(tmp_path, root)
    assert len(rows) == 40 and snapshot.num_images == 40
    assert snapshot.class_counts == {"cat": 20, "dog": 20}
    for row in rows:
        assert Path(row["path"]).resolve().parent.name == row["label"]  # the folder it really lives in
        assert Path(row["path"]).relative_to(root).parts == (row["label"], Path(row["path"]).name)
    assert report.num_checked == report.num_valid == 40 and not report.duplicate_groups


def test_links_outside_the_data_set_are_quarantined_never_taken(tmp_path):
    root = _folder(tmp_path / "data", per_class=5)
    elsewhere = _folder(tmp_path / "elsewhere", per_class=4, classes=("bird", "fish"), seed=1)
    os.symlink(elsewhere / "bird", root / "bird")  # a class folder outside the root
    os.symlink(elsewhere / "fish" / "img_000.png", root / "cat" / "outside.png")  # an image outside
    os.symlink("../../elsewhere/fish", root / "dog" / "more")  # a folder outside, relative link
    snapshot, rows, report = _run(tmp_path, root)
    assert all(Path(row["path"]).is_relative_to(root) and Path(row["path"]).name != "outside.png" for row in rows)
    assert snapshot.classes == ["cat", "dog"] and len(rows) == 10
    quarantined = {(Path(q.path).relative_to(root).as_posix(), q.label, q.reason) for q in report.quarantined}
    assert quarantined == {("bird", "bird", OUTSIDE), ("cat/outside.png", "cat", OUTSIDE), ("dog/more", "dog", OUTSIDE)}
    assert report.num_checked == report.num_valid + len(report.quarantined) == 13


def test_links_inside_are_followed_once_with_the_real_label(tmp_path):
    root = _folder(tmp_path / "data", per_class=4)
    os.symlink("img_000.png", root / "cat" / "again.png")  # the same image twice in one class
    os.symlink("../dog/img_001.png", root / "cat" / "a_dog.png")  # a dog image linked into cat
    os.symlink("../dog", root / "cat" / "dogs")  # a class folder linked into another
    os.symlink("cat", root / "kitty")  # an alias of a class folder
    _image(root / "cat" / "kittens" / "k.png", 98)
    os.symlink("cat/kittens", root / "kittens")  # a class folder linked to a folder inside another class
    _image(root / ".store" / "shared.png", 99)  # inside the root, in no class folder (a hidden store)
    os.symlink("../.store/shared.png", root / "cat" / "stored.png")
    snapshot, rows, report = _run(tmp_path, root)
    by_name = {Path(row["path"]).relative_to(root).as_posix(): row["label"] for row in rows}
    assert by_name == {
        **{f"cat/img_{i:03d}.png": "cat" for i in range(4)},
        **{f"dog/img_{i:03d}.png": "dog" for i in range(4)},
        "cat/stored.png": "cat",  # from the store: the class folder it was linked from
        "cat/kittens/k.png": "cat",
    }
    assert snapshot.classes == ["cat", "dog"] and report.empty_classes == []
    assert not report.duplicate_groups and not report.label_conflicts


def test_a_link_across_splits_keeps_the_real_split(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        _folder(root / split, per_class=3, seed=len(split))
    os.symlink("../../test/dog/img_000.png", root / "train" / "cat" / "borrowed.png")
    _, rows, _ = _run(tmp_path, root)
    assert len(rows) == 18
    borrowed = [row for row in rows if row["path"] == str(root / "test" / "dog" / "img_000.png")]
    assert [(row["label"], row["split"]) for row in borrowed] == [("dog", "test")]
