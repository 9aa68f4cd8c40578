"""The champion/challenger gate."""

from pathlib import Path

from components.config import AugmentParams
from components.data.augment import eval_preprocess_spec
from components.packaging.bundle import verify_bundle, write_bundle
from components.packaging.gate import bundle_incompatibility, decide_promotion, refuse_comparison
from tests.helpers.digits_bundle import LABELS, digits_bundle


def test_first_model_becomes_champion():
    decision = decide_promotion(0.5, None, 0.01)
    assert decision.promote and "no champion" in decision.reason


def test_challenger_must_beat_the_champion_by_the_margin():
    assert decide_promotion(0.96, 0.95, 0.0).promote
    assert not decide_promotion(0.955, 0.95, 0.01).promote
    assert not decide_promotion(0.95, 0.95, 0.0).promote  # a tie keeps the champion
    assert decide_promotion(0.97, 0.95, 0.01).promote


def _variant(tmp_path, name: str, labels=None, image_size: int = 8) -> Path:
    """A real bundle with the digits model and other labels or preprocessing."""
    source = verify_bundle(digits_bundle())
    preprocess = eval_preprocess_spec(AugmentParams(image_size=image_size, mean=[0.5], std=[0.5]), 1)
    return write_bundle(
        tmp_path / name,
        digits_bundle() / "model.onnx",
        labels or LABELS,
        preprocess,
        source["metrics"],
        "# variant\n",
    )


def test_bundles_with_other_labels_or_input_are_not_compared(tmp_path):
    champion = digits_bundle()
    assert bundle_incompatibility(_variant(tmp_path, "same"), champion) is None
    other = _variant(tmp_path, "other", labels=[*LABELS[:8], "cat", "dog"])
    assert bundle_incompatibility(other, champion) == (
        "the labels differ (only the champion has: 8, 9; only this version has: cat, dog)"
    )
    reordered = _variant(tmp_path, "reordered", labels=list(reversed(LABELS)))
    assert bundle_incompatibility(reordered, champion) == "the labels are the same but in another order"
    bigger = _variant(tmp_path, "bigger", image_size=16)
    assert bundle_incompatibility(bigger, champion) == "the input shape differs (champion 1x8x8, this version 1x16x16)"


def test_a_refused_comparison_keeps_the_champion_and_says_how_to_proceed():
    decision = refuse_comparison(0.9, "the labels differ (...)", "flowers", "7", "3", 0.0)
    assert not decision.promote and not decision.compared and decision.champion_accuracy is None
    assert decision.reason.startswith("not compared with champion version 3: the labels differ (...)")
    assert "another package.model_name" in decision.reason
    assert decision.reason.endswith("visionflow promote 7 --name flowers")
