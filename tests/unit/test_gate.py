"""The champion/challenger gate."""

from components.packaging.gate import decide_promotion


def test_first_model_becomes_champion():
    decision = decide_promotion(0.5, None, 0.01)
    assert decision.promote and "no champion" in decision.reason


def test_challenger_must_beat_the_champion_by_the_margin():
    assert decide_promotion(0.96, 0.95, 0.0).promote
    assert not decide_promotion(0.955, 0.95, 0.01).promote
    assert not decide_promotion(0.95, 0.95, 0.0).promote  # a tie keeps the champion
    assert decide_promotion(0.97, 0.95, 0.01).promote
