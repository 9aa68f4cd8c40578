"""The safety rules visionflow applies to files it did not write: one copy of each.

- Archive members: an absolute path (`/x`, `C:x`), a `..` component, a link (symbolic or hard) or a
  device / special file is refused, in zip and tar alike (`member_problem`).
- Archive limits: the total bytes written, the member count and the expansion ratio (bytes written /
  archive size) are bounded (`ArchiveLimits`). They are checked on the headers before anything is
  written and again on the bytes actually written while streaming, since headers can lie.
- Links in folders: a link is followed only when its real target lies inside the root it was found
  under (`follow_link`); anything else is the caller's to refuse or quarantine.
- `file_sha256(path)`: the content hash used for identities and checksums.

Imports only the standard library and components.errors (a leaf module).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from components.errors import VisionflowError

CHUNK = 1 << 20
# The expansion ratio is only judged once this much has been written: small archives of very
# compressible files (flat masks, BMP icons) are harmless whatever their ratio.
RATIO_MIN_BYTES = 16 * 1024**2

ABSOLUTE = "absolute path"
TRAVERSAL = "path traversal"
LINK = "link"
SPECIAL = "device or special file"

ErrorFactory = Callable[[str], Exception]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks. Takes a path; returns the hex string."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- archive members -----------------------------------------------------------------------------


def member_parts(name: str) -> list[str]:
    """The path components of an archive member name (`\\` read as a separator, `.` and empties dropped)."""
    return [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]


def member_problem(name: str, kind: str) -> str | None:
    """Why an archive member may not be extracted, or None.

    Takes the member name and its kind ("file", "dir", "link" or "special"); returns one of ABSOLUTE,
    TRAVERSAL, LINK, SPECIAL or None. Zip and tar members are judged by this same rule.
    """
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or PurePosixPath(normalized).is_absolute() or re.match(r"^[A-Za-z]:", normalized):
        return ABSOLUTE
    if ".." in normalized.split("/"):
        return TRAVERSAL
    if kind == "link":
        return LINK
    if kind == "special":
        return SPECIAL
    return None


def zip_member_kind(info: zipfile.ZipInfo) -> str:
    """ "file", "dir", "link" or "special" for a zip member (from its Unix mode bits, when present)."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "link"
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special"
    return "dir" if info.is_dir() else "file"


def tar_member_kind(member: tarfile.TarInfo) -> str:
    """ "file", "dir", "link" (symbolic or hard) or "special" (devices, fifos, ...) for a tar member."""
    if member.issym() or member.islnk():
        return "link"
    if member.isdir():
        return "dir"
    if member.isfile():
        return "file"
    return "special"


# --- archive limits -------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class ArchiveLimits:
    """How far one archive may expand: total bytes, member count, bytes written per archive byte.

    `params` prefixes the names shown in messages (e.g. "data.archive_" -> "data.archive_max_bytes").
    A max_ratio of 0 turns the ratio check off.
    """

    max_bytes: int
    max_members: int
    max_ratio: float
    params: str = ""


class _Budget:
    """Counts members and bytes of one extraction against its limits; raises on the first one passed."""

    def __init__(self, archive: Path, limits: ArchiveLimits, error: ErrorFactory):
        self.archive, self.limits, self.error = archive, limits, error
        try:
            self.archive_bytes = max(archive.stat().st_size, 1)
        except OSError:  # an archive read from a stream: no ratio to judge
            self.archive_bytes = 0
        self.members = 0
        self.written = 0

    def _refuse(self, what: str, param: str) -> Exception:
        where = f" ({self.limits.params}{param})" if self.limits.params else ""
        return self.error(f"archive bomb refused: {self.archive.name} {what}{where}; nothing was kept")

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise self._refuse(f"holds more than {self.limits.max_members} members", "max_members")

    def check_total(self, total: int, declared: bool) -> None:
        """Refuse when `total` bytes pass the byte limit or (above RATIO_MIN_BYTES) the ratio limit."""
        verb = "declares" if declared else "unpacks to"
        if total > self.limits.max_bytes:
            raise self._refuse(f"{verb} more than {_size(self.limits.max_bytes)}", "max_bytes")
        ratio = total / self.archive_bytes if self.archive_bytes else 0.0
        if self.limits.max_ratio and total > RATIO_MIN_BYTES and ratio > self.limits.max_ratio:
            raise self._refuse(
                f"{verb} {_size(total)} from {_size(self.archive_bytes)} "
                f"(more than {self.limits.max_ratio:g} times its size)",
                "max_ratio",
            )

    def copy(self, source, target: Path, declared: int) -> None:
        """Stream one member into `target`, counting the bytes actually written (never past `declared`)."""
        with open(target, "wb") as out:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                self.written += len(chunk)
                self.check_total(self.written, declared=False)
                if out.tell() + len(chunk) > declared:
                    raise self.error(
                        f"unsafe archive member in {self.archive.name}: {target.name} holds more bytes than "
                        f"its header declares ({declared}); nothing was kept"
                    )
                out.write(chunk)


