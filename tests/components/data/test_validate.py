"""validate: quarantine with exact reasons, nothing lost, duplicates, leakage, refusals, report text."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import DataParams
from components.data.ingest import ingest, read_manifest
from components.data.validate import ValidationReport, format_report, validate
from components.errors import DataError
from tests.helpers.bad_images import make_bad_corpus


def _image(path: Path, seed: int, size: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def _folder(root: Path, per_class: int = 10, classes=("a", "b", "c"), seed: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _image(root / name / f"{name}_{i:03d}.png", seed * 10_000 + c * 1000 + i)
    return root


def _run(tmp_path, source: Path, **params):
    data = DataParams(path=str(source), **params)
    snapshot = ingest(data, tmp_path / "snapshot", tmp_path / "cache")
    return snapshot, validate(snapshot, data, tmp_path / "out")


def test_bad_corpus_quarantined_with_exact_reasons_nothing_lost(tmp_path):
    source = _folder(tmp_path / "data")
    corpus = make_bad_corpus(source / "a")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.rglob("*") if p.is_file()}

    snapshot, report = _run(tmp_path, source)

    assert snapshot.num_images == 30 + len(corpus.bad) + len(corpus.good)
    assert report.num_checked == snapshot.num_images
    assert report.num_checked == report.num_valid + len(report.quarantined)
    assert report.num_valid == 30 + len(corpus.good)
    reasons = {Path(q.path).name: q.reason for q in report.quarantined}
    assert reasons == corpus.bad
    assert all(q.label == "a" and q.split in ("train", "val", "test") for q in report.quarantined)
    assert sum(sum(per.values()) for per in report.class_counts.values()) == report.num_valid

    clean = read_manifest(report.clean_manifest_path)
    assert len(clean) == report.num_valid
    assert not {Path(row["path"]).name for row in clean} & set(corpus.bad)
    assert set(corpus.good) <= {Path(row["path"]).name for row in clean}
    assert list(clean[0].keys()) == list(read_manifest(snapshot.manifest_path)[0].keys())

    with open(report.quarantine_path, newline="") as handle:
        quarantine = list(csv.DictReader(handle))
    assert {Path(row["path"]).name: row["reason"] for row in quarantine} == corpus.bad
    assert ValidationReport.model_validate_json(Path(report.report_path).read_text()) == report
    assert report.mode_histogram["RGB"] >= 30 and report.mode_histogram["CMYK"] == 1
    assert report.size_histogram["6x6"] == 30

    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.rglob("*") if p.is_file()}
    assert after == before  # quarantine is a list, never a move or a rewrite

    text = format_report(report)
    assert f"{report.num_checked} images: {report.num_valid} valid, {len(corpus.bad)} quarantined" in text
    for name, reason in corpus.bad.items():
        assert f"{name}: {reason}" in text


def test_duplicates_and_leakage_reported(tmp_path):
    root = tmp_path / "data"
    for i, split in enumerate(("train", "val", "test")):
        _folder(root / split, per_class=3, seed=i)
    leaked = root / "train" / "a" / "a_000.png"
    shutil.copy(leaked, root / "test" / "a" / "leaked.png")
    shutil.copy(leaked, root / "train" / "a" / "dup.png")
    snapshot, report = _run(tmp_path, root)
    sha = hashlib.sha256(leaked.read_bytes()).hexdigest()
    assert report.leakage == [sha]
    assert len(report.duplicate_groups) == 1
    assert sorted(Path(p).name for p in report.duplicate_groups[0]) == ["a_000.png", "dup.png", "leaked.png"]
    assert report.class_counts["train"] == {"a": 4, "b": 3, "c": 3}
    assert report.imbalance_ratio == pytest.approx(4 / 3)
    text = format_report(report)
    assert "leakage: 1 image(s)" in text and "exact duplicates: 1 group(s)" in text


def test_channels_follow_params(tmp_path):
    source = _folder(tmp_path / "data", per_class=4)
    _, report = _run(tmp_path, source, channels=1)
    assert report.num_valid == 12 and not report.quarantined


def test_refuses_when_no_image_is_valid(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "data" / name / f"{i}.png").write_text(f"not an image {name} {i}")
    with pytest.raises(DataError, match="no valid images") as info:
        _run(tmp_path, tmp_path / "data")
    assert "\n" not in str(info.value)
    written = json.loads((tmp_path / "out" / "validation.json").read_text())  # the report is still written
    assert written["num_checked"] == 6 and len(written["quarantined"]) == 6


def test_refuses_a_single_class(tmp_path):
    source = _folder(tmp_path / "data", classes=("only",))
    with pytest.raises(DataError, match=r"need at least 2 classes with valid images, found 1 \(only\)"):
        _run(tmp_path, source)


def test_refuses_a_class_with_too_few_valid_images(tmp_path):
    source = _folder(tmp_path / "data", per_class=6)
    for i in range(4):  # class c: 6 files, 4 of them broken -> 2 valid
        (source / "c" / f"c_{i:03d}.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"class 'c' has 2 valid images \(train \d, val \d, test \d\); at least 3"):
        _run(tmp_path, source)


def test_refuses_a_class_missing_from_a_split(tmp_path):
    root = tmp_path / "data"
    _folder(root / "train", per_class=4, seed=1)
    _folder(root / "val", per_class=2, seed=2)
    _folder(root / "test", per_class=2, classes=("a", "b"), seed=3)
    with pytest.raises(DataError, match=r"class 'c' has no valid image in the test split \(train 4, val 2, test 0\)"):
        _run(tmp_path, root)


def test_same_image_under_two_classes_is_a_label_conflict(tmp_path):
    source = _folder(tmp_path / "data", per_class=6)
    shared = source / "a" / "a_000.png"
    shutil.copy(shared, source / "b" / "looks_like_b.png")  # the same content labelled a and b
    shutil.copy(source / "c" / "c_000.png", source / "a" / "also_a.png")  # ... a, c and b
    shutil.copy(source / "c" / "c_000.png", source / "b" / "also_b.png")
    shutil.copy(source / "b" / "b_001.png", source / "b" / "dup.png")  # an exact duplicate with one label
    snapshot, report = _run(tmp_path, source)

    reasons = {Path(q.path).relative_to(source).as_posix(): q.reason for q in report.quarantined}
    assert reasons == {
        "a/a_000.png": "same image labelled a and b",
        "b/looks_like_b.png": "same image labelled a and b",
        "a/also_a.png": "same image labelled a, b and c",
        "b/also_b.png": "same image labelled a, b and c",
        "c/c_000.png": "same image labelled a, b and c",
    }
    assert len(report.label_conflicts) == 2 and sorted(map(len, report.label_conflicts)) == [2, 3]
    assert report.num_checked == snapshot.num_images == 22 and report.num_valid == 17
    assert [sorted(Path(p).name for p in group) for group in report.duplicate_groups] == [["b_001.png", "dup.png"]]
    clean = {row["path"] for row in read_manifest(report.clean_manifest_path)}
    assert str(shared) not in clean and str(source / "b" / "dup.png") in clean
    assert "label conflicts: 2 image(s) under more than one class" in format_report(report)
    assert report.warnings == ["2 image(s) labelled with more than one class (5 files): quarantined"]


def test_label_conflicts_can_be_kept_on_request(tmp_path):
    source = _folder(tmp_path / "data", per_class=4)
    shutil.copy(source / "a" / "a_000.png", source / "b" / "looks_like_b.png")
    _, report = _run(tmp_path, source, label_conflicts="keep")
    assert report.quarantined == [] and report.num_valid == 13
    assert len(report.label_conflicts) == 1  # still counted and reported
    assert "kept with their labels" in report.warnings[0]
    with pytest.raises(ValueError, match="label_conflicts"):
        DataParams(label_conflicts="keep_first")


def test_empty_class_folders_are_reported(tmp_path):
    source = _folder(tmp_path / "data", per_class=4)
    (source / "empty").mkdir()
    (source / "notes_only").mkdir()
    (source / "notes_only" / "README.txt").write_text("no images here")
    snapshot, report = _run(tmp_path, source)
    assert snapshot.classes == ["a", "b", "c"]
    assert snapshot.empty_classes == report.empty_classes == ["empty", "notes_only"]
    assert report.warnings == [
        "class folder 'empty' holds no image: the class is left out",
        "class folder 'notes_only' holds no image: the class is left out",
    ]
    assert "empty class folders (left out): empty, notes_only" in format_report(report)
    assert (
        ValidationReport.model_validate_json(Path(report.report_path).read_text()).empty_classes == report.empty_classes
    )
