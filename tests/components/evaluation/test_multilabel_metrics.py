"""Multi-label evaluation: thresholds tuned per label on validation outputs, torchmetrics' multilabel figures,
the report's files."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from components.evaluation.multilabel import compute_multilabel_metrics, tune_thresholds, write_multilabel_report

CLASSES = ["cat", "dog", "outdoor"]


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def test_thresholds_maximise_each_labels_f1_on_validation():
    # label 0: positives score 0.30 and 0.35, negatives 0.10 and 0.20 -> any threshold in (0.20, 0.30] is perfect;
    # the curve's threshold is the lowest positive score. label 1: positives above 0.8. label 2: no positive.
    probs = torch.tensor([[0.30, 0.90, 0.7], [0.35, 0.85, 0.6], [0.10, 0.20, 0.4], [0.20, 0.50, 0.1]])
    targets = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    thresholds = tune_thresholds(probs, targets)
    assert thresholds[0] == pytest.approx(0.30)
    assert thresholds[1] == pytest.approx(0.85)
    assert thresholds[2] == 0.5  # no positive validation image: the default


def test_metrics_use_the_given_thresholds():
    probs = [[0.9, 0.2, 0.6], [0.4, 0.7, 0.6], [0.3, 0.1, 0.2], [0.8, 0.8, 0.9]]
    logits = torch.tensor([[_logit(p) for p in row] for row in probs])
    targets = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]])
    at_half = compute_multilabel_metrics(logits, targets, CLASSES, [0.5, 0.5, 0.5])
    tuned = compute_multilabel_metrics(logits, targets, CLASSES, [0.35, 0.5, 0.5])
    # at 0.5, image 1's cat (0.4) is missed and its outdoor (0.6) a false positive: 2 wrong of 12
    assert at_half["summary"]["hamming_loss"] == pytest.approx(2 / 12)
    assert tuned["summary"]["hamming_loss"] == pytest.approx(1 / 12)
    assert tuned["per_class"][0] == {
        "class": "cat", "ap": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "threshold": 0.35, "support": 3,
    }  # fmt: skip
    assert at_half["per_class"][0]["recall"] == pytest.approx(2 / 3)
    assert tuned["summary"]["accuracy"] == pytest.approx(3 / 4)  # exact match: image 1 has outdoor wrong
    assert tuned["summary"]["map"] == pytest.approx(sum(r["ap"] for r in tuned["per_class"]) / 3)
    assert tuned["confusion"][2] == {"class": "outdoor", "tn": 1, "fp": 1, "fn": 0, "tp": 2}
    assert 0 < tuned["summary"]["micro_f1"] <= 1 and tuned["summary"]["macro_f1"] > at_half["summary"]["macro_f1"]


def test_report_files(tmp_path):
    logits = torch.tensor([[2.0, -1.0, 1.5], [-2.0, 1.0, 0.5], [1.0, 1.0, 1.0]])  # 0.5 -> 0.62 < 0.7
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    report = write_multilabel_report(logits, targets, CLASSES, [0.5, 0.6, 0.7], ["a", "b", "c"], tmp_path, "val (3)")
    assert set(report.metrics) >= {"map", "micro_f1", "macro_f1", "hamming_loss", "accuracy"}
    assert json.loads((tmp_path / "thresholds.json").read_text())["thresholds"] == {
        "cat": 0.5,
        "dog": 0.6,
        "outdoor": 0.7,
    }
    with open(report.predictions_path) as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["target"] == "cat;outdoor" and rows[0]["predicted"] == "cat;outdoor"
    assert rows[1]["predicted"] == "dog" and rows[2]["predicted"] == "cat;dog;outdoor"
    assert report.pr_curves_png_path and (tmp_path / "pr_curves.png").stat().st_size > 1000
    assert (tmp_path / "per_class.csv").read_text().splitlines()[0] == "class,ap,precision,recall,f1,threshold,support"


def test_compression_gate_measures_a_multilabel_model_by_its_map():
    import onnxruntime as ort

    from components.optimization.measure import measure_onnx
    from tests.helpers.tiny import tiny_data, trained_cnn_onnx

    images, classes = tiny_data(24)
    targets = torch.stack([classes == 0, classes != 1, classes == 2], dim=1).int()  # several labels per image
    path = trained_cnn_onnx()
    figures = measure_onnx(path, images.numpy(), targets.numpy(), CLASSES, repeats=3, warmup=0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    expected = compute_multilabel_metrics(logits, targets, CLASSES, [0.5] * 3)["summary"]
    assert figures["accuracy"] == pytest.approx(expected["map"]) and figures["macro_f1"] == pytest.approx(
        expected["macro_f1"]
    )
