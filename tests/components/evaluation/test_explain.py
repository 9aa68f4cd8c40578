"""Explanations on tiny trained models: the maps point at the class blob of tiny_data, the evaluation's grid puts
mistakes first and skips (never fails) a model it cannot explain, `explain_files` writes one PNG per image."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from components.config import AugmentParams, EvaluateParams, RnnParams, TrainParams, VitParams
from components.errors import ImageDecodeError
from components.evaluation.explain import (
    UnsupportedModelError,
    attribution_maps,
    explain_files,
    explain_predictions,
    explainable_rows,
    pick_rows,
)
from components.models import ModelSpec, build_model
from components.training.module import ClassifierModule
from tests.helpers.tiny import CLASSES, SPEC, fit_tiny, tiny_data, trained_cnn

AUGMENT = AugmentParams(image_size=16, mean=[0.5], std=[0.5], hflip_p=0.0, eval_resize_ratio=1.0)
CORNERS = [(2, 2), (2, 9), (9, 5)]  # tiny_data's 5x5 blob of each class
SPECS = {
    "rnn": SPEC.model_copy(update={"name": "rnn", "rnn": RnnParams(hidden_size=16, num_layers=1)}),
    "vit": SPEC.model_copy(update={"name": "vit", "vit": VitParams(width=16, depth=1, heads=2, patch_size=4)}),
}


@functools.lru_cache(maxsize=2)
def _trained(name: str, steps: int = 40) -> nn.Module:
    """A tiny RNN or ViT trained on tiny_data (once per session)."""
    torch.manual_seed(0)
    return fit_tiny(build_model(SPECS[name]), steps, lr=5e-3)


def _blob_masks(y: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(len(y), 16, 16, dtype=torch.bool)
    for i, label in enumerate(y.tolist()):
        r, c = CORNERS[label]
        mask[i, r : r + 5, c : c + 5] = True
    return mask


def _assert_points_at_blobs(maps: torch.Tensor, y: torch.Tensor, factor: float) -> None:
    assert maps.shape == (len(y), 16, 16)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert all(float(m.max()) == pytest.approx(1.0) for m in maps)  # non-trivial: every map has a peak
    mask = _blob_masks(y)
    inside, outside = maps[mask].mean(), maps[~mask].mean()
    assert inside > factor * outside, f"blob {inside:.3f} vs background {outside:.3f}"


def test_gradcam_of_the_cnn_points_at_the_class_blob():
    x, y = tiny_data(12, seed=1)
    maps, method, layer = attribution_maps(trained_cnn(), "cnn", x, y.tolist())
    assert method == "gradcam" and layer == "5"  # the small CNN's last max-pool (4x4 at 16x16 input)
    _assert_points_at_blobs(maps, y, factor=1.8)


@pytest.mark.parametrize("name", ["rnn", "vit"])
def test_integrated_gradients_of_the_sequence_models_point_at_the_class_blob(name):
    x, y = tiny_data(12, seed=1)
    model = _trained(name)
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    maps, method, layer = attribution_maps(model, name, x, y.tolist())
    assert (method, layer) == ("integrated_gradients", None)
    _assert_points_at_blobs(maps, y, factor=3.0)


def test_gradcam_of_a_network_without_feature_map_is_refused():
    x, y = tiny_data(3)
    with pytest.raises(UnsupportedModelError, match="rnn has no convolutional feature map"):
        attribution_maps(_trained("rnn"), "rnn", x, y.tolist(), method="gradcam")


def test_rows_to_explain_put_confident_mistakes_first_and_keep_a_quarter_for_correct_ones():
    single = [{"path": "x", "target": "a", "predicted": "b", "confidence": str(c)} for c in (0.5, 0.9, 0.7, 0.6, 0.8)]
    single += [{"path": "x", "target": "a", "predicted": "a", "confidence": "0.99"} for _ in range(10)]
    single.append({"path": "x", "target": "zebra", "predicted": "a", "confidence": "0.9"})  # not the model's class
    rows = explainable_rows(single, CLASSES)
    assert len(rows) == 15
    chosen = pick_rows(rows, 4)
    assert [r["confidence"] for r in chosen[:3]] == [0.9, 0.8, 0.7] and not any(r["correct"] for r in chosen[:3])
    assert chosen[3]["correct"] and chosen[3]["predicted"] == "a"
    assert len(pick_rows(rows[:5], 8)) == 5 and len(pick_rows(rows[5:], 3)) == 3

    multilabel = [  # labels joined by ';', one probability column per label: explained by the most probable label
        {"path": "y", "target": "a;c", "predicted": "a;c", "p_a": "0.7", "p_b": "0.1", "p_c": "0.9"},
        {"path": "z", "target": "a", "predicted": "b", "p_a": "0.2", "p_b": "0.6", "p_c": "0.1"},
    ]
    assert [(r["predicted"], r["confidence"], r["correct"]) for r in explainable_rows(multilabel, CLASSES)] == [
        ("c", 0.9, True),
        ("b", 0.6, False),
    ]


def _checkpoint(path: Path, spec: ModelSpec, network: nn.Module) -> str:
    module = ClassifierModule(
        spec.model_dump(), TrainParams().model_dump(), CLASSES, AUGMENT.model_dump(), network=network
    )
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path)


def _pngs(root: Path, n: int) -> tuple[list[str], list[int]]:
    x, y = tiny_data(n, seed=2)
    pixels = ((x[:, 0] * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).numpy()
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(str(root / f"{i:02d}.png"))
        Image.fromarray(np.ascontiguousarray(image), "L").save(paths[-1])
    return paths, y.tolist()


def _predictions(path: Path, paths: list[str], targets: list[int], wrong: int) -> Path:
    """predictions.csv with every image right except `wrong`, given as a confident mistake."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "target", "predicted", "confidence"])
        for i, (p, t) in enumerate(zip(paths, targets, strict=True)):
            writer.writerow(
                [p, CLASSES[t], CLASSES[(t + 1) % 3] if i == wrong else CLASSES[t], 0.97 if i == wrong else 0.8]
            )
    return path


