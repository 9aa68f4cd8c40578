"""Why a model decided what it did: attribution maps overlaid on the images the model saw.

Convolutional networks get Grad-CAM (Selvaraju et al., 2017) on their last feature map larger than 1x1; the ViT
and the RNN get Integrated Gradients (Sundararajan et al., 2017: input gradients integrated along the path from
a baseline image, here the normalization's mean colour, to the image), both from Captum. Maps explain the
predicted class. `explain_predictions` draws the evaluation's grid (mistakes first, then a sample of correct
images); `explain_files` writes one PNG per image for `visionflow explain`.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from components.config import EvaluateParams
from components.data.augment import build_eval_transform
from components.data.images import load_image
from components.errors import VisionflowError
from components.evaluation.results import ExplainResult, Explanation
from components.image_grid import Cell, image_grid, overlay
from components.training.module import Classifier, load_classifier

ExplainMethod = Literal["auto", "gradcam", "integrated_gradients"]
# Sequence models: their only conv (the ViT's patch embedding) or none (the RNN) gives no useful class map.
GRADIENT_MODELS = ("vit", "rnn")
IG_STEPS = 16  # Gauss-Legendre nodes of the path integral (Captum's default rule; its default 50 costs 3x more)
METHOD_TITLES = {"gradcam": "Grad-CAM", "integrated_gradients": "Integrated Gradients"}


class UnsupportedModelError(VisionflowError):
    """The model has no layer the chosen explanation method can use."""


def feature_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The name of the last module (in execution order) that outputs a 4-D feature map larger than 1x1, found by
    running `example` once with forward hooks; None when no module does (e.g. a recurrent network)."""
    fired: list[str] = []

    def hook(name: str):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
                fired.append(name)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return fired[-1] if fired else None


def resolve_method(model_name: str, method: ExplainMethod) -> Literal["gradcam", "integrated_gradients"]:
    """`auto` → Integrated Gradients for the ViT and the RNN, Grad-CAM for every convolutional family; else
    `method`."""
    if method == "auto":
        return "integrated_gradients" if model_name in GRADIENT_MODELS else "gradcam"
    return method


