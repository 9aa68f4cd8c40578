"""run_scope owns a run's life: FINISHED, FAILED (with the failed stage), KILLED on Ctrl-C and on SIGTERM."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from components import tracking
from components.tracking import RunStatus, run_scope


def _status(run_id: str) -> str:
    return tracking.get_run(run_id).info.status


def test_success_ends_finished_with_tags_and_parent():
    with run_scope("scope-tests", "parent", {"who": "test"}) as parent:
        with run_scope("scope-tests", "child", {}, parent_run_id=parent.run_id) as child:
            assert _status(child.run_id) == RunStatus.RUNNING
    assert _status(parent.run_id) == _status(child.run_id) == RunStatus.FINISHED
    assert tracking.get_run(parent.run_id).data.tags["who"] == "test"
    assert tracking.get_run(child.run_id).data.tags[tracking.PARENT_TAG] == parent.run_id


def test_exception_ends_failed_and_tags_the_stage():
    with pytest.raises(ValueError, match="broken"), run_scope("scope-tests", "fails") as run:
        run.stage = "train"
        raise ValueError("broken data")
    tags = tracking.get_run(run.run_id).data.tags
    assert _status(run.run_id) == RunStatus.FAILED
    assert tags[tracking.FAILED_STAGE_TAG] == "train"
    assert tags["visionflow.error"] == "broken data"


def test_keyboard_interrupt_ends_killed():
    with pytest.raises(KeyboardInterrupt), run_scope("scope-tests", "ctrl-c") as run:
        raise KeyboardInterrupt
    assert _status(run.run_id) == RunStatus.KILLED


def test_reopen_resumes_the_same_run():
    with run_scope("scope-tests", "first") as run:
        pass
    with pytest.raises(RuntimeError), run_scope(reopen=run.run_id, tags={"visionflow.resumed": "true"}) as again:
        assert again.run_id == run.run_id and _status(run.run_id) == RunStatus.RUNNING
        raise RuntimeError("second attempt failed")
    assert _status(run.run_id) == RunStatus.FAILED
    assert tracking.get_run(run.run_id).data.tags["visionflow.resumed"] == "true"


def test_sigterm_ends_killed(tmp_path: Path):
    marker = tmp_path / "run_id"
    script = textwrap.dedent(
        f"""
        import time
        from components.tracking import run_scope
        with run_scope("scope-tests", "sigterm") as run:
            open({str(marker)!r}, "w").write(run.run_id)
            time.sleep(120)
        """
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, env=dict(os.environ))
    deadline = time.monotonic() + 60
    while not marker.exists() or not marker.read_text():
        assert proc.poll() is None, "the scope process ended before it started its run"
        assert time.monotonic() < deadline, "the scope process never started its run"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert _status(marker.read_text()) == RunStatus.KILLED
