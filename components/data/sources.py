"""Turn `DataParams.path` into a list of labelled image files.

Sources: scikit-learn's bundled digits, an ImageFolder directory (optionally with train/val/test
top folders), a CSV manifest, a .zip/.tar.gz/.tgz/.tar archive of either, or a torchvision data set.
Bundled, downloaded and extracted data are materialized once under the cache folder (into a
temporary folder first, then renamed, so a crash never leaves a half-written set that is reused).

Links in a folder follow components.safety's rule: followed once inside the data root, labelled by the
class folder the image really lives in, quarantined ("link outside the data set") when they lead out.
Archives are extracted under components.safety's member rules and the data.archive_* limits.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from components import safety
from components.config import DataParams
from components.data.manifest import MANIFEST_COLUMNS
from components.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
TORCHVISION_DATASETS = ("CIFAR10", "FashionMNIST", "MNIST")
BUNDLED_DATASETS = ("digits", "digits-multitask", "digits-multilabel")
# Top-level folder names read as splits, and the split they stand for.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Names a CSV's extra label column may not take (they are columns of the ingest manifest).
RESERVED_COLUMNS = frozenset(MANIFEST_COLUMNS)
DOWNLOAD_TIMEOUT_S = 20.0


class SourceItem(BaseModel):
    """One image file of a data source: absolute path, class label, split when the source fixes it."""

    path: str
    label: str
    split: str | None = None
    extra_labels: dict[str, str] = {}
    reason: str = ""  # set on an item refused before it was opened (listed in SourceListing.quarantined)


def check_source(path: str) -> None:
    """Raise DataError (one line) for a bundled data set that does not exist, a local folder, CSV or archive that
    does not exist, a folder with no class sub-folders (a flat folder of images) and a file that is neither a CSV nor
    an archive (the bundled and torchvision sets are made on first use). Ingest asks, and the CLI before anything
    starts: these look at names only, never inside an image."""
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        if name not in BUNDLED_DATASETS:
            raise DataError(
                f"unknown bundled data set {name!r}: supported are "
                + ", ".join(f"bundled:{n}" for n in BUNDLED_DATASETS)
            )
        return
    if path.startswith("torchvision:"):
        return
    target = Path(path).expanduser()
    if not target.exists():
        raise DataError(f"data source not found: {path}")
    if target.is_dir():
        if not _class_folders(target.resolve()):
            raise _no_images(target.resolve())
    elif target.suffix.lower() != ".csv" and not target.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise _unsupported(path)


def resolve_source(
    path: str,
    cache_dir: Path,
    label_column: str = "label",
    limits: safety.ArchiveLimits | None = None,
    task: str = "single",
) -> SourceListing:
    """List the labelled images of a data source.

    Takes `DataParams.path` ("bundled:digits", "torchvision:NAME", a folder, a .csv manifest or an
    archive), the cache folder for materialized/extracted data, the CSV label column and the archive
    limits (default: DataParams' defaults) and data.task (a CSV's empty label cells are refused for "single";
    components.data.multilabel reads the cells of the others).
    Returns a SourceListing: items sorted by path, files refused
    before opening (links out of the data set) and empty class folders. Raises DataError (one line)
    when the source cannot be used.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()  # item paths must be absolute
    check_source(path)
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        listing = _from_folder(materialize_digits(cache_dir))
        if name == "digits-multitask":
            listing.items = [
                item.model_copy(update={"extra_labels": digit_tasks(item.label)}) for item in listing.items
            ]
        if name == "digits-multilabel":
            listing.items = [item.model_copy(update={"label": digit_labels(item.label)}) for item in listing.items]
            listing.label_cells = True
        return listing
    if path.startswith("torchvision:"):
        return _from_folder(materialize_torchvision(path.split(":", 1)[1], cache_dir))
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        return _from_folder(target)
    if target.suffix.lower() == ".csv":
        return SourceListing(items=_from_csv(target, label_column, task != "single"), label_cells=True)
    if target.name.lower().endswith(ARCHIVE_SUFFIXES):
        return _from_extracted(extract_archive(target, cache_dir, limits), label_column, task != "single")
    raise _unsupported(path)


def _unsupported(path: str) -> DataError:
    return DataError(
        f"unsupported data source {path}: expected a folder, a .csv manifest, a .zip/.tar.gz/.tgz/.tar "
        "archive, bundled:digits or torchvision:MNIST|FashionMNIST|CIFAR10"
    )


# --- folders --------------------------------------------------------------------------------------

