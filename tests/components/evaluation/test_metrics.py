"""compute_metrics against values worked out by hand."""

import json
import math

import pytest
import torch

from components.evaluation.metrics import compute_metrics

CLASSES = ["cat", "dog", "owl"]
TARGETS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDS = torch.tensor([0, 1, 1, 1, 2, 0])


def _logits(preds, num_classes, confidence=4.0):
    return torch.nn.functional.one_hot(preds, num_classes).float() * confidence


def test_tiny_case_by_hand():
    m = compute_metrics(_logits(PREDS, 3), TARGETS, CLASSES, top_k=1)
    # rows = true, columns = predicted
    confusion = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["confusion_matrix"] == confusion
    precision = [1 / 2, 2 / 3, 1 / 1]  # column-wise: tp / predicted
    recall = [1 / 2, 2 / 2, 1 / 2]  # row-wise: tp / support
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=False)]  # 0.5, 0.8, 0.6667
    s = m["summary"]
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["top1_accuracy"] == pytest.approx(4 / 6)
    assert s["macro_precision"] == pytest.approx(sum(precision) / 3)
    assert s["macro_recall"] == pytest.approx(sum(recall) / 3)
    assert s["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert s["num_samples"] == 6 and isinstance(s["num_samples"], int)
    assert [row["class"] for row in m["per_class"]] == CLASSES
    for row, p, r, f in zip(m["per_class"], precision, recall, f1, strict=False):
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f))
        assert row["support"] == 2
    assert all(isinstance(v, float) for k, v in s.items() if k != "num_samples")
    json.dumps(m)  # plain Python types only


def test_top_k_accuracy():
    # Second choices: sample 1 (true dog) has dog second; sample 5 (true cat) has cat third.
    logits = torch.tensor(
        [
            [3.0, 2.0, 1.0],  # cat, correct
            [2.0, 3.0, 1.0],  # true cat, top-2 hit
            [1.0, 3.0, 2.0],
            [1.0, 3.0, 2.0],
            [1.0, 2.0, 3.0],
            [1.0, 2.0, 3.0],  # true owl, correct
        ]
    )
    targets = torch.tensor([0, 0, 1, 1, 2, 0])
    m = compute_metrics(logits, targets, CLASSES, top_k=2)
    assert m["summary"]["accuracy"] == pytest.approx(4 / 6)
    assert m["summary"]["top2_accuracy"] == pytest.approx(5 / 6)
    # k is clipped to the number of classes
    clipped = compute_metrics(logits, targets, CLASSES, top_k=5)["summary"]
    assert clipped["top3_accuracy"] == pytest.approx(1.0)
    assert "top5_accuracy" not in clipped


def test_ece_is_zero_for_confident_correct_predictions():
    m = compute_metrics(_logits(TARGETS, 3, confidence=100.0), TARGETS, CLASSES)
    assert m["summary"]["accuracy"] == 1.0
    assert m["summary"]["ece"] == pytest.approx(0.0, abs=1e-6)


def test_ece_of_uniform_predictions():
    # Every prediction has confidence 1/3; argmax of equal logits is class 0, right 2 times in 6.
    m = compute_metrics(torch.zeros(6, 3), TARGETS, CLASSES, calibration_bins=10)
    assert m["summary"]["ece"] == pytest.approx(abs(1 / 3 - 2 / 6), abs=1e-6)


def test_logits_inside_unit_interval_are_still_softmaxed():
    # Raw outputs in [0, 1] are logits too: the confidence is softmax([1, 0]) = 0.731, not 1.0.
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    m = compute_metrics(logits, torch.tensor([0, 0]), ["a", "b"], calibration_bins=10)
    assert m["summary"]["ece"] == pytest.approx(1 - math.exp(1) / (math.exp(1) + 1), abs=1e-5)


def test_two_classes_are_multiclass():
    targets = torch.tensor([0, 1, 1, 0])
    preds = torch.tensor([0, 1, 0, 0])
    m = compute_metrics(_logits(preds, 2), targets, ["no", "yes"])
    s = m["summary"]
    assert s["accuracy"] == pytest.approx(3 / 4)
    assert s["top2_accuracy"] == 1.0
    assert m["confusion_matrix"] == [[2, 0], [1, 1]]
    # per class: no P=2/3 R=1, yes P=1 R=1/2
    assert s["macro_precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["macro_recall"] == pytest.approx((1 + 1 / 2) / 2)


def test_absent_classes_give_zeros_not_nan():
    classes = ["cat", "dog", "owl", "eel"]
    # "eel" is neither a target nor predicted; "owl" is predicted but never a target.
    targets = torch.tensor([0, 0, 1, 1])
    preds = torch.tensor([0, 2, 1, 1])
    m = compute_metrics(_logits(preds, 4), targets, classes)
    values = [v for row in m["per_class"] for v in (row["precision"], row["recall"], row["f1"])]
    values += [v for v in m["summary"].values()]
    assert all(math.isfinite(v) for v in values)
    eel = m["per_class"][3]
    assert (eel["precision"], eel["recall"], eel["f1"], eel["support"]) == (0.0, 0.0, 0.0, 0)
    owl = m["per_class"][2]
    assert (owl["precision"], owl["recall"], owl["support"]) == (0.0, 0.0, 0)
    # torchmetrics' macro average leaves out the class absent from both targets and predictions
    # (eel) but keeps owl (a false positive): precision cat 1/1, dog 2/2, owl 0/1.
    assert m["summary"]["macro_precision"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["summary"]["macro_recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        compute_metrics(torch.zeros(6, 3), TARGETS, ["a", "b"])
    with pytest.raises(ValueError):
        compute_metrics(torch.zeros(5, 3), TARGETS, CLASSES)
    with pytest.raises(ValueError):
        compute_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), CLASSES)
