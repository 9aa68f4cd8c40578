"""Validate: decode every image once, quarantine the bad ones (a list, never a move), report the data set.

Quarantined: files that do not decode, links out of the data set (refused by ingest before opening),
and, unless data.label_conflicts=keep, every copy of a content found under more than one label.
Exact duplicates with one label are kept and reported. Empty class folders are reported and warned of.

Writes manifest.clean.csv (the usable rows), quarantine.csv and validation.json into the output folder,
then refuses a data set that cannot be trained on (one clear DataError line).
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel

from components.config import DataParams
from components.data import multilabel
from components.data.images import load_image
from components.data.ingest import SPLITS, DatasetSnapshot, QuarantinedFile, read_manifest, write_manifest
from components.data.manifest import ManifestRow
from components.errors import DataError, ImageDecodeError

__all__ = ["QuarantinedFile", "ValidationReport", "format_report", "validate"]


class ValidationReport(BaseModel):
    """The validation result: what was checked, what was quarantined, and the shape of the clean data."""

    num_checked: int
    num_valid: int
    quarantined: list[QuarantinedFile]
    class_counts: dict[str, dict[str, int]]
    duplicate_groups: list[list[str]]
    label_conflicts: list[list[str]] = []  # groups of paths holding the same content under different labels
    empty_classes: list[str] = []  # class folders without any image (dropped)
    warnings: list[str] = []  # lines for the run log
    leakage: list[str]
    size_histogram: dict[str, int]
    mode_histogram: dict[str, int]
    imbalance_ratio: float
    split_counts: dict[str, int] = {}  # valid images per split (a multi-label image counts once, not per label)
    clean_manifest_path: str
    quarantine_path: str
    report_path: str


def _check(row: ManifestRow, channels: int, max_pixels: int) -> str | None:
    """None when the row's image decodes, else the quarantine reason."""
    try:
        load_image(row["path"], channels, max_pixels)
    except ImageDecodeError as err:
        return err.reason
    except MemoryError:
        return "out of memory while decoding"
    return None


def conflict_reason(labels: set[str]) -> str:
    """The quarantine reason of one image found under several labels: "same image labelled a, b and c"."""
    names = sorted(labels)
    return f"same image labelled {', '.join(names[:-1])} and {names[-1]}"


def _label_conflicts(
    rows: list[ManifestRow], reasons: list[str | None], policy: str
) -> tuple[list[str | None], list[list[str]]]:
    """Find the contents that decode under more than one label.

    Takes the manifest rows, their decode results (None = decodes) and data.label_conflicts. Returns the
    reasons with every conflicting copy quarantined (policy "quarantine"; unchanged for "keep") and the
    conflict groups (sorted paths of each content).
    """
    labels: dict[str, set[str]] = defaultdict(set)
    paths: dict[str, list[str]] = defaultdict(list)
    for row, reason in zip(rows, reasons, strict=True):
        if reason is None and row["sha256"]:
            labels[row["sha256"]].add(row["label"])
            paths[row["sha256"]].append(row["path"])
    conflicts = {sha: names for sha, names in labels.items() if len(names) > 1}
    groups = sorted(sorted(paths[sha]) for sha in conflicts)
    if policy == "quarantine":
        reasons = [
            reason or (conflict_reason(conflicts[row["sha256"]]) if row["sha256"] in conflicts else None)
            for row, reason in zip(rows, reasons, strict=True)
        ]
    return reasons, groups


def _warnings(snapshot: DatasetSnapshot, conflicts: list[list[str]], policy: str) -> list[str]:
    lines = [f"class folder {name!r} holds no image: the class is left out" for name in snapshot.empty_classes]
    if conflicts:
        files = sum(len(group) for group in conflicts)
        what = "quarantined" if policy == "quarantine" else "kept with their labels (data.label_conflicts=keep)"
        lines.append(f"{len(conflicts)} image(s) labelled with more than one class ({files} files): {what}")
    return lines


