"""The run diff: two models scored on the same rows, and what changed between them.

`score_model` runs one model (a bundle through onnxruntime with its own preprocessing and temperature, or a
checkpoint through PyTorch with its evaluation's temperature) over manifest rows and returns its
probabilities; `write_diff` compares two such answers on the same rows and writes per-class metric deltas,
the difference of the confusion matrices as a heat map, the images whose prediction changed (fixed and
broken) as grids with both answers, both reliability curves side by side and a markdown summary.

What "right", "the answer" and the per-class metrics mean depends on the task: `TASK_DIFFS` maps a
`data.task` value to its TaskDiff (single-label here; another task plugs in its own entry).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.data.manifest import ManifestRow
from components.errors import DataError, VisionflowError
from components.evaluation.calibration import reliability_bins, write_reliability_png
from components.evaluation.metrics import compute_metrics
from components.evaluation.results import DiffResult, ModelSource

CHANGE_KINDS = ("fixed", "broken", "changed")  # wrong → right, right → wrong, wrong → another wrong answer
SCORE_BATCH = 64


@dataclass
class Answers:
    """One model's answers on the rows: its probabilities (N, C) in the diff's class order and, for a multi-label
    model, its per-label thresholds (C,)."""

    probs: np.ndarray
    thresholds: np.ndarray | None = None


@dataclass(frozen=True)
class TaskDiff:
    """How one task reads rows and answers: the rows' targets, compute_metrics-like metrics (summary, per_class,
    confusion_matrix or None), whether each answer is right, the answer as text with its confidence, the true
    answer as text, the (confidence, outcome) pairs of its reliability curve and the headline metrics."""

    targets: Callable[[list[ManifestRow], list[str]], np.ndarray]
    metrics: Callable[[Answers, np.ndarray, list[str]], dict[str, Any]]
    correct: Callable[[Answers, np.ndarray], np.ndarray]
    answer: Callable[[Answers, list[str]], list[tuple[str, float]]]
    target_text: Callable[[np.ndarray, list[str]], list[str]]
    reliability: Callable[[Answers, np.ndarray], tuple[np.ndarray, np.ndarray]]
    headline: tuple[str, ...]


def targets_of(rows: list[ManifestRow], classes: list[str]) -> np.ndarray:
    """The rows' class indices in `classes`; DataError naming labels the models do not know."""
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise DataError(f"the rows have labels the models do not know: {', '.join(unknown[:10])}")
    index = {name: i for i, name in enumerate(classes)}
    return np.asarray([index[r["label"]] for r in rows], dtype=np.int64)


def _single_metrics(answers: Answers, targets: np.ndarray, classes: list[str]) -> dict[str, Any]:
    logits = torch.from_numpy(np.log(np.clip(answers.probs, 1e-12, 1.0))).float()  # softmax(log p) = p
    return compute_metrics(logits, torch.from_numpy(targets).long(), classes, top_k=1)


SINGLE_LABEL = TaskDiff(
    targets=targets_of,
    metrics=_single_metrics,
    correct=lambda answers, targets: answers.probs.argmax(axis=1) == targets,
    answer=lambda answers, classes: [
        (classes[int(i)], float(p[i])) for p, i in zip(answers.probs, answers.probs.argmax(axis=1), strict=True)
    ],
    target_text=lambda targets, classes: [classes[int(t)] for t in targets],
    reliability=lambda answers, targets: (answers.probs.max(axis=1), answers.probs.argmax(axis=1) == targets),
    headline=("accuracy", "macro_f1", "ece"),
)


def _multilabel_targets(rows: list[ManifestRow], classes: list[str]) -> np.ndarray:
    """0/1 targets (N, C) from label cells like "cat;outdoor" ("" = none of the labels)."""
    index = {name: i for i, name in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), dtype=np.int64)
    for n, row in enumerate(rows):
        for name in filter(None, (part.strip() for part in row["label"].split(";"))):
            if name not in index:
                raise DataError(f"the rows have labels the models do not know: {name}")
            targets[n, index[name]] = 1
    return targets


