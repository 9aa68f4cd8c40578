"""The registry gate: does a challenger replace the champion?

Accuracies are compared only between models that answer the same question: the same labels in the same
order and the same input tensor (channels x crop). Otherwise the champion stays and the reason says how
to proceed (another package.model_name, or `visionflow promote` by hand).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel


class GateDecision(BaseModel):
    """The outcome of comparing a challenger with the current champion on the same test split."""

    promote: bool
    challenger_accuracy: float
    champion_accuracy: float | None
    margin: float
    reason: str
    compared: bool = True


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
        reason=(
            f"challenger {challenger_accuracy:.4f} {verdict} champion {champion_accuracy:.4f} "
            f"by more than {margin:.4f} (gain {gain:+.4f})"
        ),
    )


def _names(labels: list[str], limit: int = 6) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" (+{len(labels) - limit} more)" if len(labels) > limit else "") if labels else "none"


def _input_shape(preprocess: dict[str, Any]) -> str:
    height, width = preprocess["crop"]
    return f"{preprocess['channels']}x{height}x{width}"


def incompatibility(challenger: dict[str, Any], champion: dict[str, Any]) -> str | None:
    """Why two bundles' accuracies cannot be compared, or None when they can.

    Takes verify_bundle's result for each (its "labels" and "preprocess"): the labels must be the same
    list in the same order (an output index means the same class) and the input tensor the same
    (channels x crop height x crop width), or a caller of the registered model would get other answers.
    """
    theirs, ours = list(champion["labels"]), list(challenger["labels"])
    if ours != theirs:
        if sorted(ours) == sorted(theirs):
            return "the labels are the same but in another order"
        gone, new = [x for x in theirs if x not in ours], [x for x in ours if x not in theirs]
        return f"the labels differ (only the champion has: {_names(gone)}; only this version has: {_names(new)})"
    tasks = champion.get("task", "single"), challenger.get("task", "single")
    if tasks[0] != tasks[1]:
        return f"the task differs (champion {tasks[0]}, this version {tasks[1]})"
    if _input_shape(challenger["preprocess"]) != _input_shape(champion["preprocess"]):
        return (
            f"the input shape differs (champion {_input_shape(champion['preprocess'])}, "
            f"this version {_input_shape(challenger['preprocess'])})"
        )
    return None


def bundle_incompatibility(challenger_dir: Path, champion_dir: Path) -> str | None:
    """incompatibility() of two bundle directories (both verified first; BundleError when one does not)."""
    from components.bundle_format import verify_bundle

    return incompatibility(verify_bundle(Path(challenger_dir)), verify_bundle(Path(champion_dir)))


def refuse_comparison(
    challenger_accuracy: float, why: str, name: str, version: str, champion_version: str, margin: float
) -> GateDecision:
    """The decision when the challenger cannot be compared with the champion (see incompatibility): the
    champion stays, and the reason says why and how to proceed."""
    return GateDecision(
        promote=False,
        challenger_accuracy=challenger_accuracy,
        champion_accuracy=None,
        margin=margin,
        compared=False,
        reason=(
            f"not compared with champion version {champion_version}: {why}; the champion is unchanged. "
            f"Register models of other classes or inputs under another package.model_name, or make "
            f"this version champion by hand: visionflow promote {version} --name {name}"
        ),
    )
