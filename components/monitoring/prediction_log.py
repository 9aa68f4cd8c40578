"""The server's prediction log: JSON lines in a folder, bounded in size by rotation.

Each prediction is one line: {"event": "prediction", "id", "ts", "model", "version", "model_sha256",
"predicted", the prediction statistics and image statistics of image_stats, and "image_png_b64" only
when storing images was turned on}. Each failed request is one line {"event": "error", "id", "ts",
"kind", "status", "reason"} (never image content). Python's RotatingFileHandler writes the lines
(thread-safe; predictions.jsonl rolls over to predictions.jsonl.1 ... .N-1 before it would pass
max_bytes), so the folder never holds more than max_files files of at most max_bytes each.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

LOG_FILE = "predictions.jsonl"


def new_record_id() -> str:
    """A fresh id for one logged prediction (32 hex digits); feedback CSVs refer to it."""
    return uuid.uuid4().hex


def utc_now() -> str:
    """The current UTC time as ISO 8601 with microseconds (how log records are stamped)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class PredictionLog:
    """Append-only JSON-lines log in `directory`, rotated so it stays within max_bytes x max_files."""

    def __init__(self, directory: Path, max_bytes: int = 10_000_000, max_files: int = 5):
        """Open (create) the log folder. Takes the folder, the largest size of one file in bytes and the
        most files kept (the current one included, at least 2: RotatingFileHandler cannot rotate into
        zero backups)."""
        if max_bytes < 1 or max_files < 2:
            raise ValueError("max_bytes must be at least 1 and max_files at least 2")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.max_files = int(max_files)
        self._handler = logging.handlers.RotatingFileHandler(
            self.directory / LOG_FILE,
            maxBytes=self.max_bytes,
            backupCount=self.max_files - 1,
            encoding="utf-8",
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger = logging.Logger(f"visionflow.prediction_log.{id(self)}")  # private, not in logging's registry
        self._logger.propagate = False
        self._logger.addHandler(self._handler)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record (a JSON-serialisable dict) as one line; rotates first when needed."""
        self._logger.info(json.dumps(record, separators=(",", ":"), allow_nan=False))

    def close(self) -> None:
        """Flush and close the current file."""
        self._handler.close()
        self._logger.removeHandler(self._handler)


def log_files(directory: Path) -> list[Path]:
    """The log's files, oldest first (predictions.jsonl.N ... .1, then predictions.jsonl)."""
    directory = Path(directory)
    rotated = []
    for path in directory.glob(f"{LOG_FILE}.*"):
        suffix = path.name[len(LOG_FILE) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), path))
    files = [path for _, path in sorted(rotated, reverse=True)]
    current = directory / LOG_FILE
    return files + ([current] if current.is_file() else [])


class LogContents(BaseModel):
    """What a read of the prediction log found."""

    directory: str
    files: int
    records: list[dict[str, Any]]
    malformed_lines: int


def read_prediction_log(directory: Path, since: datetime | None = None) -> LogContents:
    """Read every record of a prediction log, oldest first.

    Takes the log folder and optionally a time (aware datetime): older records are left out. Lines that
    are not JSON objects with a parseable "ts" are counted as malformed and skipped. A missing folder
    reads as no files and no records.
    """
    directory = Path(directory)
    records: list[dict[str, Any]] = []
    malformed = 0
    files = log_files(directory) if directory.is_dir() else []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    stamp = datetime.fromisoformat(record["ts"])
                except (ValueError, KeyError, TypeError):  # not JSON, not an object, no usable "ts"
                    malformed += 1
                    continue
                if stamp.tzinfo is None:
                    stamp = stamp.replace(tzinfo=UTC)
                if since is None or stamp >= since:
                    records.append(record)
    return LogContents(directory=str(directory), files=len(files), records=records, malformed_lines=malformed)