LINK_OUTSIDE = "link outside the data set"


class SourceListing(BaseModel):
    """What a data source holds: the usable items, the files refused before opening them (each with its
    `reason`, e.g. a link out of the data set) and the class folders that hold no image."""

    items: list[SourceItem]
    quarantined: list[SourceItem] = []
    empty_classes: list[str] = []
    label_cells: bool = False  # labels are manifest cells (a CSV, the multi-label demo) rather than folder names


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def _class_folders(root: Path) -> list[tuple[str, str | None, Path]]:
    """(label, split, folder) of an ImageFolder: class sub-folders, or train/val/test folders holding them."""
    folders = _visible_dirs(root)
    split_folders = [d for d in folders if d.name.lower() in SPLIT_FOLDERS]
    if not split_folders:
        return [(d.name, None, d) for d in folders]
    others = [d.name for d in folders if d.name.lower() not in SPLIT_FOLDERS]
    if others:
        raise DataError(
            f"folder {root} mixes split folders ({', '.join(d.name for d in split_folders)}) with other "
            f"folders ({', '.join(others[:5])}): put the class folders inside the split folders"
        )
    return [(d.name, SPLIT_FOLDERS[s.name.lower()], d) for s in split_folders for d in _visible_dirs(s)]


class _Walk:
    """One walk of an ImageFolder under the link rule (see `_from_folder`)."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.owners: dict[Path, tuple[str, str | None]] = {}  # real class folder -> (label, split)
        self.blocked: set[Path] = {self.root}  # the root and the folders above class folders
        self.visited: set[Path] = set()  # real folders walked
        self.seen: set[tuple[Path, str]] = set()  # (real file, label) taken
        self.items: list[SourceItem] = []
        self.quarantined: list[SourceItem] = []

    def owner(self, real: Path) -> tuple[str, str | None] | None:
        for folder in real.parents:
            if folder in self.owners:
                return self.owners[folder]
        return None

    def refuse(self, path: Path, label: str, split: str | None) -> None:
        self.quarantined.append(SourceItem(path=str(path), label=label, split=split, reason=LINK_OUTSIDE))

    def claim(self, folders: list[tuple[str, str | None, Path]]) -> list[tuple[str, str | None, Path]]:
        """Give each real class folder its label (plain folders before links); returns the ones to walk."""
        walks = []
        for label, split, folder in sorted(folders, key=lambda f: f[2].is_symlink()):
            real = safety.follow_link(folder, self.root)
            if real is None:
                self.refuse(folder, label, split)
            elif real not in self.owners and real not in self.blocked and self.owner(real) is None:
                # (else an alias of a class folder, a folder inside one, or a folder above them: a cycle)
                self.owners[real] = (label, split)
                self.blocked.update(p for p in real.parents if safety.is_inside(p, self.root))
                walks.append((label, split, folder))
        return walks

    def file(self, path: Path, real: Path, label: str, split: str | None) -> None:
        owner = self.owner(real)
        if owner is not None:  # an image's label is the class folder it really lives in
            label, split, path = owner[0], owner[1], real
        if (real, label) not in self.seen:
            self.seen.add((real, label))
            self.items.append(SourceItem(path=str(path), label=label, split=split))

    def folder(self, folder: Path, label: str, split: str | None, linked: bool) -> None:
        """Walk `folder` (reached through a link when `linked`), taking images and following links inside."""
        real_folder = Path(os.path.realpath(folder)) if linked else folder
        if real_folder in self.visited:
            return
        self.visited.add(real_folder)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if _hidden(entry.name):
                continue
            path = Path(entry.path)
            is_image = Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
            if entry.is_symlink():
                real = safety.follow_link(path, self.root)
                if real is None:
                    if is_image or os.path.isdir(path):
                        self.refuse(path, label, split)
                elif real.is_dir():
                    if real not in self.blocked and real not in self.owners and real not in self.visited:
                        self.folder(path, label, split, linked=True)
                elif is_image:
                    self.file(path, real, label, split)
            elif entry.is_dir():
                self.folder(path, label, split, linked)
            elif is_image:
                self.file(path, Path(os.path.realpath(path)) if linked else path, label, split)


def _from_folder(root: Path) -> SourceListing:
    """Items of an ImageFolder: class sub-folders, or train/val/test folders holding class sub-folders.

    Links: a link whose real target lies inside the root is followed once (real folders already walked,
    the root and the folders above class folders are not entered again, so a cycle adds nothing), and
    an image reached twice counts once. An image's label (and split) is the class folder it really lives
    in; an image inside the root but in no class folder (e.g. a hidden store) takes the class folder it
    was linked from. A link (file or folder) whose target lies outside the root is never opened: it is
    listed in `quarantined` with the reason "link outside the data set". Class folders without images
    are listed in `empty_classes`.
    """
    walk = _Walk(root)
    folders = _class_folders(root)
    for label, split, folder in walk.claim(folders):
        walk.folder(folder, label, split, linked=Path(os.path.realpath(folder)) != folder)
    if not walk.items and not walk.quarantined:
        raise _no_images(root)
    claimed = {label for label, _ in walk.owners.values()}
    taken = {item.label for item in walk.items + walk.quarantined}
    return SourceListing(
        items=sorted(walk.items, key=lambda item: item.path),
        quarantined=sorted(walk.quarantined, key=lambda item: item.path),
        empty_classes=sorted(claimed - taken),
    )


def _no_images(root: Path) -> DataError:
    return DataError(
        f"no images found in {root}: expected class sub-folders of images (e.g. {root}/cat/001.png), "
        "optionally under train/val/test folders"
    )


# --- CSV manifests --------------------------------------------------------------------------------


def _normalize_split(value: str) -> str | None:
    value = value.strip().lower()
    return SPLIT_FOLDERS.get(value) if value else None


def _from_csv(csv_path: Path, label_column: str, allow_empty_label: bool = False) -> list[SourceItem]:
    """Items of a CSV manifest (`path`, the label column, optional `split`, extra label columns); an empty label
    cell is refused unless `allow_empty_label` (multi-label data, components.data.multilabel decides)."""
    base = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        for needed in ("path", label_column):
            if needed not in columns:
                raise DataError(
                    f"CSV manifest {csv_path} has no {needed!r} column (columns: {', '.join(columns) or 'none'})"
                )
        extras = [c for c in columns if c not in ("path", label_column, "split") and c]
        clashes = [c for c in extras if c in RESERVED_COLUMNS]
        if clashes:
            raise DataError(
                f"CSV manifest {csv_path}: column {clashes[0]!r} is not the label column and clashes with a "
                "manifest column; rename it"
            )
        items = []
        for number, row in enumerate(reader, start=1):
            where = f"CSV manifest {csv_path}, row {number} (line {reader.line_num})"
            raw_path = (row.get("path") or "").strip()
            label = (row.get(label_column) or "").strip()
            if not raw_path:
                raise DataError(f"{where}: empty path")
            if not label and not allow_empty_label:
                raise DataError(f"{where}: empty {label_column!r} for {raw_path}")
            file = Path(raw_path).expanduser()
            file = file if file.is_absolute() else base / file
            if not file.is_file():
                raise DataError(f"{where}: image file not found: {raw_path}")
            split_value = (row.get("split") or "") if "split" in columns else ""
            split = _normalize_split(split_value)
            if split_value.strip() and split is None:
                raise DataError(f"{where}: unknown split {split_value.strip()!r} (use train, val or test)")
            items.append(
                SourceItem(
                    path=str(file.resolve()),
                    label=label,
                    split=split,
                    extra_labels={c: (row.get(c) or "").strip() for c in extras},
                )
            )
    if not items:
        raise DataError(f"CSV manifest {csv_path} has no rows")
    return sorted(items, key=lambda item: item.path)


# --- archives -------------------------------------------------------------------------------------


def _materialize(final: Path, build: Callable[[Path], None]) -> Path:
    """Run build(tmp) into a temporary sibling folder, then rename it to `final`; reuse `final` if present."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def extract_archive(archive: Path, cache_dir: Path, limits: safety.ArchiveLimits | None = None) -> Path:
    """Extract an archive once, safely, into cache_dir/extracted/<sha256[:16]>/.

    Takes the archive path, the cache folder and the extraction limits (default: DataParams' defaults);
    returns the extracted folder. Members with absolute paths, `..`, links or devices are refused (zip
    and tar alike), and so is an archive that passes a limit (on its headers or on the bytes written);
    nothing is left behind then. Raises DataError (one line).
    """
    limits = limits or default_archive_limits()
    final = Path(cache_dir) / "extracted" / safety.file_sha256(archive)[:16]
    return _materialize(final, lambda tmp: safety.extract_archive_into(archive, tmp, limits, DataError))


