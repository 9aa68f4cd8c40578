"""Serving a multi-label bundle: every label over its threshold, with its probability; a multilabel bundle without
thresholds is refused; the drift monitor counts label frequencies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from components.bundle_format import BundleError, verify_bundle, write_checksums
from components.monitoring.drift import _predicted_counts
from components.serving.predictor import Predictor, labels_over_thresholds, sigmoid
from tests.components.packaging.test_bundle import LABELS, make_bundle, tiny_onnx_model

THRESHOLDS = {"circle": 0.5, "square": 0.3, "triangle": 0.9}


def _multilabel_bundle(folder: Path, thresholds: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"task": "multilabel"}))
    extra = {"task.json": folder / "task.json"}
    if thresholds is not None:
        (folder / "thresholds.json").write_text(json.dumps({"thresholds": thresholds}))
        extra["thresholds.json"] = folder / "thresholds.json"
    return make_bundle(folder, tiny_onnx_model(folder / "model.onnx", seed=5), extra)


def test_labels_over_their_thresholds_highest_first():
    probabilities = np.array([[0.6, 0.31, 0.95], [0.1, 0.2, 0.3]], dtype=np.float32)
    answers = labels_over_thresholds(probabilities, LABELS, THRESHOLDS)
    assert [a["label"] for a in answers[0]] == ["triangle", "circle", "square"]
    assert answers[0][2] == {"label": "square", "probability": pytest.approx(0.31), "threshold": 0.3}
    assert answers[1] == []
    assert sigmoid(np.array([0.0, 40.0, -40.0])).tolist() == pytest.approx([0.5, 1.0, 0.0])


def test_multilabel_bundle_answers_with_sigmoid_probabilities(tmp_path):
    bundle = _multilabel_bundle(tmp_path, THRESHOLDS)
    contents = verify_bundle(bundle)
    assert contents["task"] == "multilabel" and contents["thresholds"] == THRESHOLDS
    predictor = Predictor(bundle)
    images = [np.full((20, 20, 3), v, dtype=np.uint8) for v in (0, 128, 255)]
    probabilities = predictor.probabilities(np.stack([predictor.preprocess_image(i) for i in images]))
    assert not np.allclose(probabilities.sum(axis=1), 1.0)  # independent sigmoids, not a softmax
    for row, answer in zip(probabilities, predictor.predict(images), strict=True):
        assert {a["label"] for a in answer} == {
            label for label, p in zip(LABELS, row, strict=True) if p >= THRESHOLDS[label]
        }
        assert predictor.predicted_cell(row) == ";".join(sorted(a["label"] for a in answer))


def test_multilabel_bundle_without_thresholds_is_refused_in_one_line(tmp_path):
    with pytest.raises(BundleError, match="multilabel bundle without thresholds.json"):
        _multilabel_bundle(tmp_path / "written", None)  # packaging cannot write one
    bundle = _multilabel_bundle(tmp_path / "none", THRESHOLDS)
    (bundle / "thresholds.json").unlink()  # a bundle that lost it (checksums rewritten to match)
    write_checksums(bundle)
    with pytest.raises(BundleError) as refused:
        Predictor(bundle)
    assert str(refused.value) == "multilabel bundle without thresholds.json: its per-label thresholds are missing"
    (bundle / "thresholds.json").write_text(json.dumps({"thresholds": {"circle": 0.5, "square": 1.5}}))
    write_checksums(bundle)
    with pytest.raises(BundleError, match="label 'square' needs a threshold in \\[0, 1\\], got 1.5"):
        verify_bundle(bundle)
    (bundle / "thresholds.json").write_text(json.dumps({"thresholds": THRESHOLDS}))
    write_checksums(bundle)
    assert verify_bundle(bundle)["thresholds"] == THRESHOLDS
    assert verify_bundle(make_bundle(tmp_path / "single", tiny_onnx_model(tmp_path / "m.onnx")))["task"] == "single"


def test_drift_counts_label_frequencies_of_multilabel_predictions():
    records = [{"predicted": "circle;square"}, {"predicted": ""}, {"predicted": "square"}]
    assert _predicted_counts(records, multilabel=True) == {"circle": 1, "square": 2}
    assert _predicted_counts(records) == {"circle;square": 1, "": 1, "square": 1}


def test_feedback_label_sets_match_the_logged_cells(tmp_path):
    from components.monitoring.drift import read_feedback

    feedback = tmp_path / "feedback.csv"
    feedback.write_text("id,label\n1,square;circle\n2,circle;bird\n3,triangle\n")
    found, summary = read_feedback(feedback, LABELS)
    assert found == {"1": "circle;square", "3": "triangle"}  # as the server logs a label set
    assert summary.skipped == 1 and "unknown label 'circle;bird'" in summary.problems[0]


def test_compare_shows_map_and_macro_f1_for_multilabel_runs():
    from components.comparison import metric_columns

    multilabel = {"metrics": {"test/accuracy": 0.5, "test/macro_f1": 0.6, "test/map": 0.7}}
    single = {"metrics": {"test/accuracy": 0.9, "test/macro_f1": 0.8}}
    assert metric_columns([multilabel, single]) == ["test/map", "test/macro_f1", "test/accuracy"]
    assert metric_columns([single]) == ["test/accuracy", "test/macro_f1"]
