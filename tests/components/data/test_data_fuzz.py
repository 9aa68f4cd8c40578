"""Fuzz-style: a generated folder mixing good images with every bad kind the quarantine knows, links (inside,
outside, cycles, broken), label conflicts, duplicates and empty class folders. Ingest + validate must account
for every file (kept + quarantined = found, each reason counted) and change no source file."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import DataParams
from components.data.ingest import ingest, read_manifest
from components.data.validate import ValidationReport, validate
from components.errors import DataError
from tests.helpers.bad_images import make_bad_corpus

OUTSIDE = "link outside the data set"


def _tree_state(*roots: Path) -> dict[str, tuple]:
    """Every entry under `roots` (links not followed): link target, or size, mtime and sha256 of a file."""
    state = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                info = path.lstat()
                if path.is_symlink():
                    state[str(path)] = ("link", os.readlink(path), info.st_mtime_ns)
                elif path.is_file():
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    state[str(path)] = ("file", info.st_size, info.st_mtime_ns, digest)
    return state


class _Generator:
    """Writes the data set and records what validation must say about each item (None = kept)."""

    def __init__(self, tmp: Path, seed: int):
        self.rng = np.random.default_rng(seed)
        self.root = tmp / "data"
        self.outside = tmp / "elsewhere"
        self.expected: dict[str, str | None] = {}  # path relative to the root -> reason
        self.next_seed = seed * 100_000

    def image(self, path: Path) -> Path:
        self.next_seed += 1
        side = int(self.rng.integers(5, 12))
        pixels = np.random.default_rng(self.next_seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "RGB").save(path)
        return path

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def build(self, tmp: Path) -> None:
        classes = [f"class{i}" for i in range(int(self.rng.integers(3, 5)))]
        good = {
            c: [self.image(self.root / c / f"good_{i:02d}.png") for i in range(int(self.rng.integers(8, 14)))]
            for c in classes
        }
        for files in good.values():
            self.expected.update({self.rel(p): None for p in files})
        corpus = make_bad_corpus(tmp / "corpus")  # every bad kind, and the unusual files that must load
        for name in sorted(corpus.bad) + sorted(corpus.good):
            target = self.root / self.pick(classes) / f"corpus_{name}"
            shutil.copy(corpus.path(name), target)
            self.expected[self.rel(target)] = corpus.bad.get(name)
        self.duplicates_and_conflicts(classes, good)
        self.links(classes, good)
        (self.root / "empty_class").mkdir()
        (self.root / classes[0] / "notes.txt").write_text("not an image: ignored")

    def duplicates_and_conflicts(self, classes: list[str], good: dict[str, list[Path]]) -> None:
        for c in classes:  # an exact duplicate inside its own class: kept
            shutil.copy(good[c][0], self.root / c / "dup.png")
            self.expected[self.rel(self.root / c / "dup.png")] = None
        first, second = classes[0], classes[1]  # the same image in two classes: every copy quarantined
        source = good[first][1]
        shutil.copy(source, self.root / second / "conflict.png")
        reason = f"same image labelled {first} and {second}"
        self.expected[self.rel(source)] = self.expected[self.rel(self.root / second / "conflict.png")] = reason

    def links(self, classes: list[str], good: dict[str, list[Path]]) -> None:
        first, last = classes[0], classes[-1]
        os.symlink("..", self.root / first / "loop")  # a cycle through the root
        os.symlink(".", self.root / last / "self")  # a cycle on itself
        os.symlink(good[first][2].name, self.root / first / "again.png")  # the same file twice: counted once
        os.symlink(f"../{last}/{good[last][2].name}", self.root / first / "borrowed.png")  # labelled by its folder
        os.symlink(f"../{last}", self.root / first / "nested_class")  # a class folder inside another: once
        store = self.image(self.root / ".store" / "kept.png")  # hidden store inside the root
        os.symlink("../.store/kept.png", self.root / first / "stored.png")
        self.expected[f"{first}/stored.png"] = None
        assert store.is_file()
        os.symlink("../missing.png", self.root / last / "broken.png")  # a dangling link inside the root
        self.expected[f"{last}/broken.png"] = "file not found"
        outside_images = [self.image(self.outside / "fish" / f"{i}.png") for i in range(3)]
        os.symlink(self.outside / "fish", self.root / "fish")  # a class folder outside the root
        os.symlink(outside_images[0], self.root / first / "outside.png")  # an image outside
        os.symlink("../../elsewhere", self.root / last / "outside_dir")  # a folder outside, relative link
        os.symlink("/nonexistent/far/away.png", self.root / last / "far.png")  # a dangling link outside
        for rel in ("fish", f"{first}/outside.png", f"{last}/outside_dir", f"{last}/far.png"):
            self.expected[rel] = OUTSIDE


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_file_accounted_for_and_no_source_file_changed(tmp_path, seed):
    gen = _Generator(tmp_path, seed)
    gen.build(tmp_path)
    before = _tree_state(gen.root, gen.outside)

    data = DataParams(path=str(gen.root))
    snapshot = ingest(data, tmp_path / "snapshot", tmp_path / "cache")
    try:
        validate(snapshot, data, tmp_path / "out")
    except DataError as err:  # a class left without a valid test image may be refused: the report is written first
        assert "has no valid image in the" in str(err)
    report = ValidationReport.model_validate_json((tmp_path / "out" / "validation.json").read_text())

    assert report.num_checked == report.num_valid + len(report.quarantined) == len(gen.expected)
    found = {gen.rel(Path(q.path)): q.reason for q in report.quarantined}
    kept = {gen.rel(Path(row["path"])) for row in read_manifest(report.clean_manifest_path)}
    assert found == {rel: reason for rel, reason in gen.expected.items() if reason is not None}
    assert kept == {rel for rel, reason in gen.expected.items() if reason is None}
    assert Counter(q.reason for q in report.quarantined) == Counter(r for r in gen.expected.values() if r)
    assert {OUTSIDE, "file not found", "empty file", "not an image", "truncated"} <= set(found.values())
    assert len(report.label_conflicts) == 1 and report.empty_classes == ["empty_class"]
    assert sum(sum(per.values()) for per in report.class_counts.values()) == report.num_valid
    assert _tree_state(gen.root, gen.outside) == before  # nothing written, moved or touched
