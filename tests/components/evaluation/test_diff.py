"""write_diff on known answers: what changed between two models, for single-label and multi-label tasks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from components.errors import VisionflowError
from components.evaluation.diff import TASK_DIFFS, Answers, answers_in, label_set_problem, task_diff, write_diff

CLASSES = ["cat", "dog", "owl"]


def _images(folder, n):
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return [str(folder / f"{i}.png") for i in range(n)]


def _one_hot(answers, confidence=0.8):
    probs = np.full((len(answers), 3), (1 - confidence) / 2)
    probs[np.arange(len(answers)), answers] = confidence
    return probs


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_single_label_diff_names_the_fixed_broken_and_changed_images(tmp_path):
    paths = _images(tmp_path / "images", 8)
    targets = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    a = _one_hot([0, 1, 1, 1, 2, 2, 2, 0])  # wrong on 1, 6, 7
    b = _one_hot([0, 0, 1, 2, 2, 2, 1, 0], 0.9)  # fixes 1, breaks 3, 6 goes from one wrong answer to another
    rule = task_diff("single")
    result = write_diff(Answers(a), Answers(b), targets, CLASSES, paths, tmp_path / "out", ("ra", "rb"), "test rows")

    assert result.counts == {"fixed": 1, "broken": 1, "changed": 1}
    changed = _read(result.files["changed.csv"])
    assert [(c["kind"], c["path"]) for c in changed] == [
        ("fixed", paths[1]),
        ("broken", paths[3]),
        ("changed", paths[6]),
    ]
    assert changed[0]["answer_a"] == "dog" and changed[0]["answer_b"] == "cat" and changed[0]["target"] == "cat"
    assert result.summary_a["accuracy"] == result.summary_b["accuracy"] == pytest.approx(5 / 8)
    per_class = {row["class"]: row for row in _read(result.files["per_class_deltas.csv"])}
    assert float(per_class["cat"]["recall_delta"]) == pytest.approx(1 / 3)  # cat: 1/3 → 2/3 right
    assert float(per_class["dog"]["recall_delta"]) == pytest.approx(-1 / 3)
    assert {"confusion_diff.png", "fixed.png", "broken.png", "reliability.png", "summary.md"} <= set(result.files)
    assert "**1 fixed**" in result.markdown and "| accuracy | 0.6250 | 0.6250 | +0.0000 |" in result.markdown
    assert json.loads((tmp_path / "out" / "diff.json").read_text())["counts"] == result.counts
    assert rule.targets([{"label": "owl"}], CLASSES).tolist() == [2]


def test_multilabel_diff_reads_answers_over_each_models_thresholds(tmp_path):
    pytest.importorskip("components.evaluation.multilabel")
    paths = _images(tmp_path / "images", 4)
    rows = [{"label": "cat;dog"}, {"label": "owl"}, {"label": ""}, {"label": "dog"}]
    targets = TASK_DIFFS["multilabel"].targets(rows, CLASSES)
    assert targets.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]]
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.1, 0.7], [0.3, 0.2, 0.1], [0.1, 0.4, 0.2]])
    a = answers_in(CLASSES, probs, CLASSES, {"cat": 0.5, "dog": 0.7, "owl": 0.5})  # misses dog on 0 and 3
    b = answers_in(CLASSES, probs, CLASSES, {"cat": 0.5, "dog": 0.35, "owl": 0.5})  # same scores, lower dog bar
    result = write_diff(a, b, targets, CLASSES, paths, tmp_path / "out", ("ra", "rb"), "rows", task="multilabel")
    assert result.counts == {"fixed": 2, "broken": 0, "changed": 0}
    assert result.summary_a["accuracy"] == pytest.approx(0.5) and result.summary_b["accuracy"] == pytest.approx(1.0)
    changed = _read(result.files["changed.csv"])
    assert changed[0]["answer_a"] == "cat" and changed[0]["answer_b"] == "cat;dog" and changed[0]["target"] == "cat;dog"
    assert "confusion_diff.png" not in result.files and "| map |" in result.markdown


def test_other_label_sets_and_unknown_tasks_are_refused():
    assert label_set_problem(["a", "b"], ["b", "a"]) is None
    assert label_set_problem(["a", "b"], ["a", "c"]) == "the label sets differ (only A has: b; only B has: c)"
    with pytest.raises(VisionflowError, match="does not support data.task detection"):
        task_diff("detection")
