"""Ingest: list a data source, hash and probe every file, split deterministically, write the manifest.

The split is stratified by class and decided by content hashes and the seed only, so the same images
with the same seed get the same split wherever they live; identical files always share a split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel

from components.config import DataParams
from components.data import multilabel
from components.data.images import probe_image
from components.data.manifest import MANIFEST_COLUMNS, ManifestRow
from components.data.sources import SourceItem, archive_limits, resolve_source
from components.errors import DataError
from components.safety import file_sha256

SPLITS = ("train", "val", "test")


class QuarantinedFile(BaseModel):
    """A file left out of training, and why."""

    path: str
    label: str
    split: str
    reason: str


class DatasetSnapshot(BaseModel):
    """What ingest produced: the manifest and class list files and a content fingerprint.

    `quarantined` lists the files refused before they were opened (links out of the data set; they are
    not in the manifest) and `empty_classes` the class folders that hold no image.
    """

    source: str
    root: str
    manifest_path: str
    classes_path: str
    classes: list[str]
    fingerprint: str
    num_images: int
    split_counts: dict[str, int]
    class_counts: dict[str, int]
    extra_label_columns: list[str]
    task: str = "single"  # multilabel: label cells hold label sets, the classes are the labels (data/multilabel.py)
    quarantined: list[QuarantinedFile] = []
    empty_classes: list[str] = []


# --- manifest files -------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest CSV. Takes its path; returns one ManifestRow (column -> string value) per row."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_manifest(rows: list[ManifestRow], path: str | os.PathLike, columns: list[str] | None = None) -> None:
    """Write manifest rows as CSV (atomically: temp file, then rename).

    Takes the rows, the target path and optionally the columns to start with (default
    MANIFEST_COLUMNS); keys of the rows not among them follow in the order they first appear.
    Returns nothing.
    """
    columns = list(columns or MANIFEST_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in columns})
    os.replace(tmp, path)


# --- hashing and probing -------------------------------------------------------------------------


def _describe(item: SourceItem) -> tuple[str, int, int, str]:
    """(sha256, width, height, mode) of one file; an unreadable file gets "" / 0 / 0 / "" (validate reports it)."""
    try:
        sha = file_sha256(item.path)
    except OSError:
        sha = ""
    probed = probe_image(item.path)
    width, height, mode = probed if probed else (0, 0, "")
    return sha, width, height, mode


# --- the split ------------------------------------------------------------------------------------


def _holdout_counts(
    n: int, val_fraction: float, test_fraction: float, need_val: bool, need_test: bool
) -> tuple[int, int]:
    """How many of a class's n groups go to val and test: rounded fractions, at least 1 each while
    at least one group stays in train."""
    n_val = max(1, int(val_fraction * n + 0.5)) if need_val else 0
    n_test = max(1, int(test_fraction * n + 0.5)) if need_test else 0
    while n_val + n_test > n - 1 and (n_val > 1 or n_test > 1):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    if n_val + n_test > n - 1:  # fewer than 3 groups: train first, then test, then val
        n_test = min(n_test, max(n - 1, 0))
        n_val = min(n_val, max(n - 1 - n_test, 0))
    return n_val, n_test


def _carve(
    keys_by_item: list[str],
    labels: list[str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    need_val: bool,
    need_test: bool,
) -> list[str]:
    """Stratified, content-keyed split of items into train/val/test.

    Items with the same key (content hash) form one group and share a split; a group counts for the
    smallest label among its items. Groups of a class are ordered by sha256(f"{seed}:{key}").
    Returns one split name per item.
    """
    group_labels: dict[str, str] = {}
    for key, label in zip(keys_by_item, labels, strict=False):
        group_labels[key] = min(label, group_labels.get(key, label))
    groups_of_class: dict[str, list[str]] = defaultdict(list)
    for key, label in group_labels.items():
        groups_of_class[label].append(key)
    split_of_group: dict[str, str] = {}
    for keys in groups_of_class.values():
        keys.sort(key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
        n_val, n_test = _holdout_counts(len(keys), val_fraction, test_fraction, need_val, need_test)
        for i, key in enumerate(keys):
            split_of_group[key] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return [split_of_group[key] for key in keys_by_item]


def assign_splits(items: list[SourceItem], shas: list[str], params: DataParams) -> list[str]:
    """The split of every item: the source's own split where it gives one, carved otherwise.

    Takes the items, their sha256 values (same order) and the data params; returns split names.
    A source with split folders but without val (or test) gets it carved from train, stratified.
    Only readable items (those with a sha256) take part in a carve, so a broken file, which is quarantined
    anyway, never moves a good image to another split; it is given "train" (or its own split folder).
    Raises DataError when only some items carry a split.
    """
    given = [item.split for item in items]
    if any(split is not None for split in given):
        missing = [item.path for item in items if item.split is None]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(items)} images have no split while the others do (first: {missing[0]}); "
                "give every image a split or none"
            )
    splits = [split or "train" for split in given]
    present = set(given)
    need_val, need_test = "val" not in present, "test" not in present
    carve_idx = [i for i, split in enumerate(splits) if split == "train" and shas[i]]
    if (need_val or need_test) and carve_idx:
        carved = _carve(
            [shas[i] for i in carve_idx],
            [items[i].label for i in carve_idx],
            params.seed,
            params.val_fraction,
            params.test_fraction,
            need_val,
            need_test,
        )
        for i, split in zip(carve_idx, carved, strict=True):
            splits[i] = split
    return splits


# --- ingest ---------------------------------------------------------------------------------------


def _fingerprint(rows: list[ManifestRow], extra_columns: list[str]) -> str:
    """sha256 over the sorted (sha256, label, split, extra labels) rows: content-based, path-free."""
    lines = sorted(
        json.dumps([row["sha256"] or row["path"], row["label"], row["split"], *(row[c] for c in extra_columns)])
        for row in rows
    )
    digest = hashlib.sha256(json.dumps(extra_columns).encode())
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def ingest(params: DataParams, out_dir: Path, cache_dir: Path) -> DatasetSnapshot:
    """Build the snapshot of a data source.

    Takes the data params (source, split fractions, seed), the folder to write manifest.csv and
    classes.json into, and the cache folder for materialized/extracted data. Every listed file is kept
    (unidentifiable files get width 0, height 0, mode "" and are quarantined by validate), except links
    out of the data set, which are never opened and go to `snapshot.quarantined`.
    Returns a DatasetSnapshot; raises DataError when the source cannot be used.
    """
    out_dir = Path(out_dir)
    listing = resolve_source(params.path, Path(cache_dir), params.label_column, archive_limits(params), params.task)
    items, task = multilabel.apply_task(listing.items, listing.label_cells, params.task, params.empty_labels)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        described = list(pool.map(_describe, items))
    if task == "multilabel" and not listing.label_cells:  # a folder layout: copies in several class folders
        items, described = multilabel.merge_copies(items, described)
    shas = [d[0] for d in described]
    splits = assign_splits(items, shas, params)
    extra_columns: list[str] = []
    for item in items:
        extra_columns += [c for c in item.extra_labels if c not in extra_columns]
    rows = []
    for item, (sha, width, height, mode), split in zip(items, described, splits, strict=False):
        row: ManifestRow = {
            "path": item.path,
            "sha256": sha,
            "label": item.label,
            "split": split,
            "width": str(width),
            "height": str(height),
            "mode": mode,
        }
        row.update({c: item.extra_labels.get(c, "") for c in extra_columns})
        rows.append(row)
    classes = sorted({item.label for item in items})
    label_counts = Counter(item.label for item in items)
    if task == "multilabel":
        classes = multilabel.vocabulary([item.label for item in items])
        label_counts = Counter(label for item in items for label in multilabel.split_cell(item.label))
    manifest_path = out_dir / "manifest.csv"
    classes_path = out_dir / "classes.json"
    write_manifest(rows, manifest_path)
    classes_path.write_text(json.dumps(classes, indent=1) + "\n", encoding="utf-8")
    split_counter = Counter(splits)
    roots = {os.path.dirname(item.path) for item in items}
    return DatasetSnapshot(
        source=params.path,
        root=os.path.commonpath(sorted(roots)) if roots else "",
        manifest_path=str(manifest_path.resolve()),
        classes_path=str(classes_path.resolve()),
        classes=classes,
        fingerprint=_fingerprint(rows, extra_columns),
        num_images=len(rows),
        split_counts={split: split_counter.get(split, 0) for split in SPLITS},
        class_counts=dict(sorted(label_counts.items())),
        extra_label_columns=extra_columns,
        task=task,
        quarantined=[
            QuarantinedFile(path=q.path, label=q.label, split=q.split or "", reason=q.reason)
            for q in listing.quarantined
        ],
        empty_classes=listing.empty_classes,
    )
