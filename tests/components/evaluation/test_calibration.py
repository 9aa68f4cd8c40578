"""Temperature scaling: fitted on validation logits, it lowers the calibration error of held-out logits."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from components.evaluation.calibration import (
    MAX_TEMPERATURE,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from components.evaluation.results import read_calibration


def _logits(n: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a 5-class model that is right about 60% of the time; `scale` > 1 makes it over-confident."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 5, (n,), generator=g)
    logits = torch.randn(n, 5, generator=g)
    logits[torch.arange(n), targets] += 1.5
    return logits * scale, targets


def test_temperature_fitted_on_validation_lowers_the_held_out_calibration_error(tmp_path):
    val_logits, val_targets = _logits(600, 4.0, seed=0)
    test_logits, test_targets = _logits(600, 4.0, seed=1)
    result = calibrate(val_logits, val_targets, test_logits, test_targets, tmp_path, bins=15)

    assert 2.5 < result.temperature < 6.0  # the logits were blown up 4x
    assert result.ece_before > 0.15 and result.ece_after < result.ece_before / 2
    assert result.nll_after < result.nll_before and result.num_fitted == 600 and not result.bounded
    scaled = torch.softmax(test_logits / result.temperature, 1)
    assert result.ece_after == pytest.approx(expected_calibration_error(scaled, test_targets, 15))

    stored = json.loads((tmp_path / "calibration.json").read_text())
    assert stored["temperature"] == pytest.approx(result.temperature)
    assert sum(stored["curves"]["after"]["count"]) == 600
    with Image.open(tmp_path / "reliability.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert read_calibration(tmp_path).temperature == pytest.approx(result.temperature)
    assert read_calibration(tmp_path / "nothing") is None


def test_an_under_confident_model_is_sharpened_and_argmax_never_changes():
    with torch.inference_mode():  # as evaluation's predict returns them
        logits, targets = _logits(400, 0.3, seed=2)
    temperature = fit_temperature(logits, targets)
    assert temperature < 0.6
    assert torch.equal((logits / temperature).argmax(1), logits.argmax(1))


def test_a_validation_split_without_errors_keeps_t_1_and_one_error_gives_a_bounded_fit():
    targets = torch.arange(40) % 4
    logits = torch.nn.functional.one_hot(targets, 4).float() * 8.0
    assert fit_temperature(logits, targets) == 1.0  # nothing to fit on: T -> 0 would make every answer 1.0
    logits[0] = torch.nn.functional.one_hot(torch.tensor(1), 4).float() * 8.0  # one confident mistake
    fitted = fit_temperature(logits, targets)
    grid = torch.linspace(1.0, MAX_TEMPERATURE, 20_000)  # the NLL's minimum found by brute force
    nll = torch.stack([torch.nn.functional.cross_entropy(logits / t, targets) for t in grid])
    best = grid[nll.argmin()].item()
    assert fitted > 1.0, "the fit stayed at T = 1 although one confident mistake calls for a softer T"
    assert fitted < MAX_TEMPERATURE, "the fit ran to the upper bound instead of the NLL's inner minimum"
    assert fitted == pytest.approx(best, rel=1e-2)  # at the NLL's minimum


def test_reliability_bins_follow_torchmetrics_binning():
    probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.3, 0.7], [0.9, 0.1]])
    correct = [True, False, True, False]
    curve = reliability_bins(probs.numpy(), correct, bins=10)
    assert curve["count"] == [1.0, 1.0, 1.0, 1.0]
    assert curve["accuracy"] == [0.0, 1.0, 0.0, 1.0]  # bins 0.5-0.6, 0.6-0.7, 0.8-0.9, 0.9-1.0
