"""Packaging end to end: bundle, registry gate (champion/challenger), promote, rollback, serve over HTTP."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from components import tracking
from components.bundle_format import verify_bundle
from components.monitoring.profile import read_reference_profile
from components.packaging.resolve import resolve_bundle
from flows.package import promote_version
from flows.pipeline import pipeline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def two_runs(shapes_run):
    """Two pipeline runs registering into one model (the session's shared run is the first): the second can
    only become champion by beating the first."""
    first, result = shapes_run
    second = first.model_copy(update={"train": first.train.model_copy(update={"max_epochs": 1, "lr": 1e-5})})
    return first, result, pipeline(second)


def test_bundle_is_verified_and_self_contained(two_runs):
    params, result, _ = two_runs
    assert result.bundle.endswith(".tar.gz") and Path(result.bundle).is_file()
    contents = verify_bundle(Path(result.bundle).with_suffix("").with_suffix(""))
    assert contents["labels"] == ["circle", "square", "triangle"]
    client = MlflowClient(tracking.tracking_uri())
    names = {Path(a.path).name for a in client.list_artifacts(result.run_id, "bundle")}
    assert {
        "model.onnx",
        "labels.json",
        "preprocess.json",
        "MODEL_CARD.md",
        "metrics.json",
        "SHA256SUMS",
        "reference_profile.json",
    } <= names
    profile = read_reference_profile(Path(result.bundle).with_suffix("").with_suffix(""))
    assert profile.model_sha256 == contents["files"]["model.onnx"] and profile.labels == contents["labels"]
    assert profile.num_images == result.split_counts["test"] and profile.accuracy == pytest.approx(
        result.challenger_accuracy
    )
    assert not [n for n in names if n.endswith((".pt", ".pth", ".ckpt", ".pkl"))]


def test_first_model_is_champion_and_a_worse_one_stays_challenger(two_runs):
    params, first, second = two_runs
    name = params.package.model_name
    champion = tracking.alias_version(name, tracking.CHAMPION)
    challenger = tracking.alias_version(name, tracking.CHALLENGER)
    assert str(champion.version) == "1" and str(challenger.version) == "2"
    assert "no champion yet" in first.registry_decision
    assert "does not beat" in second.registry_decision
    run = MlflowClient(tracking.tracking_uri()).get_run(second.run_id)
    assert run.data.metrics["registry/promoted"] == 0.0
    assert "registry/champion_accuracy" in run.data.metrics


def test_the_registry_decision_carries_the_champion_to_challenger_diff(two_runs):
    _, first, second = two_runs
    run = MlflowClient(tracking.tracking_uri()).get_run(second.run_id)
    assert run.data.tags["visionflow.diff.run_a"] == first.run_id  # the champion's run
    assert run.data.tags["visionflow.diff.run_b"] == second.run_id
    assert run.data.metrics["diff/a/accuracy"] == pytest.approx(run.data.metrics["registry/champion_accuracy"])
    assert run.data.metrics["diff/b/accuracy"] == pytest.approx(run.data.metrics["registry/challenger_accuracy"])
    names = {Path(a.path).name for a in MlflowClient(tracking.tracking_uri()).list_artifacts(second.run_id, "diff")}
    assert {"summary.md", "changed.csv", "per_class_deltas.csv", "confusion_diff.png", "reliability.png"} <= names
    summary = (Path(second.run_dir) / "package" / "diff" / "summary.md").read_text()
    assert f"A `{first.run_id}` → B `{second.run_id}`" in summary and "the gate's test split" in summary


def test_promote_and_rollback_commands_are_recorded(two_runs):
    """`visionflow promote VERSION --name` and `visionflow rollback --name`, as a user types them."""
    from typer.testing import CliRunner

    from flows.cli import app

    params, _, _ = two_runs
    name = params.package.model_name
    promoted = CliRunner().invoke(app, ["promote", "2", "--name", name])
    assert promoted.exit_code == 0 and "version 2 is now champion" in promoted.output, promoted.output
    assert str(tracking.alias_version(name, tracking.CHAMPION).version) == "2"
    rolled = CliRunner().invoke(app, ["rollback", "--name", name])
    assert rolled.exit_code == 0 and "rolled back from version 2 to 1" in rolled.output, rolled.output
    assert str(tracking.alias_version(name, tracking.CHAMPION).version) == "1"
    reasons = [h["reason"] for h in tracking.registry_history(name)]
    assert reasons[-2:] == ["manual promotion", "rollback from version 2"]
    unknown = CliRunner().invoke(app, ["promote", "99", "--name", name])
    assert unknown.exit_code == 2 and "Traceback" not in unknown.output
    assert str(tracking.alias_version(name, tracking.CHAMPION).version) == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_the_champion_over_http(two_runs, tmp_path, shapes_dir):
    params, _, _ = two_runs
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            f"models:/{params.package.model_name}@champion",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)
        for kind in ("square", "circle", "triangle"):  # the champion (4 epochs) tells the shapes apart
            image = (shapes_dir / kind / f"{kind}_000.png").read_bytes()
            response = httpx.post(
                f"http://127.0.0.1:{port}/predict", content=image, headers={"content-type": "image/png"}, timeout=30
            )
            assert response.status_code == 200, response.text
            (top, *rest) = response.json()["predictions"][0]
            assert top["label"] == kind and top["probability"] > max(p["probability"] for p in rest), response.text
        bad = httpx.post(
            f"http://127.0.0.1:{port}/predict",
            content=b"not an image",
            headers={"content-type": "image/png"},
            timeout=30,
        )
        assert bad.status_code == 400 and bad.json()["kind"] == "bad_input"
        metadata = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=10).json()
        assert metadata["labels"] == ["circle", "square", "triangle"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_resolve_bundle_refuses_a_tampered_archive(two_runs, tmp_path):
    import tarfile

    _, result, _ = two_runs
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(result.bundle) as src, tarfile.open(tampered, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("labels.json"):
                data = b'["a", "b", "c"]'
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    from components.errors import VisionflowError

    with pytest.raises(VisionflowError, match="labels.json"):
        resolve_bundle(str(tampered), cache_dir=str(tmp_path / "cache"))


def test_package_command_repackages_a_finished_run_under_a_child_run(two_runs):
    """`visionflow package --from-run`: its own flow, a child run, a new version gated against the champion."""
    from typer.testing import CliRunner

    from flows.cli import app

    params, first, second = two_runs
    name = params.package.model_name
    promote_version(name, "2")  # the weaker model is champion: the repackaged first model must be gated against it
    versions_before = {v.version for v in MlflowClient(tracking.tracking_uri()).search_model_versions(f"name='{name}'")}

    out = CliRunner().invoke(
        app,
        [
            "package",
            "--from-run",
            first.run_id,
            "--set",
            "package.torchscript=true",
            "--set",
            "package.executorch=true",
        ],
    )
    assert out.exit_code == 0, out.output
    client = MlflowClient(tracking.tracking_uri())
    child = client.get_run(tracking.child_run(first.run_id, "package"))
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == first.run_id
    assert client.get_run(first.run_id).info.status == "FINISHED"  # the pipeline run itself is left as it was
    assert child.data.params["package.torchscript"] == "True"  # the --set override reached the stage
    version = child.data.tags["visionflow.model_version"]
    assert version not in versions_before and f"{name} v{version}" in out.output
    assert client.get_model_version(name, version).run_id == child.info.run_id
    champion_accuracy = client.get_run(second.run_id).data.metrics["registry/challenger_accuracy"]
    assert child.data.metrics["registry/champion_accuracy"] == pytest.approx(champion_accuracy)
    promoted = child.data.metrics["registry/challenger_accuracy"] > champion_accuracy
    assert child.data.metrics["registry/promoted"] == float(promoted)
    assert str(tracking.alias_version(name, tracking.CHAMPION).version) == (version if promoted else "2")
    assert str(tracking.alias_version(name, tracking.CHALLENGER).version) == version

    run_dir = Path(child.data.tags[tracking.RUN_DIR_TAG])
    assert run_dir.parent == Path(first.run_dir) and run_dir.name.startswith("package-")
    import torch

    scripted = torch.jit.load(str(run_dir / "package" / "export" / "model.torchscript.pt"))
    assert scripted(torch.zeros(2, 3, 16, 16)).shape == (2, 3)  # a batch of 16x16 RGB images -> 3 logits each
    assert "model.pte" in {Path(a.path).name for a in client.list_artifacts(child.info.run_id, "bundle")}
    assert child.data.metrics["package/executorch_parity_top1_agreement"] == 1.0
    assert verify_bundle(Path(first.bundle).with_suffix("").with_suffix(""))  # the pipeline's own bundle untouched
    assert verify_bundle(resolve_bundle(f"models:/{name}/{version}", cache_dir=str(run_dir / "cache")))["labels"] == [
        "circle",
        "square",
        "triangle",
    ]


def test_package_command_refuses_unknown_runs_and_bad_overrides(two_runs):
    from typer.testing import CliRunner

    from flows.cli import app

    _, first, _ = two_runs
    missing = CliRunner().invoke(app, ["package", "--from-run", "0123456789abcdef"])
    assert missing.exit_code == 2 and "no MLflow run 0123456789abcdef" in missing.output
    bad = CliRunner().invoke(app, ["package", "--from-run", first.run_id, "--set", "package.promote_margin=2"])
    assert bad.exit_code == 2 and "package.promote_margin" in bad.output
    assert "Traceback" not in missing.output + bad.output