def test_the_evaluation_grid_shows_mistakes_first_and_skips_a_model_it_cannot_explain(tmp_path):
    paths, targets = _pngs(tmp_path / "images", 9)
    predictions = _predictions(tmp_path / "predictions.csv", paths, targets, wrong=4)
    cnn = _checkpoint(tmp_path / "cnn.ckpt", SPEC, trained_cnn())
    result = explain_predictions(cnn, predictions, tmp_path / "cnn", EvaluateParams(explain_images=6), 10**6)
    assert Path(result.png_path).name == "explanations.png" and Path(result.png_path).stat().st_size > 5000
    assert (result.method, result.layer, result.skipped) == ("gradcam", "5", None)
    assert len(result.images) == 6 and result.images[0].path == paths[4]
    assert [e.target == e.predicted for e in result.images] == [False] + [True] * 5

    rnn = _checkpoint(tmp_path / "rnn.ckpt", SPECS["rnn"], _trained("rnn"))
    forced = EvaluateParams(explain_method="gradcam")
    skipped = explain_predictions(rnn, predictions, tmp_path / "rnn", forced, 10**6)
    assert skipped.png_path is None and "rnn has no convolutional feature map" in skipped.skipped
    assert not (tmp_path / "rnn" / "explanations.png").exists()
    off = explain_predictions(cnn, predictions, tmp_path / "off", EvaluateParams(explain=False), 10**6)
    assert off.png_path is None and not (tmp_path / "off").exists()


def test_explain_files_writes_one_png_per_image_and_refuses_an_unreadable_one(tmp_path):
    paths, targets = _pngs(tmp_path / "a", 3)
    twin = tmp_path / "b" / Path(paths[0]).name  # same file name in another folder
    twin.parent.mkdir()
    twin.write_bytes(Path(paths[0]).read_bytes())
    cnn = _checkpoint(tmp_path / "cnn.ckpt", SPEC, trained_cnn())
    results = explain_files(cnn, [*paths, str(twin)], tmp_path / "out")
    assert [Path(r.png).name for r in results] == [
        "00.explain.png",
        "01.explain.png",
        "02.explain.png",
        "00-2.explain.png",
    ]
    assert all(Path(r.png).stat().st_size > 3000 for r in results)
    assert [r.predicted for r in results[:3]] == [CLASSES[t] for t in targets]
    assert all(0.34 < r.confidence <= 1 for r in results)
    # the confidence is calibrated by the run's temperature, as the server's: same answers, softer probabilities
    softer = explain_files(cnn, paths, tmp_path / "soft", temperature=4.0)
    assert [r.predicted for r in softer] == [r.predicted for r in results[:3]]
    assert all(s.confidence < r.confidence for s, r in zip(softer, results, strict=False))

    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ImageDecodeError, match="broken.png: not an image"):
        explain_files(cnn, [paths[0], str(broken)], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # every image is read before anything is written
