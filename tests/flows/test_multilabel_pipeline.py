"""Multi-label end to end on a subset of the bundled multi-label digits (even, ge5, loop): a CSV manifest with
label cells found by the plan, trained with a sigmoid head, thresholds tuned on val and carried by the bundle,
served over real HTTP (every label over its threshold), label frequencies in the reference profile."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from components.bundle_format import verify_bundle
from components.config import load_params
from components.data.sources import digit_labels, materialize_digits
from components.serving.app import ServeSettings, create_app
from components.serving.predictor import Predictor
from tests.helpers.params import tiny_overrides

PER_DIGIT = 16


def _digits_csv(tmp_path: Path) -> Path:
    """A CSV manifest of PER_DIGIT bundled digits per class, label cells from the demo's rule (1 and 3: none)."""
    root = materialize_digits(tmp_path / "digits-cache")
    lines = ["path,label"]
    for digit in range(10):
        for image in sorted((root / str(digit)).glob("*.png"))[:PER_DIGIT]:
            lines.append(f"{image},{digit_labels(str(digit))}")
    (tmp_path / "digits.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "digits.csv"


def _serve(bundle: Path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(bundle, ServeSettings()), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return url, server, thread, sock
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("server did not become ready")


@pytest.mark.slow
def test_multilabel_pipeline_trains_tunes_thresholds_packages_and_serves(tmp_path, prefect_harness):
    from flows.pipeline import pipeline

    overrides = tiny_overrides(
        tmp_path, _digits_csv(tmp_path), data__channels=1, augment__mean="[0.5]", augment__std="[0.5]",
        train__max_epochs=4, train__pos_weight="auto", augment__preview_images=0, evaluate__explain=False,
        train__num_workers=0,
    )  # fmt: skip
    params = load_params(Path("params/multilabel.yaml"), [*overrides, "data.task=auto"])
    result = pipeline(params)

    run_dir = Path(result.run_dir)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["params"]["data"]["task"] == "multilabel"  # found in the manifest's label cells
    metrics = result.metrics
    assert {"test/map", "test/micro_f1", "test/macro_f1", "test/hamming_loss"} <= set(metrics)
    assert metrics["test/map"] > 0.6, metrics
    assert sum(result.split_counts.values()) == 10 * PER_DIGIT  # images, not label occurrences
    evaluation = run_dir / "evaluation"
    tuned = json.loads((evaluation / "thresholds.json").read_text())
    assert set(tuned["thresholds"]) == {"even", "ge5", "loop"} and tuned["tuned_on"].startswith("val")
    assert (evaluation / "pr_curves.png").is_file()
    assert not (run_dir / "train" / "suspicious_labels.csv").exists()  # margins need one label per image

    bundle = run_dir / "package" / "bundle"
    contents = verify_bundle(bundle)
    assert contents["task"] == "multilabel" and contents["labels"] == ["even", "ge5", "loop"]
    assert contents["thresholds"] == pytest.approx(tuned["thresholds"])
    profile = json.loads((bundle / "reference_profile.json").read_text())
    assert profile["task"] == "multilabel" and set(profile["predicted_counts"]) == {"even", "ge5", "loop"}
    assert result.challenger_accuracy == pytest.approx(metrics["test/map"], abs=1e-4)  # the registry gate's mAP

    predictor = Predictor(bundle)
    url, server, thread, sock = _serve(bundle)
    try:
        root = tmp_path / "digits-cache" / "bundled" / "digits"
        for digit in (0, 1, 8):
            png = (sorted((root / str(digit)).glob("*.png"))[-1]).read_bytes()  # not among the CSV's images
            response = httpx.post(url + "/predict", content=png, headers={"content-type": "image/png"}, timeout=30)
            assert response.status_code == 200, response.text
            answer = response.json()["predictions"][0]
            image = np.asarray(Image.open(io.BytesIO(png)).convert("L"))[:, :, None]
            row = predictor.probabilities(predictor.preprocess_image(image)[None])[0]
            probs = dict(zip(predictor.labels, row, strict=True))
            expected = {label for label, p in probs.items() if p >= contents["thresholds"][label]}
            assert {a["label"] for a in answer} == expected
            for entry in answer:
                assert entry["probability"] == pytest.approx(float(probs[entry["label"]]), abs=1e-5)
                assert entry["threshold"] == pytest.approx(contents["thresholds"][entry["label"]])
        metadata = httpx.get(url + "/metadata", timeout=10).json()
        assert metadata["task"] == "multilabel" and metadata["thresholds"] == pytest.approx(contents["thresholds"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