def _multilabel_metrics(answers: Answers, targets: np.ndarray, classes: list[str]) -> dict[str, Any]:
    from components.evaluation.multilabel import compute_multilabel_metrics

    p = np.clip(answers.probs, 1e-7, 1 - 1e-7)
    logits = torch.from_numpy(np.log(p / (1 - p))).float()  # sigmoid(logit p) = p
    thresholds = [float(t) for t in answers.thresholds] if answers.thresholds is not None else [0.5] * len(classes)
    return {
        **compute_multilabel_metrics(logits, torch.from_numpy(targets), classes, thresholds),
        "confusion_matrix": None,
    }


def _multilabel_hits(answers: Answers) -> np.ndarray:
    return answers.probs >= (answers.thresholds if answers.thresholds is not None else 0.5)


def _multilabel_answer(answers: Answers, classes: list[str]) -> list[tuple[str, float]]:
    """The labels over their thresholds joined by ';' ("none" when no label passes) and their mean probability
    (the highest probability when none passes)."""
    out = []
    for probs, hits in zip(answers.probs, _multilabel_hits(answers), strict=True):
        chosen = [i for i in range(len(classes)) if hits[i]]
        text = ";".join(classes[i] for i in chosen) or "none"
        out.append((text, float(probs[chosen].mean()) if chosen else float(probs.max())))
    return out


MULTILABEL = TaskDiff(
    targets=_multilabel_targets,
    metrics=_multilabel_metrics,
    correct=lambda answers, targets: (_multilabel_hits(answers) == targets.astype(bool)).all(axis=1),
    answer=_multilabel_answer,
    target_text=lambda targets, classes: [
        ";".join(c for c, t in zip(classes, row, strict=True) if t) or "none" for row in targets
    ],
    reliability=lambda answers, targets: (answers.probs.ravel(), targets.ravel()),  # per label: p against how often
    headline=("map", "macro_f1", "accuracy"),
)
TASK_DIFFS: dict[str, TaskDiff] = {"single": SINGLE_LABEL, "multilabel": MULTILABEL}


def task_diff(task: str) -> TaskDiff:
    """The TaskDiff of a `data.task` value; raises VisionflowError for a task the diff cannot read yet."""
    if task not in TASK_DIFFS:
        raise VisionflowError(f"diff does not support data.task {task} models yet (supported: {', '.join(TASK_DIFFS)})")
    return TASK_DIFFS[task]


# --- scoring ------------------------------------------------------------------------------------


def model_labels(source: ModelSource) -> list[str]:
    """The class names of a model in its output order (bundle labels.json, or the checkpoint's classes)."""
    if source.kind == "bundle":
        from components.bundle_format import LABELS_FILE, check_labels

        return check_labels(json.loads((Path(source.path) / LABELS_FILE).read_text()))
    from components.training.module import load_classifier

    return list(load_classifier(source.path).classes)


def score_model(
    source: ModelSource, rows: list[ManifestRow], max_pixels: int
) -> tuple[np.ndarray, list[str], dict[str, float] | None]:
    """The model's probabilities (N, C) on `rows` in its own label order, those labels, and a multi-label model's
    thresholds (None otherwise). A bundle runs through its Predictor (preprocess.json, onnxruntime, calibration
    or thresholds); a checkpoint through its own eval transform with `source.temperature` (softmax) or
    `source.thresholds` (sigmoid). Raises a VisionflowError (one line) for a model or image that cannot be read."""
    if source.kind == "bundle":
        from components.data.images import load_image
        from components.serving.predictor import Predictor

        predictor = Predictor(Path(source.path), max_pixels=max_pixels)
        parts = []
        for start in range(0, len(rows), SCORE_BATCH):
            images = [load_image(r["path"], predictor.channels, max_pixels) for r in rows[start : start + SCORE_BATCH]]
            parts.append(predictor.probabilities(np.stack([predictor.preprocess_image(i) for i in images])))
        return np.concatenate(parts), list(predictor.labels), getattr(predictor, "thresholds", None)
    from components.data.augment import build_eval_transform
    from components.data.dataset import eval_loader
    from components.evaluation.predict import predict
    from components.training.module import load_classifier

    classifier = load_classifier(source.path)
    plain = [{**r, "label": classifier.classes[0]} for r in rows]  # targets come from the rows, not the loader
    loader = eval_loader(
        plain, classifier.classes, build_eval_transform(classifier.augment), classifier.spec.in_channels, max_pixels
    )
    logits, _ = predict(classifier.model, loader)
    logits = logits[:, : len(classifier.classes)]  # a multi-task model's primary task comes first
    if source.task == "multilabel":
        return torch.sigmoid(logits).numpy(), list(classifier.classes), source.thresholds
    return torch.softmax(logits / source.temperature, dim=1).numpy(), list(classifier.classes), None


