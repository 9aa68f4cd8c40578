"""ManifestRow declares every column ingest and validate write: a new column must be declared to pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.config import DataParams
from components.data.ingest import MANIFEST_COLUMNS, ingest, read_manifest
from components.data.manifest import ManifestRow
from components.data.validate import validate

DECLARED = set(ManifestRow.__annotations__)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)


def _assert_declared(manifest: str, extra_label_columns: list[str]) -> None:
    rows = read_manifest(manifest)
    assert rows
    for row in rows:
        undeclared = set(row) - DECLARED - set(extra_label_columns)
        assert not undeclared, f"{manifest} has columns ManifestRow does not declare: {sorted(undeclared)}"
        assert ManifestRow.__required_keys__ <= set(row)


def test_ingest_and_validate_write_only_declared_columns(tmp_path):
    for label in ("a", "b", "c"):
        for i in range(10):
            _image(tmp_path / "data" / label / f"{i}.png", ord(label) * 100 + i)
    params = DataParams(path=str(tmp_path / "data"))
    snapshot = ingest(params, tmp_path / "snap", tmp_path / "cache")
    assert snapshot.extra_label_columns == []
    _assert_declared(snapshot.manifest_path, [])
    report = validate(snapshot, params, tmp_path / "snap")
    _assert_declared(report.clean_manifest_path, [])


def test_extra_label_columns_are_the_only_undeclared_ones(tmp_path):
    lines = ["path,label,shape"]
    for i in range(30):
        _image(tmp_path / "data" / f"{i}.png", i)
        lines.append(f"{i}.png,{'ab'[i % 2]},{'xyz'[i % 3]}")
    (tmp_path / "data" / "m.csv").write_text("\n".join(lines) + "\n")
    snapshot = ingest(DataParams(path=str(tmp_path / "data" / "m.csv")), tmp_path / "snap", tmp_path / "cache")
    assert snapshot.extra_label_columns == ["shape"]
    _assert_declared(snapshot.manifest_path, snapshot.extra_label_columns)


def test_declared_columns_are_the_written_ones_in_file_order():
    assert MANIFEST_COLUMNS == ["path", "sha256", "label", "split", "width", "height", "mode"]
    assert ManifestRow.__required_keys__ == {"path", "label", "split"}
