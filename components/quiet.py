"""What a visionflow process shows on the terminal and what only goes to its log file (one copy of the rules).

- `OFFLINE_ENV`: environment defaults set before prefect / mlflow / albumentations are imported (no telemetry,
  no update checks); `TERMINAL_ENV`: the two settings that let visionflow route those libraries' output: Prefect's
  console handler writes progress to stdout (stderr is kept for the one-line verdict of a failed command) and
  MLflow's loggers propagate to the root logger instead of writing to stderr themselves.
- `THIRD_PARTY_NOISE`: messages of other libraries (warnings and log records) that a user cannot act on; they are
  written to the log file only.
- `route_output(log_file, verbose)`: the root logger writes everything to the log file and, filtered by
  `TerminalFilter`, to the terminal; Python warnings go through logging (`logging.captureWarnings`).
- `mlflow_prints_to_log()`: what MLflow prints itself rather than logs (registering a model) becomes its log records.

The CLI calls `route_output` once per command; the training process (`python -m components.training.fit`) calls it
at start with the log file the CLI handed down in `LOG_FILE_ENV`, so its third-party lines land in the same file.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

LOG_FILE_ENV = "VISIONFLOW_LOG_FILE"
VERBOSE_ENV = "VISIONFLOW_VERBOSE"
LOG_DIR_ENV = "VISIONFLOW_LOG_DIR"
LOGS_KEPT = 50

# No telemetry, no update checks (tests, benches and containers want these too).
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}
# What lets route_output route those libraries' output (the CLI sets these too).
TERMINAL_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM": "ext://sys.stdout",
    "MLFLOW_CONFIGURE_LOGGING": "false",
}

# Third-party output a user cannot act on: written to the log file, never to the terminal (unless --verbose).
THIRD_PARTY_NOISE = (
    r"Tip: For seamless cloud",  # Lightning advertising its cloud logger
    r"isinstance\(treespec, LeafSpec\)` is deprecated",  # torch pytree deprecation inside Lightning
    r"dataset source can be interpreted in multiple ways",  # MLflow's data set source registry
    r"ONNX model declares execution providers",  # onnxruntime CPU build asked for the CUDA provider
    r"is smaller than the logging interval Trainer\(log_every_n_steps",  # tiny data sets
    r"The '\w+_dataloader' does not have many workers",  # num_workers chosen on purpose
)
_NOISE = re.compile("|".join(THIRD_PARTY_NOISE))

# Loggers whose INFO lines are bookkeeping (MLflow store set-up, Lightning's device banner): log file only.
FILE_ONLY_INFO = ("mlflow", "alembic", "lightning", "lightning.pytorch", "lightning.fabric")
# Prefect's run and engine loggers: a failed stage's traceback and final state go to the log file, the
# command's own last line says what failed.
ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine")
_FAILED_STATE = re.compile(r"^Finished in state (Failed|Crashed)")


def set_offline_defaults(environ: dict[str, str] | None = None, terminal: bool = False) -> None:
    """Set OFFLINE_ENV's values (and TERMINAL_ENV's with `terminal`) where the environment does not set them."""
    target = os.environ if environ is None else environ
    for key, value in {**OFFLINE_ENV, **(TERMINAL_ENV if terminal else {})}.items():
        target.setdefault(key, value)


def is_noise(message: str) -> bool:
    """Whether a message is third-party noise (THIRD_PARTY_NOISE)."""
    return bool(_NOISE.search(message))


class TerminalFilter(logging.Filter):
    """Keeps from the terminal: THIRD_PARTY_NOISE, INFO of FILE_ONLY_INFO loggers, and failure records of
    Prefect's engine (errors, tracebacks, the Failed / Crashed final state). The log file gets them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if record.levelno < logging.WARNING and name.startswith(FILE_ONLY_INFO):
            return False
        if name.startswith(ENGINE_LOGGERS) and (record.levelno >= logging.ERROR or record.exc_info):
            return False
        try:
            message = record.getMessage()
        except Exception:
            return True
        if name.startswith(ENGINE_LOGGERS) and _FAILED_STATE.match(message):
            return False
        return not is_noise(message)


def log_file_for(command: str, log_dir: str | Path | None = None) -> Path | None:
    """A new log file path `<log_dir>/<command>-<YYYYmmdd-HHMMSS>-<pid>.log` (log_dir: $VISIONFLOW_LOG_DIR, else
    .visionflow/logs), or in the temp folder's visionflow-logs when log_dir cannot be written; None when neither
    can. The file itself is created by its first record. Keeps the newest LOGS_KEPT logs of the folder."""
    import tempfile

    from components.writable import why_not_writable

    default = os.environ.get(LOG_DIR_ENV) or Path(".visionflow") / "logs"
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (Path(log_dir or default), Path(tempfile.gettempdir()) / "visionflow-logs"):
        if why_not_writable(folder):
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)[: -LOGS_KEPT + 1]:
                stale.unlink(missing_ok=True)
        except OSError:
            continue
        return (folder / name).resolve()
    return None


_FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def route_output(log_file: str | Path | None, verbose: bool = False, terminal=None) -> None:
    """Route this process's logging and warnings: everything (INFO and up, tracebacks included) appended to
    `log_file`; to the terminal (the root logger's existing stream handlers, or a new one on `terminal` /
    stderr when there is none) what `TerminalFilter` keeps, or everything when `verbose`. Idempotent."""
    # off, then on: re-installs the hook when something has put warnings.showwarning back since an earlier call
    # (captureWarnings(True) alone does nothing once it has been called in this process)
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    root = logging.getLogger()
    for name in FILE_ONLY_INFO:
        logger = logging.getLogger(name)
        logger.handlers = []  # Lightning adds its own stderr handler when the root had none at import
        logger.propagate = True
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)  # their INFO reaches the log file (the terminal filter drops it)
    streams = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and not _is_file(h)]
    if not streams:
        handler = logging.StreamHandler(terminal or sys.stderr)
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)
        streams = [handler]
    for handler in streams:
        handler.filters = [f for f in handler.filters if not isinstance(f, TerminalFilter)]
        if not verbose:
            handler.addFilter(TerminalFilter())
    if log_file and not any(_is_file(h) and h.baseFilename == str(Path(log_file).resolve()) for h in root.handlers):
        file_handler = logging.FileHandler(log_file, encoding="utf-8", delay=True)
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        root.addHandler(file_handler)


class _LinesToLogger:
    """A text stream handing each line written to it to `logger` at INFO."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.logger.info(line)
        return len(text)

    def flush(self) -> None:
        pass


def mlflow_prints_to_log() -> None:
    """MLflow's prints (mlflow.utils.logging_utils.eprint: "Successfully registered model …", "Created version …",
    waiting for a version to be ready) become INFO records of the "mlflow" logger: the log file keeps them and the
    terminal filter drops them, where the pipeline says what it registered in a line of its own. Imports mlflow."""
    from mlflow.utils import logging_utils

    if not isinstance(logging_utils.MLFLOW_LOGGING_STREAM, _LinesToLogger):
        logging_utils.MLFLOW_LOGGING_STREAM = _LinesToLogger(logging.getLogger("mlflow"))


def _is_file(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.FileHandler)


def log_only(message: str, error: BaseException) -> None:
    """Write `message` with `error`'s traceback to this process's log file(s) only, not to the terminal."""
    logger = logging.getLogger("visionflow")
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 0, message, (), (type(error), error, error.__traceback__)
    )
    for handler in logging.getLogger().handlers:
        if _is_file(handler):
            handler.handle(record)