def answers_in(order: list[str], probs: np.ndarray, labels: list[str], thresholds: dict[str, float] | None) -> Answers:
    """A model's Answers with its columns (and thresholds) put in `order` (the same label set in another order)."""
    kept = probs[:, [labels.index(name) for name in order]]
    return Answers(kept, np.asarray([thresholds[name] for name in order]) if thresholds else None)


def label_set_problem(labels_a: list[str], labels_b: list[str]) -> str | None:
    """Why two models' answers cannot be compared (different label sets), or None."""
    if set(labels_a) == set(labels_b):
        return None
    only_a, only_b = sorted(set(labels_a) - set(labels_b)), sorted(set(labels_b) - set(labels_a))
    shown = lambda names: ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "") or "none"  # noqa: E731
    return f"the label sets differ (only A has: {shown(only_a)}; only B has: {shown(only_b)})"


# --- figures ------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def write_confusion_diff_png(a: list[list[int]], b: list[list[int]], classes: list[str], path: Path) -> Path:
    """The confusion matrix of B minus A's (rows true, columns predicted) as a heat map: green where B is better
    (more on the diagonal, fewer off it), red where it is worse; each cell says its signed count change."""
    delta = np.asarray(b, dtype=np.int64) - np.asarray(a, dtype=np.int64)
    better = np.where(np.eye(len(classes), dtype=bool), delta, -delta)
    n = len(classes)
    side = min(max(4.5, 0.38 * n + 2.5), 24.0)
    font = max(6.0, min(10.0, 350.0 / n))
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    limit = max(1, int(np.abs(delta).max()))
    image = ax.imshow(better, cmap="RdYlGn", vmin=-limit, vmax=limit, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="better for B (count)")
    ax.set_xticks(range(n), labels=classes, fontsize=font, rotation=45 if n <= 8 else 90, ha="right")
    ax.set_yticks(range(n), labels=classes, fontsize=font)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix: B − A")
    for i in range(n):
        for j in range(n):
            if delta[i, j]:
                ax.text(j, i, f"{int(delta[i, j]):+d}", ha="center", va="center", fontsize=font)
    fig.savefig(path, format="png", dpi=110)
    return Path(path)


def _display(path: str) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError):
        return None


def write_change_grid(changes: list[dict[str, Any]], title: str, path: Path, limit: int) -> Path | None:
    """Up to `limit` changed images in a grid, each titled with the true answer and both models' answers and
    confidences; None when there is nothing to draw."""
    changes = changes[:limit]
    if not changes:
        return None
    columns = max(1, math.ceil(math.sqrt(len(changes))))
    rows = math.ceil(len(changes) / columns)
    fig = _figure(2.3 * columns, 2.5 * rows + 0.4)
    fig.suptitle(title, fontsize=10)
    for ax, change in zip(fig.subplots(rows, columns, squeeze=False).flat, [*changes, *[None] * columns], strict=False):
        ax.axis("off")
        if change is None:
            continue
        image = _display(change["path"])
        if image is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(
            f"true {change['target']}\nA {change['answer_a']} ({change['confidence_a']:.2f})\n"
            f"B {change['answer_b']} ({change['confidence_b']:.2f})",
            fontsize=7,
        )
    fig.savefig(path, format="png", dpi=100)
    return Path(path)