def _target(dest: Path, name: str) -> Path:
    """Where a checked member is written: inside `dest`, parent folders created."""
    target = dest.joinpath(*member_parts(name))
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _refuse_member(archive: Path, name: str, problem: str, error: ErrorFactory) -> Exception:
    return error(f"unsafe archive member {name!r} in {archive} ({problem}); nothing was kept")


def extract_zip(archive: Path, dest: Path, limits: ArchiveLimits, error: ErrorFactory = VisionflowError) -> None:
    """Extract a zip into `dest` after checking every member and the declared sizes, streaming under limits.

    Takes the archive, an empty destination folder, the limits and the error type to raise (one line).
    The caller removes `dest` when this raises.
    """
    budget = _Budget(archive, limits, error)
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            problem = member_problem(info.filename, zip_member_kind(info))
            if problem:
                raise _refuse_member(archive, info.filename, problem, error)
            budget.member()
        budget.check_total(sum(info.file_size for info in members), declared=True)
        for info in members:
            if not member_parts(info.filename):
                continue
            if info.is_dir():
                _target(dest, info.filename).mkdir(exist_ok=True)
                continue
            with zf.open(info) as source:
                budget.copy(source, _target(dest, info.filename), info.file_size)


def extract_tar(
    tar: tarfile.TarFile,
    dest: Path,
    limits: ArchiveLimits,
    error: ErrorFactory = VisionflowError,
    members: Iterable[tarfile.TarInfo] | None = None,
) -> None:
    """Extract an open tar archive into `dest`, member by member, checking each header before writing it.

    Takes the open TarFile, an empty destination folder, the limits, the error type to raise and
    optionally the members (default: streamed from the archive). Each member also passes tarfile's
    "data" filter. The caller removes `dest` when this raises.
    """
    archive = Path(tar.name) if tar.name else Path("archive")
    budget = _Budget(archive, limits, error)
    for member in members if members is not None else tar:
        problem = member_problem(member.name, tar_member_kind(member))
        if problem:
            raise _refuse_member(archive, member.name, problem, error)
        budget.member()
        tarfile.data_filter(member, str(dest))  # the standard library's rule too (raises FilterError)
        if not member_parts(member.name):
            continue
        if member.isdir():
            _target(dest, member.name).mkdir(exist_ok=True)
            continue
        budget.check_total(budget.written + member.size, declared=True)
        source = tar.extractfile(member)
        if source is not None:
            with source:
                budget.copy(source, _target(dest, member.name), member.size)


def extract_archive_into(
    archive: Path, dest: Path, limits: ArchiveLimits, error: ErrorFactory = VisionflowError
) -> None:
    """Extract a .zip or a (compressed) tar into `dest` under the member rules and limits; on any
    failure `dest` is removed and `error` raised with one line."""
    archive = Path(archive)
    try:
        if archive.name.lower().endswith(".zip"):
            extract_zip(archive, dest, limits, error)
        else:
            with tarfile.open(archive) as tar:
                extract_tar(tar, dest, limits, error)
    except Exception as err:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(err, VisionflowError) or not isinstance(
            err, (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, RuntimeError, zlib.error)
        ):  # RuntimeError: an encrypted zip member or an unsupported compression method; zlib: corrupt data
            raise
        if isinstance(err, tarfile.FilterError):
            member = getattr(err, "tarinfo", None)
            name = member.name if member is not None else "?"
            raise _refuse_member(archive, name, str(err), error) from None
        raise error(f"cannot extract archive {archive}: {err}; nothing was kept") from None


# --- links in folders ------------------------------------------------------------------------------


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when the (already resolved) `path` is `root` or lies below it."""
    path, root = os.fspath(path), os.fspath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def follow_link(link: Path, real_root: Path) -> Path | None:
    """The rule for links met while walking a folder: follow only inside the root.

    Takes the link (or any path) and the resolved root; returns its resolved real path when that lies
    inside the root (a link inside the data set is followed), else None (the caller refuses or
    quarantines it; it is never opened). Cycles are the walker's to break (see visited real folders).
    """
    real = Path(os.path.realpath(link))
    return real if is_inside(real, real_root) else None