def default_archive_limits() -> safety.ArchiveLimits:
    """The archive limits of the default data params (data.archive_max_bytes / _max_members / _max_ratio)."""
    return archive_limits(DataParams())


def archive_limits(params: DataParams) -> safety.ArchiveLimits:
    """The archive limits of DataParams `params`."""
    return safety.ArchiveLimits(
        max_bytes=params.archive_max_bytes,
        max_members=params.archive_max_members,
        max_ratio=params.archive_max_ratio,
        params="data.archive_",
    )


def _from_extracted(folder: Path, label_column: str, allow_empty_label: bool = False) -> SourceListing:
    """Items of an extracted archive: one wrapping folder is descended; a single CSV is a manifest."""
    entries = [p for p in folder.iterdir() if not _hidden(p.name)]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() not in SPLIT_FOLDERS:
        folder = entries[0]
        entries = [p for p in folder.iterdir() if not _hidden(p.name)]
    csvs = [p for p in entries if p.is_file() and p.suffix.lower() == ".csv"]
    if len(csvs) == 1:
        return SourceListing(items=_from_csv(csvs[0], label_column, allow_empty_label), label_cells=True)
    return _from_folder(folder)


# --- bundled and downloaded data sets ------------------------------------------------------------


def digit_tasks(digit: str) -> dict[str, str]:
    """The derived labels of the multi-task digits demo: parity ("even"/"odd") and ge5 ("yes"/"no")."""
    value = int(digit)
    return {"parity": "even" if value % 2 == 0 else "odd", "ge5": "yes" if value >= 5 else "no"}