# --- the diff -----------------------------------------------------------------------------------


def changed_images(
    a: Answers, b: Answers, targets: np.ndarray, classes: list[str], paths: list[str], task: TaskDiff
) -> list[dict[str, Any]]:
    """The images whose answer changed, each with its kind (fixed, broken, changed), the true answer and both
    answers with their confidences: fixed and broken first, the most confident new answer first within each."""
    answers_a, answers_b = task.answer(a, classes), task.answer(b, classes)
    right_a, right_b = task.correct(a, targets), task.correct(b, targets)
    truth = task.target_text(targets, classes)
    changes = []
    for i, path in enumerate(paths):
        if answers_a[i][0] == answers_b[i][0]:
            continue
        kind = "fixed" if right_b[i] and not right_a[i] else "broken" if right_a[i] and not right_b[i] else "changed"
        changes.append(
            {
                "path": path,
                "kind": kind,
                "target": truth[i],
                "answer_a": answers_a[i][0],
                "confidence_a": answers_a[i][1],
                "answer_b": answers_b[i][0],
                "confidence_b": answers_b[i][1],
            }
        )
    return sorted(changes, key=lambda c: (CHANGE_KINDS.index(c["kind"]), -c["confidence_b"]))


def _per_class_rows(metrics_a: dict, metrics_b: dict) -> list[dict[str, Any]]:
    """One row per class: support and every per-class metric of A, B and B − A."""
    rows = []
    for a, b in zip(metrics_a["per_class"], metrics_b["per_class"], strict=True):
        row: dict[str, Any] = {"class": a["class"], "support": a.get("support", "")}
        for key in [k for k in a if k not in ("class", "support")]:
            row[f"{key}_a"], row[f"{key}_b"], row[f"{key}_delta"] = a[key], b[key], b[key] - a[key]
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return path


