"""write_report: the evaluate stage's files and the EvalReport it returns."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import EvaluateParams
from components.evaluation.metrics import compute_metrics
from components.evaluation.report import EvalReport, write_report

pytestmark = pytest.mark.filterwarnings("error::UserWarning")

CLASSES = ["cat", "dog", "owl"]
TARGETS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDS = torch.tensor([0, 1, 1, 1, 2, 0])


def _images(folder, n, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        shape = (12, 12, 3) if mode == "RGB" else (12, 12)
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(path)
        paths.append(str(path))
    return paths


def _logits(preds, num_classes):
    return torch.nn.functional.one_hot(preds, num_classes).float() * 3.0


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _assert_png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 50 and im.size[1] > 50


def test_report_files(tmp_path):
    paths = _images(tmp_path / "images", 6)
    logits = _logits(PREDS, 3)
    report = write_report(logits, TARGETS, CLASSES, paths, tmp_path / "out", EvaluateParams(), channels=3)

    assert isinstance(report, EvalReport)
    expected = compute_metrics(logits, TARGETS, CLASSES, top_k=3, calibration_bins=15)
    assert report.metrics == pytest.approx(expected["summary"])
    assert report.metrics["accuracy"] == pytest.approx(4 / 6)

    metrics = json.loads(Path(report.metrics_path).read_text())
    assert metrics["summary"] == pytest.approx(expected["summary"])
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["classes"] == CLASSES

    per_class = _read_csv(report.per_class_path)
    assert per_class[0] == ["class", "precision", "recall", "f1", "support"]
    assert [row[0] for row in per_class[1:]] == CLASSES
    assert float(per_class[2][3]) == pytest.approx(0.8)  # dog: P 2/3, R 1

    confusion = _read_csv(report.confusion_csv_path)
    assert confusion[0][1:] == CLASSES
    assert [row[0] for row in confusion[1:]] == CLASSES
    assert [[int(v) for v in row[1:]] for row in confusion[1:]] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]

    predictions = _read_csv(report.predictions_path)
    assert predictions[0] == ["path", "target", "predicted", "confidence"]
    assert [row[0] for row in predictions[1:]] == paths
    assert [row[1] for row in predictions[1:]] == ["cat", "cat", "dog", "dog", "owl", "owl"]
    assert [row[2] for row in predictions[1:]] == ["cat", "dog", "dog", "dog", "owl", "cat"]
    assert all(0 < float(row[3]) <= 1 for row in predictions[1:])

    _assert_png(report.confusion_png_path)
    assert report.misclassified_png_path is not None
    _assert_png(report.misclassified_png_path)


def test_no_misclassified_grid_when_all_correct_or_turned_off(tmp_path):
    paths = _images(tmp_path / "images", 6, mode="L")
    all_right = write_report(_logits(TARGETS, 3), TARGETS, CLASSES, paths, tmp_path / "a", EvaluateParams(), channels=1)
    assert all_right.misclassified_png_path is None
    assert not (tmp_path / "a" / "misclassified.png").exists()
    off = write_report(
        _logits(PREDS, 3), TARGETS, CLASSES, paths, tmp_path / "b", EvaluateParams(misclassified_grid=0), channels=1
    )
    assert off.misclassified_png_path is None


def test_grayscale_and_unreadable_images_in_the_grid(tmp_path):
    paths = _images(tmp_path / "images", 6, mode="L")
    paths[1] = str(tmp_path / "missing.png")  # a mistake whose file has gone
    report = write_report(
        _logits(PREDS, 3), TARGETS, CLASSES, paths, tmp_path / "out", EvaluateParams(misclassified_grid=1), channels=1
    )
    _assert_png(report.misclassified_png_path)


def test_many_classes(tmp_path):
    classes = [f"class_{i:02d}" for i in range(50)]
    targets = torch.arange(100) % 50
    preds = (targets + (torch.arange(100) % 7 == 0).long()) % 50
    paths = _images(tmp_path / "images", 100)
    report = write_report(
        torch.randn(100, 50) + _logits(preds, 50),
        targets,
        classes,
        paths,
        tmp_path / "out",
        EvaluateParams(),
        channels=3,
    )
    _assert_png(report.confusion_png_path)
    with Image.open(report.confusion_png_path) as im:
        assert min(im.size) > 1000  # big enough for 50 labelled rows
    assert len(_read_csv(report.confusion_csv_path)) == 51


def test_paths_must_match_the_samples(tmp_path):
    with pytest.raises(ValueError):
        write_report(_logits(PREDS, 3), TARGETS, CLASSES, ["x.png"], tmp_path, EvaluateParams(), channels=3)
