"""The registry gate: does a challenger replace the champion?"""

from __future__ import annotations

from pydantic import BaseModel


class GateDecision(BaseModel):
    """The outcome of comparing a challenger with the current champion on the same test split."""

    promote: bool
    challenger_accuracy: float
    champion_accuracy: float | None
    margin: float
    reason: str


def decide_promotion(challenger_accuracy: float, champion_accuracy: float | None, margin: float) -> GateDecision:
    """Promote when there is no champion yet, or when the challenger beats it by more than `margin`.

    Returns a GateDecision whose `reason` says why in one sentence.
    """
    if champion_accuracy is None:
        return GateDecision(
            promote=True,
            challenger_accuracy=challenger_accuracy,
            champion_accuracy=None,
            margin=margin,
            reason="no champion yet: the first model becomes champion",
        )
    gain = challenger_accuracy - champion_accuracy
    promote = gain > margin
    verdict = "beats" if promote else "does not beat"
    return GateDecision(
        promote=promote,
        challenger_accuracy=challenger_accuracy,
        champion_accuracy=champion_accuracy,
        margin=margin,
        reason=f"challenger {challenger_accuracy:.4f} {verdict} champion {champion_accuracy:.4f} by more than {margin:.4f} (gain {gain:+.4f})",
    )
