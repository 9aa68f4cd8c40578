"""Run the visionflow command in a new process under `python -X importtime`: what it said on stderr and which
modules it imported (tests that a mistake is answered before the heavy imports)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple


class Answer(NamedTuple):
    returncode: int
    said: list[str]  # stderr lines other than the import timings
    imported: set[str]


def visionflow_importtime(*args: str, cwd: Path, drop_env: tuple[str, ...] = ()) -> Answer:
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flows.cli", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )  # fmt: skip
    lines = out.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "typer" in imported, out.stderr[-2000:]  # the timings were read (the CLI imports typer)
    return Answer(out.returncode, [line for line in lines if not line.startswith("import time:")], imported)