def digit_labels(digit: str) -> str:
    """The label cell of the multi-label digits demo: even, ge5 (>= 5) and loop (0, 6, 8, 9: a closed loop),
    several at once (8 is even;ge5;loop) or none (1 and 3)."""
    value = int(digit)
    names = [n for n, on in (("even", value % 2 == 0), ("ge5", value >= 5), ("loop", value in (0, 6, 8, 9))) if on]
    return ";".join(names)


def materialize_digits(cache_dir: Path) -> Path:
    """Write scikit-learn's digits (1,797 8x8 images) once as PNGs under cache_dir/bundled/digits/<class>/.

    Takes the cache folder; returns the ImageFolder root. Reuses a complete earlier copy.
    """
    import numpy as np
    from PIL import Image

    def build(tmp: Path) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        for index, (image, target) in enumerate(zip(pixels, digits.target, strict=False)):
            folder = tmp / str(int(target))
            folder.mkdir(exist_ok=True)
            Image.fromarray(image, "L").save(folder / f"{index:04d}.png")

    return _materialize(Path(cache_dir) / "bundled" / "digits", build)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def materialize_torchvision(name: str, cache_dir: Path) -> Path:
    """Download a torchvision data set (train and test) and write it once as PNGs with split folders.

    Takes "MNIST", "FashionMNIST" or "CIFAR10" (case-insensitive) and the cache folder; returns
    cache_dir/torchvision/NAME-png (train/<class>/*.png, test/<class>/*.png). Raises DataError with one
    line when the name is unknown or the download fails (e.g. offline).
    """
    canonical = {n.lower(): n for n in TORCHVISION_DATASETS}.get(name.lower())
    if canonical is None:
        raise DataError(
            f"unknown torchvision data set {name!r}: supported are "
            + ", ".join(f"torchvision:{n}" for n in TORCHVISION_DATASETS)
        )
    root = Path(cache_dir) / "torchvision"
    final = root / f"{canonical}-png"
    if final.is_dir():
        return final

    from urllib.error import URLError

    import numpy as np
    import torchvision.datasets
    from PIL import Image

    cls = getattr(torchvision.datasets, canonical)
    splits = {}
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        for split, train in (("train", True), ("test", False)):
            splits[split] = cls(root=str(root), train=train, download=True)
    except (URLError, OSError, RuntimeError) as err:
        raise DataError(
            f"could not download torchvision data set {canonical}: {_one_line(err)} "
            "(offline? put the images in a folder and pass its path)"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)

    def build(tmp: Path) -> None:
        for split, dataset in splits.items():
            data = np.asarray(dataset.data)
            targets = np.asarray(dataset.targets)
            if canonical == "MNIST":
                names = [str(i) for i in range(10)]
            else:
                names = [c.replace("/", "_") for c in dataset.classes]
            for index, (image, target) in enumerate(zip(data, targets, strict=False)):
                folder = tmp / split / names[int(target)]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{index:05d}.png")

    return _materialize(final, build)
