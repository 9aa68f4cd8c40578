"""The visionflow command in a new process, as a user runs it; and under `python -X importtime`, to tell what it
said on stderr and which modules it had imported by then (a mistake is answered before the heavy imports)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple


def run_visionflow(
    *args: str,
    cwd: Path | None = None,
    timeout: int = 300,
    env: dict[str, str] | None = None,
    drop_env: tuple[str, ...] = (),
    python_flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`python [python_flags] -m flows.cli ARGS` with this environment plus `env`, less `drop_env`."""
    base = {k: v for k, v in os.environ.items() if k not in drop_env}
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "flows.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=dict(base, COLUMNS="200", **(env or {})),
    )  # fmt: skip


class Answer(NamedTuple):
    returncode: int
    said: list[str]  # stderr lines other than the import timings
    imported: set[str]


def visionflow_importtime(*args: str, cwd: Path, drop_env: tuple[str, ...] = ()) -> Answer:
    out = run_visionflow(*args, cwd=cwd, drop_env=drop_env, python_flags=("-X", "importtime"))
    lines = out.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "typer" in imported, out.stderr[-2000:]  # the timings were read (the CLI imports typer)
    return Answer(out.returncode, [line for line in lines if not line.startswith("import time:")], imported)
