"""Multi-label data: several labels per image, written `cat;outdoor` in a manifest's label cell.

The manifest keeps one label cell per image: the image's labels, sorted and joined by SEPARATOR ("" for an
image where none of the labels is present, kept only with data.empty_labels: negative). The classes of a
multi-label data set are its labels (one sigmoid output each). This module is the one place that reads and
writes that cell, checks the label sets of the splits and turns rows into multi-hot targets.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from components.data.manifest import ManifestRow
from components.errors import DataError

SEPARATOR = ";"
SPLITS = ("train", "val", "test")


def has_separator(cell: str) -> bool:
    """True when a label cell holds the multi-label separator."""
    return SEPARATOR in cell


def resolve_task(task: str, cells: list[str]) -> str:
    """The task in force: an explicit "single"/"multilabel" wins; "auto" is multilabel when any cell holds
    SEPARATOR, single otherwise."""
    if task != "auto":
        return task
    return "multilabel" if any(has_separator(cell) for cell in cells) else "single"


def parse_cell(cell: str, where: str, empty_labels: str = "negative") -> str:
    """The canonical label cell of one multi-label row: its labels stripped, de-duplicated, sorted and joined.

    Takes the raw cell, where it comes from (for the message) and data.empty_labels. Raises DataError (one
    line) for an empty label name between separators ("cat;;dog", "cat;") and, with empty_labels "refuse",
    for an empty cell."""
    if not cell.strip():
        if empty_labels == "refuse":
            raise DataError(
                f"{where}: empty label set (data.empty_labels is refuse; set it to negative to train such rows as "
                "images where none of the labels is present)"
            )
        return ""
    parts = [part.strip() for part in cell.split(SEPARATOR)]
    if not all(parts):
        raise DataError(f"{where}: empty label name in {cell!r} (labels are separated by {SEPARATOR!r})")
    return join_labels(parts)


def check_label_name(name: str, where: str) -> str:
    """A label taken as a name (a class folder): refused (DataError, one line) when it holds the separator."""
    if has_separator(name):
        raise DataError(f"{where}: label name {name!r} contains the multi-label separator {SEPARATOR!r}; rename it")
    return name


def split_cell(cell: str) -> list[str]:
    """The labels of a canonical label cell ([] for "")."""
    return cell.split(SEPARATOR) if cell else []


def join_labels(labels: list[str]) -> str:
    """The canonical cell of a label set: sorted, unique, joined by SEPARATOR."""
    return SEPARATOR.join(sorted(set(labels)))


def vocabulary(cells: list[str]) -> list[str]:
    """Every label named in the cells, sorted."""
    return sorted({label for cell in cells for label in split_cell(cell)})


def label_counts(rows: list[ManifestRow], labels: list[str]) -> dict[str, dict[str, int]]:
    """{split: {label: images carrying it}} over manifest rows (every label listed in every split, 0 when absent;
    splits other than train/val/test follow)."""
    splits = list(SPLITS) + sorted({row["split"] for row in rows} - set(SPLITS))
    counts = {split: dict.fromkeys(labels, 0) for split in splits}
    for row in rows:
        for label in split_cell(row["label"]):
            counts[row["split"]][label] = counts[row["split"]].get(label, 0) + 1
    return counts


def split_problems(counts: dict[str, dict[str, int]], labels: list[str], source: str) -> tuple[str | None, list[str]]:
    """(refusal, warnings) of a multi-label data set's label counts per split.

    A label that never occurs in train cannot be learnt: the refusal (one line) names it. A label absent from
    val or test is a warning (its threshold cannot be tuned there or its test figures are empty).
    """
    if len(labels) < 2:
        found = ", ".join(labels) or "none"
        return f"need at least 2 labels with valid images, found {len(labels)} ({found}) in {source}", []
    refusal, warnings = None, []
    for label in labels:
        per_split = ", ".join(f"{s} {counts.get(s, {}).get(label, 0)}" for s in SPLITS)
        missing = [s for s in SPLITS if counts.get(s, {}).get(label, 0) == 0]
        if "train" in missing and refusal is None:
            refusal = f"label {label!r} never occurs in the train split ({per_split}): it cannot be learnt"
        elif missing and "train" not in missing:
            warnings.append(f"label {label!r} occurs in no {'/'.join(missing)} image ({per_split})")
    return refusal, warnings


def multi_hot(rows: list[ManifestRow], labels: list[str]) -> np.ndarray:
    """(N, L) float32 0/1 targets of manifest rows. Raises DataError naming a label the list does not hold."""
    index = {name: i for i, name in enumerate(labels)}
    targets = np.zeros((len(rows), len(labels)), dtype=np.float32)
    for r, row in enumerate(rows):
        for label in split_cell(row["label"]):
            if label not in index:
                raise DataError(f"label {label!r} of {row['path']} is not one the model knows ({', '.join(labels)})")
            targets[r, index[label]] = 1.0
    return targets


def positive_weights(rows: list[ManifestRow], labels: list[str]) -> list[float]:
    """BCE pos_weight per label from the train split: negatives / positives (1.0 for a label without positives)."""
    train = [row for row in rows if row["split"] == "train"]
    positives = Counter(label for row in train for label in split_cell(row["label"]))
    return [(len(train) - positives[name]) / positives[name] if positives[name] else 1.0 for name in labels]


def apply_task(items: list, label_cells: bool, task: str, empty_labels: str) -> tuple[list, str]:
    """The source's items with canonical label cells, and the task in force (see resolve_task).

    Takes the SourceItems, whether their labels are manifest cells (a CSV, the demo) or names (class folders),
    data.task and data.empty_labels. "auto" reads cells only (a folder source is single-label). For single, an
    empty cell is refused as before; for multilabel each cell is parsed (parse_cell) and a folder name holding
    the separator is refused. Raises DataError (one line)."""
    resolved = resolve_task(task, [item.label for item in items]) if label_cells else task.replace("auto", "single")
    if resolved == "single":
        empty = next((item for item in items if not item.label), None)
        if empty is not None:
            raise DataError(f"empty label for {empty.path} (a single-label data set needs one label per image)")
        return items, resolved
    if label_cells:
        fixed = [item.model_copy(update={"label": parse_cell(item.label, item.path, empty_labels)}) for item in items]
    else:
        fixed = [item for item in items if check_label_name(item.label, f"class folder of {item.path}")]
    return fixed, resolved


def merge_copies(items: list, described: list[tuple]) -> tuple[list, list[tuple]]:
    """The folder layout of multi-label data: an image whose identical copies (same sha256) sit in several class
    folders (cat/001.png and outdoor/001.png) is one image carrying all those labels. Takes the SourceItems and
    their (sha256, width, height, mode); returns both with each content once (its first path, the labels joined),
    in the items' order. Unreadable files (no sha256) stay as they are."""
    first: dict[str, int] = {}
    labels: dict[str, list[str]] = {}
    kept_items, kept_described = [], []
    for item, facts in zip(items, described, strict=True):
        sha = facts[0]
        if sha and sha in first:
            labels[sha].append(item.label)
            continue
        if sha:
            first[sha], labels[sha] = len(kept_items), [item.label]
        kept_items.append(item)
        kept_described.append(facts)
    for sha, index in first.items():
        kept_items[index] = kept_items[index].model_copy(update={"label": join_labels(labels[sha])})
    return kept_items, kept_described
