"""Before a command writes anything: are the places visionflow writes to writable? (One line naming the first
that is not, instead of minutes of retries on `sqlite3.OperationalError: unable to open database file`.)"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from components.errors import VisionflowError


class NotWritableError(VisionflowError):
    """A place visionflow must write to (MLflow store, runs, cache, Prefect home) cannot be written."""


def local_store_path(tracking_uri: str) -> Path | None:
    """The local folder or database file behind an MLflow tracking URI (sqlite:///…, file:…, a plain path), or
    None for a server or database URI (http(s)://, postgresql://, databricks, …)."""
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri.removeprefix("sqlite:///")
        return None if path in ("", ":memory:") else Path(path).expanduser()
    if tracking_uri.startswith("file://"):
        return Path(tracking_uri.removeprefix("file://")).expanduser()
    if "://" in tracking_uri or tracking_uri.startswith("databricks"):
        return None
    return Path(tracking_uri).expanduser()


def places_to_check(
    tracking_uri: str | None = None,
    runs_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    prefect_home: str | Path | None = None,
) -> dict[str, Path]:
    """The places a command writes, by the name a user knows them by (None entries are left out)."""
    places: dict[str, Path] = {}
    store = local_store_path(tracking_uri) if tracking_uri else None
    if store is not None:
        places["MLflow store"] = store
    if runs_dir is not None:
        places["runs folder (run.output_dir)"] = Path(runs_dir)
    if cache_dir is not None:
        places["cache folder (run.cache_dir)"] = Path(cache_dir)
    if prefect_home is not None:
        places["Prefect home (PREFECT_HOME)"] = Path(prefect_home)
    return places


def why_not_writable(path: str | Path) -> str | None:
    """Why `path` (a folder or file, existing or to be created) cannot be written, or None when it can.

    Tries for real rather than trusting permission bits, which root ignores: creates and removes a temporary file
    in the nearest existing folder (an existing file's folder too: SQLite writes its journal beside the database)
    and opens an existing file for appending without writing to it."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        if existing.is_file():
            with open(existing, "ab"):
                pass
        with tempfile.TemporaryFile(dir=existing if existing.is_dir() else existing.parent, prefix=".vf-check-"):
            pass
    except OSError as err:
        reason = "permission denied" if err.errno in (errno.EACCES, errno.EPERM) else err.strerror or str(err)
        return f"{existing} is not writable ({reason.lower()})"
    return None


def check_writable(places: dict[str, Path]) -> None:
    """Raise NotWritableError (one line naming the place, its path and why) for the first place that cannot be
    written; returns None when all can."""
    for name, path in places.items():
        reason = why_not_writable(path)
        if reason:
            raise NotWritableError(f"cannot write to the {name} {os.path.abspath(path)}: {reason}")
