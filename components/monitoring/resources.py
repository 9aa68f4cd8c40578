"""Wall time and peak memory of pipeline stages.

A StageClock runs one daemon thread that samples the resident memory of this process and all its
children (psutil) every `interval_s`; `start(name)` ends the stage in progress and starts the next,
`stop()` ends the last. Each ended stage is handed to the callback as (name, seconds, peak MB). The
peak is sampled, so spikes shorter than the interval can be missed; the training process is a child
of the flow process, so the train stage's peak includes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil


def tree_rss_bytes(process: psutil.Process) -> int:
    """Resident memory of `process` plus all its descendants, in bytes (vanished children count 0)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


class StageClock:
    """Times consecutive stages and samples their peak memory; reports each ended stage to a callback."""

    def __init__(self, on_stage_end: Callable[[str, float, float], None], interval_s: float = 0.2):
        """Takes the callback (stage name, wall seconds, peak resident MB of the process tree) and the
        sampling interval. Nothing runs until start()."""
        self._on_stage_end = on_stage_end
        self._interval = interval_s
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._name: str | None = None
        self._started = 0.0
        self._peak = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss = tree_rss_bytes(self._process)
        with self._lock:
            self._peak = max(self._peak, rss)

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            self._sample()

    def start(self, name: str) -> str:
        """End the stage in progress (reported to the callback) and start stage `name`; returns `name`."""
        self._end()
        if self._thread is None:
            self._done.clear()
            self._thread = threading.Thread(target=self._run, name="visionflow-stage-clock", daemon=True)
            self._thread.start()
        with self._lock:
            self._name, self._started, self._peak = name, time.perf_counter(), 0
        self._sample()
        return name

    def stop(self) -> None:
        """End the stage in progress (reported to the callback) and stop sampling; safe to call twice."""
        self._end()
        if self._thread is not None:
            self._done.set()
            self._thread.join(timeout=5)
            self._thread = None

    def _end(self) -> None:
        if self._name is None:
            return
        self._sample()
        with self._lock:
            name, seconds, peak = self._name, time.perf_counter() - self._started, self._peak
            self._name = None
        self._on_stage_end(name, seconds, peak / 1024**2)