def _normalized(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps scaled to [0, 1] per image (an all-zero map stays zero)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (maps / peak).clamp(0, 1)


def attribution_maps(
    model: nn.Module, model_name: str, images: torch.Tensor, targets: Sequence[int], method: ExplainMethod = "auto"
) -> tuple[torch.Tensor, str, str | None]:
    """Attribution maps of `targets` (class indices into the model's logits) for normalized (N, C, H, W) images.

    Returns ((N, H, W) maps in [0, 1] on the CPU, the method used, the Grad-CAM layer or None). Raises
    UnsupportedModelError when Grad-CAM is asked of a model without a spatial feature map.
    """
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    model = model.eval()
    images = images.detach().float().requires_grad_()
    target = torch.as_tensor(list(targets), dtype=torch.long)
    chosen = resolve_method(model_name, method)
    if chosen == "integrated_gradients":  # baseline 0 in normalized space: the mean colour
        attr = IntegratedGradients(model).attribute(images, target=target, n_steps=IG_STEPS, internal_batch_size=256)
        return _normalized(attr.detach().abs().sum(dim=1)), chosen, None
    layer = feature_layer(model, images[:1])
    if layer is None:
        raise UnsupportedModelError(f"{model_name} has no convolutional feature map for Grad-CAM")
    cam = LayerGradCam(model, model.get_submodule(layer)).attribute(images, target=target, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam.detach(), tuple(images.shape[-2:]), interpolate_mode="bilinear")
    return _normalized(cam[:, 0].clamp_min(0)), chosen, layer


def _load(classifier: Classifier, paths: Sequence[str], max_pixels: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The images as the model sees them (normalized (N, C, H, W)) and as shown (H x W x C uint8, same geometry).
    Raises ImageDecodeError naming a file that cannot be read."""
    model_view = build_eval_transform(classifier.augment)
    display_view = build_eval_transform(classifier.augment, normalize=False)
    tensors, shown = [], []
    for path in paths:
        pixels = load_image(path, classifier.spec.in_channels, max_pixels)
        tensors.append(model_view(image=pixels)["image"])
        shown.append(np.asarray(display_view(image=pixels)["image"]))
    return torch.stack(tensors), shown


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: Agg on savefig, no global state (safe in task threads)

    return Figure(figsize=(width, height), layout="constrained")


def _overlay(ax, image: np.ndarray, heat: np.ndarray | None) -> None:
    """The image (H x W x C uint8) with the [0, 1] map over it (none: the plain image)."""
    ax.imshow(overlay(image, heat), interpolation="nearest")
    ax.axis("off")


def _describe(model: nn.Module, method: str, layer: str | None) -> str:
    """ "Grad-CAM on layer4 (Sequential)" or the method's name alone."""
    if not layer:
        return METHOD_TITLES[method]
    return f"{METHOD_TITLES[method]} on layer {layer} ({type(model.get_submodule(layer)).__name__})"


def _class_scores(
    classifier: Classifier, images: torch.Tensor, temperature: float = 1.0
) -> tuple[list[int], list[float]]:
    """Predicted class and its probability for each image: softmax of logits / temperature over the classes (the
    primary task's of a multi-task model); for a multi-label model the most probable label and its sigmoid."""
    with torch.inference_mode():
        logits = classifier.model(images)[:, : len(classifier.classes)].float()
        if classifier.task == "multilabel":
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits / temperature, dim=1)
    confidence, predicted = probs.max(dim=1)
    return predicted.tolist(), confidence.tolist()


def explain_files(
    checkpoint: str,
    paths: Sequence[str],
    out_dir: Path,
    method: ExplainMethod = "auto",
    max_pixels: int = 40_000_000,
    temperature: float = 1.0,
) -> list[Explanation]:
    """Explain a checkpoint's prediction on each image file: one PNG per image in `out_dir` (`<stem>.explain.png`,
    `<stem>-2.explain.png` on a name clash): the image and its overlay, titled with the predicted class, its
    confidence (calibrated by `temperature`, the one the run's evaluation fitted) and the method. Every image is
    read before anything is written. Raises CheckpointError, ImageDecodeError (one line naming the file) or
    UnsupportedModelError."""
    classifier = load_classifier(checkpoint)
    images, shown = _load(classifier, paths, max_pixels)
    predicted, confidence = _class_scores(classifier, images, temperature)
    maps, chosen, layer = attribution_maps(classifier.model, classifier.spec.name, images, predicted, method)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, used = [], set()
    for i, path in enumerate(paths):
        stem, n = Path(path).stem, 1
        while (name := f"{stem}{'' if n == 1 else f'-{n}'}.explain.png") in used:
            n += 1
        used.add(name)
        label = classifier.classes[predicted[i]]
        fig = _figure(5.0, 2.8)
        left, right = fig.subplots(1, 2)
        _overlay(left, shown[i], None)
        _overlay(right, shown[i], maps[i].numpy())
        fig.suptitle(
            f"predicted {label} ({confidence[i]:.2f})\n{_describe(classifier.model, chosen, layer)}", fontsize=9
        )
        fig.savefig(out_dir / name, format="png", dpi=110)
        results.append(Explanation(path=str(path), predicted=label, confidence=confidence[i], png=str(out_dir / name)))
    return results


def explainable_rows(rows: list[dict[str, str]], classes: list[str]) -> list[dict]:
    """predictions.csv rows as {path, target, predicted, confidence, correct}: single-label rows (path, target,
    predicted, confidence) as they are; multi-label rows (path, target and predicted as labels joined by ';',
    p_<label> columns) by their most probable label, correct when the image carries it. Rows naming classes the
    model does not have are left out."""
    known, out = set(classes), []
    for row in rows:
        if row.get("confidence") and row.get("target") in known and row.get("predicted") in known:
            confidence, predicted, correct = (
                float(row["confidence"]),
                row["predicted"],
                row["target"] == row["predicted"],
            )
        elif all(f"p_{c}" in row for c in classes):
            confidence, predicted = max((float(row[f"p_{c}"]), c) for c in classes)
            correct = predicted in (row.get("target") or "").split(";")
        else:
            continue
        out.append(
            {
                "path": row["path"],
                "target": row.get("target") or "-",
                "predicted": predicted,
                "confidence": confidence,
                "correct": correct,
            }
        )
    return out


def pick_rows(rows: list[dict], limit: int, seed: int = 0) -> list[dict]:
    """Up to `limit` of explainable_rows' rows to explain: the most confident mistakes first (at most three
    quarters of the places while correct rows remain), then a seeded random sample of correct rows."""
    wrong = sorted((r for r in rows if not r["correct"]), key=lambda r: -r["confidence"])
    right = [r for r in rows if r["correct"]]
    keep_wrong = min(len(wrong), max(limit - min(len(right), limit // 4), 0))
    sample = random.Random(seed).sample(right, min(len(right), limit - keep_wrong))
    return wrong[:keep_wrong] + sample


def _grid(rows: list[dict], shown: list[np.ndarray], maps: torch.Tensor, title: str, path: Path) -> Path:
    """The overlays in a square grid, each captioned "true → predicted (probability)", mistakes in red."""
    cells = [
        Cell(
            overlay(image, heat.numpy()),
            f"{row['target']} → {row['predicted']} ({row['confidence']:.2f})",
            "black" if row["correct"] else "tab:red",
        )
        for row, image, heat in zip(rows, shown, maps, strict=False)
    ]
    return image_grid(cells, path, f"{title} (true → predicted; mistakes in red)")


def explain_predictions(
    checkpoint: str, predictions_csv: str | Path, out_dir: Path, params: EvaluateParams, max_pixels: int
) -> ExplainResult:
    """The evaluation's explanation grid `explanations.png` in `out_dir`, from the rows of its predictions.csv
    (see explainable_rows). Never raises for the model: an architecture the method cannot explain, or rows whose
    classes the model does not have, give a result with `skipped` saying why."""
    if not params.explain:
        return ExplainResult(skipped="evaluate.explain is off")
    classifier = load_classifier(checkpoint)
    with Path(predictions_csv).open(newline="") as f:
        rows = explainable_rows(list(csv.DictReader(f)), classifier.classes)
    chosen = pick_rows(rows, params.explain_images)
    if not chosen:
        return ExplainResult(skipped=f"no predictions of the model's classes in {predictions_csv}")
    images, shown = _load(classifier, [r["path"] for r in chosen], max_pixels)
    index = {name: i for i, name in enumerate(classifier.classes)}
    try:
        maps, method, layer = attribution_maps(
            classifier.model,
            classifier.spec.name,
            images,
            [index[r["predicted"]] for r in chosen],
            params.explain_method,
        )
    except UnsupportedModelError as err:
        return ExplainResult(skipped=str(err))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    what = "the most probable label" if classifier.task == "multilabel" else "the predicted class"
    title = f"{_describe(classifier.model, method, layer)} of {what}"
    png = _grid(chosen, shown, maps, title, Path(out_dir) / "explanations.png")
    explained = [
        Explanation(path=r["path"], target=r["target"], predicted=r["predicted"], confidence=r["confidence"])
        for r in chosen
    ]
    return ExplainResult(png_path=str(png), method=method, layer=layer, images=explained)
