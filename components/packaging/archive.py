"""The bundle archive: `<bundle>.tar.gz`, byte-for-byte reproducible (sorted members, fixed times, owners
and modes). Unpacking it safely is the format's (components.bundle_format.unpack_bundle)."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

from components.bundle_format import verify_bundle


def _entry(name: str, is_dir: bool, size: int = 0) -> tarfile.TarInfo:
    """A tar header with fixed mode, time and owner (the same bundle gives the same bytes)."""
    entry = tarfile.TarInfo(name)
    entry.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    entry.mode = 0o755 if is_dir else 0o644
    entry.size = size
    entry.mtime = 0
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = ""
    return entry


def pack_bundle(bundle_dir: Path, verify: bool = True) -> Path:
    """Verify a bundle directory and write it as `<bundle_dir>.tar.gz` beside it.

    Takes the bundle directory and whether to verify it first (pass False only right after
    write_bundle, which verified what it wrote); the archive holds one top folder named like it with
    the files inside, in sorted order, with fixed times, owners and modes (the same bundle gives the
    same bytes). Returns the archive path. Raises BundleError when the bundle does not verify.
    """
    bundle_dir = Path(bundle_dir)
    if verify:
        verify_bundle(bundle_dir)
    top = bundle_dir.name
    archive = bundle_dir.with_name(top + ".tar.gz")
    partial = archive.with_name(archive.name + ".partial")
    with open(partial, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_entry(top, True))
            for path in sorted(bundle_dir.iterdir(), key=lambda p: p.name):
                with open(path, "rb") as handle:
                    tar.addfile(_entry(f"{top}/{path.name}", False, path.stat().st_size), handle)
    partial.replace(archive)
    return archive