def _write_quarantine(quarantined: list[QuarantinedFile], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split", "reason"])
        writer.writeheader()
        for bad in quarantined:
            writer.writerow(bad.model_dump())


def _refusal(report: ValidationReport, classes: list[str], params: DataParams, source: str) -> str | None:
    """The reason this data set cannot be trained on, or None."""
    if report.num_valid == 0:
        first = report.quarantined[0] if report.quarantined else None
        hint = f" (first: {first.path}: {first.reason})" if first else ""
        return f"no valid images in {source}: all {report.num_checked} files were quarantined{hint}"
    totals = {c: sum(report.class_counts.get(s, {}).get(c, 0) for s in report.class_counts) for c in classes}
    with_images = [c for c in classes if totals[c] > 0]
    if len(with_images) < 2:
        found = ", ".join(with_images) or "none"
        return f"need at least 2 classes with valid images, found {len(with_images)} ({found}) in {source}"
    problems = []
    for name in classes:
        per_split = ", ".join(f"{s} {report.class_counts.get(s, {}).get(name, 0)}" for s in SPLITS)
        if totals[name] < params.min_images_per_class:
            problems.append(
                f"class {name!r} has {totals[name]} valid images ({per_split}); "
                f"at least {params.min_images_per_class} are needed (data.min_images_per_class)"
            )
            continue
        empty = [s for s in SPLITS if report.class_counts.get(s, {}).get(name, 0) == 0]
        if empty:
            problems.append(f"class {name!r} has no valid image in the {'/'.join(empty)} split ({per_split})")
    if problems:
        more = f"; and {len(problems) - 1} more class(es)" if len(problems) > 1 else ""
        return f"{problems[0]}{more}"
    return None


def validate(snapshot: DatasetSnapshot, params: DataParams, out_dir: Path) -> ValidationReport:
    """Decode every image of a snapshot once and report on the data set.

    Takes the ingest snapshot, the data params (channels and max_pixels for decoding,
    min_images_per_class) and the output folder. Writes manifest.clean.csv, quarantine.csv and
    validation.json there and returns the ValidationReport. Raises DataError (after writing the
    files) when no image is valid, fewer than 2 classes remain, or a class is too small or absent
    from a split.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_manifest(snapshot.manifest_path)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        channels = 3 if params.channels == "auto" else params.channels  # decoding is checked the same either way
        reasons = list(pool.map(lambda row: _check(row, channels, params.max_pixels), rows))

    reasons, conflict_groups = _label_conflicts(rows, reasons, params.label_conflicts)
    clean = [row for row, reason in zip(rows, reasons, strict=False) if reason is None]
    quarantined = list(snapshot.quarantined) + [
        QuarantinedFile(path=row["path"], label=row["label"], split=row["split"], reason=reason)
        for row, reason in zip(rows, reasons, strict=False)
        if reason is not None
    ]
    split_names = list(SPLITS) + sorted({row["split"] for row in rows} - set(SPLITS))
    counts: dict[str, dict[str, int]] = {s: {c: 0 for c in snapshot.classes} for s in split_names}
    for row in clean:
        counts[row["split"]][row["label"]] = counts[row["split"]].get(row["label"], 0) + 1
    if snapshot.task == "multilabel":  # the classes are the labels; a row counts for each label it carries
        counts = multilabel.label_counts(clean, snapshot.classes)

    paths_by_sha: dict[str, list[str]] = defaultdict(list)
    splits_by_sha: dict[str, set[str]] = defaultdict(set)
    for row in clean:
        paths_by_sha[row["sha256"]].append(row["path"])
        splits_by_sha[row["sha256"]].add(row["split"])
    duplicate_groups = sorted(sorted(paths) for paths in paths_by_sha.values() if len(paths) > 1)
    leakage = sorted(sha for sha, splits in splits_by_sha.items() if len(splits) > 1)

    train_counts = [n for n in counts["train"].values()]
    imbalance = max(train_counts) / min(train_counts) if train_counts and min(train_counts) > 0 else 0.0

    clean_path = out_dir / "manifest.clean.csv"
    quarantine_path = out_dir / "quarantine.csv"
    report_path = out_dir / "validation.json"
    report = ValidationReport(
        num_checked=len(rows) + len(snapshot.quarantined),
        num_valid=len(clean),
        quarantined=quarantined,
        class_counts=counts,
        duplicate_groups=duplicate_groups,
        label_conflicts=conflict_groups,
        empty_classes=snapshot.empty_classes,
        warnings=_warnings(snapshot, conflict_groups, params.label_conflicts),
        leakage=leakage,
        size_histogram=dict(Counter(f"{row['width']}x{row['height']}" for row in clean).most_common()),
        mode_histogram=dict(Counter(row["mode"] for row in clean).most_common()),
        imbalance_ratio=float(imbalance),
        split_counts=dict(Counter(row["split"] for row in clean)),
        clean_manifest_path=str(clean_path.resolve()),
        quarantine_path=str(quarantine_path.resolve()),
        report_path=str(report_path.resolve()),
    )
    assert report.num_checked == report.num_valid + len(report.quarantined)
    # Same columns as the full manifest (extra label columns included), even when nothing is clean.
    write_manifest(clean, clean_path, columns=list(rows[0].keys()) if rows else None)
    _write_quarantine(quarantined, quarantine_path)
    report_path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")

    if snapshot.task == "multilabel":
        refusal, label_warnings = multilabel.split_problems(counts, snapshot.classes, snapshot.source)
        refusal = _refusal(report, [], params, snapshot.source) if report.num_valid == 0 else refusal
        report.warnings += label_warnings
        report_path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    else:
        refusal = _refusal(report, snapshot.classes, params, snapshot.source)
    if refusal:
        raise DataError(refusal)
    return report


def format_report(report: ValidationReport, max_listed: int = 20) -> str:
    """A short human-readable summary of a ValidationReport for the CLI.

    Takes the report (and how many quarantined files / duplicate groups to list); returns multi-line
    text: totals, counts per split and class, quarantined files with reasons, duplicates, leakage,
    imbalance, sizes and modes.
    """
    lines = [
        f"checked {report.num_checked} images: {report.num_valid} valid, {len(report.quarantined)} quarantined",
    ]
    for split, per_class in report.class_counts.items():
        total = sum(per_class.values())
        detail = ", ".join(f"{name} {n}" for name, n in per_class.items())
        lines.append(f"  {split}: {total} ({detail})")
    if report.quarantined:
        lines.append(f"quarantined ({len(report.quarantined)}):")
        for bad in report.quarantined[:max_listed]:
            lines.append(f"  {bad.path}: {bad.reason}")
        if len(report.quarantined) > max_listed:
            lines.append(f"  ... and {len(report.quarantined) - max_listed} more (see {report.quarantine_path})")
    if report.duplicate_groups:
        lines.append(f"exact duplicates: {len(report.duplicate_groups)} group(s)")
        for group in report.duplicate_groups[:max_listed]:
            lines.append("  " + " = ".join(group))
        if len(report.duplicate_groups) > max_listed:
            lines.append(f"  ... and {len(report.duplicate_groups) - max_listed} more")
    else:
        lines.append("exact duplicates: none")
    if report.label_conflicts:
        lines.append(f"label conflicts: {len(report.label_conflicts)} image(s) under more than one class")
        for group in report.label_conflicts[:max_listed]:
            lines.append("  " + " = ".join(group))
    else:
        lines.append("label conflicts: none")
    if report.empty_classes:
        lines.append(f"empty class folders (left out): {', '.join(report.empty_classes)}")
    if report.leakage:
        lines.append(f"leakage: {len(report.leakage)} image(s) appear in more than one split")
    else:
        lines.append("leakage: none (no image in two splits)")
    lines.append(f"imbalance (largest / smallest train class): {report.imbalance_ratio:.2f}")
    sizes = ", ".join(f"{size} ×{n}" for size, n in list(report.size_histogram.items())[:5])
    modes = ", ".join(f"{mode or '?'} ×{n}" for mode, n in report.mode_histogram.items())
    lines.append(f"sizes: {sizes or 'none'}; modes: {modes or 'none'}")
    return "\n".join(lines)
