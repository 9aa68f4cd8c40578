"""Multi-label data: label cells, CSV detection, the bundled demo, split checks, refusals (CLI exit 2), the plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import DataParams, load_params
from components.data import multilabel
from components.data.ingest import ingest
from components.data.validate import validate
from components.errors import DataError
from components.planning import fingerprint_of, plan_for_manifest


def _png(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path)
    return path.name


def _csv(folder: Path, cells: list[str], splits: list[str] | None = None) -> Path:
    """A CSV manifest of len(cells) distinct 8x8 images with those label cells (and splits when given)."""
    lines = ["path,label" + (",split" if splits else "")]
    for i, cell in enumerate(cells):
        name = _png(folder / f"img{i:03d}.png", i)
        lines.append(f"{name},{cell}" + (f",{splits[i]}" if splits else ""))
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder / "labels.csv"


def test_label_cells_are_canonical_and_bad_ones_refused():
    assert multilabel.parse_cell(" outdoor ; cat;cat", "row 1") == "cat;outdoor"
    assert multilabel.parse_cell("", "row 2") == ""  # empty_labels negative: no label present
    with pytest.raises(DataError, match="row 3: empty label set"):
        multilabel.parse_cell("  ", "row 3", "refuse")
    with pytest.raises(DataError, match="empty label name in 'cat;;dog'"):
        multilabel.parse_cell("cat;;dog", "row 4")
    with pytest.raises(DataError, match="label name 'a;b' contains the multi-label separator"):
        multilabel.check_label_name("a;b", "class folder")
    assert multilabel.resolve_task("auto", ["cat", "cat;dog"]) == "multilabel"
    assert multilabel.resolve_task("auto", ["cat", "dog"]) == "single"
    assert multilabel.resolve_task("single", ["cat;dog"]) == "single"  # explicit wins


def test_csv_manifest_is_detected_as_multilabel_and_counted_per_label(tmp_path):
    cells = ["cat;outdoor", "cat", "dog;outdoor", "dog", "", "outdoor"] * 4
    source = _csv(tmp_path / "data", cells)
    params = DataParams(path=str(source), task="auto")
    snapshot = ingest(params, tmp_path / "snap", tmp_path / "cache")
    assert snapshot.task == "multilabel"
    assert snapshot.classes == ["cat", "dog", "outdoor"]
    assert snapshot.class_counts == {"cat": 8, "dog": 8, "outdoor": 12}
    report = validate(snapshot, params, tmp_path / "out")
    assert sum(report.class_counts["train"].values()) + sum(report.class_counts["test"].values()) > 0
    assert {c for split in report.class_counts.values() for c in split} == {"cat", "dog", "outdoor"}

    source = _csv(tmp_path / "full", [c for c in cells if c])
    single = ingest(DataParams(path=str(source), task="single"), tmp_path / "snap1", tmp_path / "cache")
    assert "cat;outdoor" in single.classes  # explicit single: the cell is one class name


def test_empty_label_cells_follow_data_empty_labels(tmp_path):
    source = _csv(tmp_path / "data", ["a;b", "", "a", "b"] * 3)
    with pytest.raises(DataError, match="empty label set"):
        ingest(DataParams(path=str(source), task="auto", empty_labels="refuse"), tmp_path / "s", tmp_path / "c")
    plain = _csv(tmp_path / "plain", ["a", "", "b"] * 3)
    with pytest.raises(DataError, match="empty 'label'|empty label"):
        ingest(DataParams(path=str(plain), task="auto"), tmp_path / "s2", tmp_path / "c")


def test_a_folder_named_with_the_separator_is_refused_for_multilabel(tmp_path):
    for i in range(3):
        _png(tmp_path / "data" / "cat;dog" / f"{i}.png", i)
        _png(tmp_path / "data" / "bird" / f"{i}.png", 10 + i)
    with pytest.raises(DataError, match="contains the multi-label separator"):
        ingest(DataParams(path=str(tmp_path / "data"), task="multilabel"), tmp_path / "s", tmp_path / "c")
    assert ingest(DataParams(path=str(tmp_path / "data"), task="auto"), tmp_path / "s", tmp_path / "c").task == "single"


def test_label_only_in_val_is_refused_and_label_missing_from_test_warned(tmp_path):
    cells = ["a;b"] * 6 + ["a"] * 3 + ["b;c"] + ["a;b"] * 3
    splits = ["train"] * 9 + ["val"] + ["test"] * 3
    params = DataParams(path=str(_csv(tmp_path / "bad", cells, splits)), task="auto")
    snapshot = ingest(params, tmp_path / "s", tmp_path / "c")
    with pytest.raises(DataError, match="label 'c' never occurs in the train split"):
        validate(snapshot, params, tmp_path / "out")

    splits = ["train"] * 9 + ["train"] + ["val"] * 2 + ["test"]
    cells = ["a;b"] * 6 + ["a;c"] * 3 + ["c"] + ["a;b;c", "a;b;c"] + ["a;b"]
    params = DataParams(path=str(_csv(tmp_path / "warn", cells, splits)), task="auto")
    report = validate(ingest(params, tmp_path / "s2", tmp_path / "c"), params, tmp_path / "out2")
    assert report.warnings == ["label 'c' occurs in no test image (train 4, val 2, test 0)"]


def test_bundled_demo_has_several_labels_at_once_and_some_none(tmp_path):
    assert multilabel.split_cell(multilabel.join_labels(["loop", "even", "ge5"])) == ["even", "ge5", "loop"]
    from components.data.sources import digit_labels

    assert [digit_labels(str(d)) for d in (0, 1, 3, 7, 8)] == ["even;loop", "", "", "ge5", "even;ge5;loop"]
    snapshot = ingest(DataParams(path="bundled:digits-multilabel", task="auto"), tmp_path / "s", tmp_path / "c")
    assert snapshot.task == "multilabel" and snapshot.classes == ["even", "ge5", "loop"]
    assert snapshot.num_images == 1797


def test_plan_sets_the_task_from_the_manifest_and_explicit_params_win(tmp_path):
    source = _csv(tmp_path / "data", ["a;b", "a", "b", "b;a"] * 5)
    params = load_params(None, [f"data.path={source}", f"run.cache_dir={tmp_path / 'c'}", "data.channels=1"])
    assert params.data.task == "auto"
    snapshot = ingest(params.data, tmp_path / "s", tmp_path / "c")
    report = validate(snapshot, params.data, tmp_path / "out")
    plan = plan_for_manifest(params, report.clean_manifest_path)
    assert plan.params.data.task == "multilabel" and plan.params.train.class_balance == "none"
    decision = next(d for d in plan.decisions if d.field == "data.task")
    assert decision.source == "plan" and "several labels" in decision.reason
    rows = [
        {"label": "a;b", "split": "train", "width": "8", "height": "8"},
        {"label": "b", "split": "train", "width": "8", "height": "8"},
    ]
    assert fingerprint_of(rows, task="single").num_classes == 2  # "a;b" and "b" as classes
    assert fingerprint_of(rows).train_counts == {"a": 1, "b": 2}


def test_multilabel_refuses_what_mixes_one_label_targets():
    for override, what in [
        ("train.mixup_p=0.5", "mixup_p"),
        ("multitask.mode=shared_weights", "multitask"),
        ("train.class_balance=loss", "class_balance"),
    ]:
        extra = ["multitask.tasks=[x]"] if "multitask" in override else []
        with pytest.raises(Exception, match=f"data.task multilabel does not support .*{what}"):
            load_params(None, ["data.task=multilabel", override, *extra])


def test_validate_data_cli_exits_2_on_a_label_never_in_train(tmp_path):
    cells = ["a;b"] * 6 + ["a"] * 3 + ["b;c"] + ["a;b"] * 3
    splits = ["train"] * 9 + ["val"] + ["test"] * 3
    source = _csv(tmp_path / "bad", cells, splits)
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate-data", str(source), "--set", f"run.cache_dir={tmp_path / 'c'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "label 'c' never occurs in the train split" in out.stderr
    assert "Traceback" not in out.stderr


def test_folder_layout_copies_in_several_class_folders_are_one_image_with_those_labels(tmp_path):
    root = tmp_path / "data"
    for i in range(4):
        _png(root / "cat" / f"c{i}.png", i)  # cats 0-3
        _png(root / "outdoor" / f"o{i}.png", 10 + i)  # outdoor scenes 10-13
    for i in (0, 1):  # cats 0 and 1 were photographed outdoors: a copy in outdoor/
        (root / "outdoor" / f"c{i}.png").write_bytes((root / "cat" / f"c{i}.png").read_bytes())
    snapshot = ingest(DataParams(path=str(root), task="multilabel"), tmp_path / "s", tmp_path / "c")
    assert snapshot.num_images == 8 and snapshot.class_counts == {"cat": 4, "outdoor": 6}
    from components.data.ingest import read_manifest

    cells = {Path(r["path"]).name: r["label"] for r in read_manifest(snapshot.manifest_path)}
    assert cells["c0.png"] == "cat;outdoor" and cells["c2.png"] == "cat" and cells["o1.png"] == "outdoor"
    single = ingest(DataParams(path=str(root), task="auto"), tmp_path / "s1", tmp_path / "c")
    assert single.task == "single" and single.num_images == 10  # the copies stay label conflicts there