def summary_markdown(result: DiffResult, per_class: list[dict[str, Any]], headline: tuple[str, ...]) -> str:
    """The diff's short markdown summary: headline metrics of A and B, the change counts, the classes that
    moved most, and the files."""
    lines = [
        f"## Run diff: A `{result.run_a}` → B `{result.run_b}`",
        "",
        f"{result.num_images} images ({result.source}), {result.task} task.",
        "",
        "| metric | A | B | B − A |",
        "|---|---|---|---|",
    ]
    for name in headline:
        a, b = result.summary_a.get(name), result.summary_b.get(name)
        if a is not None and b is not None:
            lines.append(f"| {name} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    counts = result.counts
    lines += [
        "",
        f"**{counts['fixed']} fixed** (A wrong, B right) · **{counts['broken']} broken** (A right, B wrong) · "
        f"{counts['changed']} changed between two wrong answers.",
    ]
    delta_key = next((k for k in ("f1_delta", "ap_delta") if per_class and k in per_class[0]), None)
    if delta_key:
        moved = sorted(per_class, key=lambda r: -abs(r[delta_key]))[:8]
        keys = [k for k in per_class[0] if k.endswith("_delta")]
        lines += ["", "| class | support | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        lines += [
            f"| {r['class']} | {r['support']} | " + " | ".join(f"{r[k]:+.4f}" for k in keys) + " |" for r in moved
        ]
    lines += ["", "Files: " + ", ".join(f"`{name}`" for name in result.files), ""]
    return "\n".join(lines)


def write_diff(
    a: Answers,
    b: Answers,
    targets: np.ndarray,
    classes: list[str],
    paths: list[str],
    out_dir: Path,
    names: tuple[str, str],
    source: str,
    task: str = "single",
    grid_limit: int = 25,
    bins: int = 15,
) -> DiffResult:
    """Compare two models' answers (probabilities (N, C) with columns in `classes` order) on the same N images
    and their targets (the task's TaskDiff.targets of the rows).

    Writes into `out_dir`: per_class_deltas.csv, confusion_diff.png (tasks with a confusion matrix),
    changed.csv, fixed.png and broken.png (up to `grid_limit` images each, when there are any), reliability.png
    (A and B side by side), summary.md and diff.json. `names` are the two run ids, `source` says where the rows
    came from. Returns the DiffResult.
    """
    rule = task_diff(task)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_a, metrics_b = rule.metrics(a, targets, classes), rule.metrics(b, targets, classes)
    per_class = _per_class_rows(metrics_a, metrics_b)
    files = {"per_class_deltas.csv": _write_csv(out_dir / "per_class_deltas.csv", per_class, list(per_class[0]))}
    if metrics_a.get("confusion_matrix") is not None:
        files["confusion_diff.png"] = write_confusion_diff_png(
            metrics_a["confusion_matrix"], metrics_b["confusion_matrix"], classes, out_dir / "confusion_diff.png"
        )
    changes = changed_images(a, b, targets, classes, paths, rule)
    fields = ["path", "kind", "target", "answer_a", "confidence_a", "answer_b", "confidence_b"]
    files["changed.csv"] = _write_csv(out_dir / "changed.csv", changes, fields)
    for kind, title in (("fixed", "fixed: A wrong, B right"), ("broken", "broken: A right, B wrong")):
        grid = write_change_grid([c for c in changes if c["kind"] == kind], title, out_dir / f"{kind}.png", grid_limit)
        if grid:
            files[f"{kind}.png"] = grid
    panels = []
    for side, name, metrics, answers in (("A", names[0], metrics_a, a), ("B", names[1], metrics_b, b)):
        curve = reliability_bins(*rule.reliability(answers, targets), bins)
        ece = f" (ECE {metrics['summary']['ece']:.3f})" if "ece" in metrics["summary"] else ""
        panels.append((f"{side} {name[:8]}{ece}", [(side, curve)]))
    files["reliability.png"] = write_reliability_png(panels, out_dir / "reliability.png")
    result = DiffResult(
        run_a=names[0],
        run_b=names[1],
        task=task,
        num_images=len(paths),
        source=source,
        summary_a={k: float(v) for k, v in metrics_a["summary"].items()},
        summary_b={k: float(v) for k, v in metrics_b["summary"].items()},
        counts={kind: sum(c["kind"] == kind for c in changes) for kind in CHANGE_KINDS},
        files={},
        markdown="",
    )
    files["summary.md"] = out_dir / "summary.md"
    files["diff.json"] = out_dir / "diff.json"
    result.files = {name: str(path) for name, path in files.items()}
    result.markdown = summary_markdown(result, per_class, rule.headline)
    (out_dir / "summary.md").write_text(result.markdown)
    (out_dir / "diff.json").write_text(result.model_dump_json(indent=2))
    return result


def diff_models(
    a: ModelSource, b: ModelSource, rows: list[ManifestRow], out_dir: Path, source: str, max_pixels: int, grid: int = 25
) -> DiffResult | None:
    """Score models `a` (before) and `b` (after) on `rows` and write their diff into `out_dir` (write_diff, at most
    `grid` images a grid; `source` says where the rows came from). None when the diff does not read their task
    (`a.task`). Raises VisionflowError (one line) for label sets that differ or a model or image that cannot be
    read."""
    if a.task not in TASK_DIFFS:
        return None
    probs_a, labels, thresholds_a = score_model(a, rows, max_pixels)
    probs_b, labels_b, thresholds_b = score_model(b, rows, max_pixels)
    problem = label_set_problem(labels, labels_b)
    if problem:
        raise VisionflowError(f"cannot diff {a.run_id} and {b.run_id}: {problem}")
    return write_diff(
        answers_in(labels, probs_a, labels, thresholds_a),
        answers_in(labels, probs_b, labels_b, thresholds_b),
        task_diff(a.task).targets(rows, labels),
        labels,
        [r["path"] for r in rows],
        Path(out_dir),
        (a.run_id, b.run_id),
        source,
        a.task,
        grid,
    )
