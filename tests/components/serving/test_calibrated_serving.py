"""The bundle's temperature (calibration.json) is what the server applies; a bundle without one serves T = 1."""

from __future__ import annotations

import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from components.bundle_format import BundleError, verify_bundle, write_checksums
from components.packaging.bundle import write_bundle
from components.packaging.model_card import model_card
from components.serving.app import create_app
from components.serving.predictor import Predictor, softmax
from tests.components.packaging.test_bundle import LABELS, preprocess_16, tiny_onnx_model
from tests.components.serving.test_serving import SETTINGS, _image, _LiveServer, _png

TEMPERATURE = 2.5


def _bundle(folder, onnx_path, calibration: dict | None):
    extra = {}
    if calibration is not None:
        (folder / "calibration.json").write_text(json.dumps(calibration))
        extra["calibration.json"] = folder / "calibration.json"
    card = model_card("shapes", "generated", "fp", {"train": 10, "val": 2, "test": 2}, {})
    return write_bundle(folder / "bundle", onnx_path, LABELS, preprocess_16()[1], {}, card, extra)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    return tiny_onnx_model(tmp_path_factory.mktemp("model") / "model.onnx", seed=5)


def test_the_server_returns_probabilities_with_the_bundle_temperature(tmp_path, onnx_file):
    calibrated = _bundle(tmp_path, onnx_file, {"temperature": TEMPERATURE, "ece_before": 0.2})
    (tmp_path / "old").mkdir()
    plain = _bundle(tmp_path / "old", onnx_file, None)  # a bundle written before calibration existed
    assert verify_bundle(calibrated)["temperature"] == TEMPERATURE and verify_bundle(plain)["temperature"] == 1.0

    image = _image(4)
    predictor = Predictor(calibrated)
    batch = predictor.preprocess_image(image)[None]
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
    np.testing.assert_allclose(predictor.probabilities(batch), softmax(logits / TEMPERATURE), rtol=1e-5)
    np.testing.assert_allclose(Predictor(plain).probabilities(batch), softmax(logits), rtol=1e-5)

    with _LiveServer(create_app(calibrated, SETTINGS)) as live, httpx.Client(base_url=live.url, timeout=20) as client:
        assert client.get("/metadata").json()["temperature"] == TEMPERATURE
        body = client.post("/predict?top_k=3", content=_png(image), headers={"Content-Type": "image/png"}).json()
    served = {p["label"]: p["probability"] for p in body["predictions"][0]}
    expected = softmax(logits / TEMPERATURE)[0]
    assert served == pytest.approx({label: float(p) for label, p in zip(LABELS, expected, strict=True)}, rel=1e-5)
    assert max(served.values()) < softmax(logits)[0].max()  # T > 1 softens the over-confident answer


@pytest.mark.parametrize("calibration", [{"temperature": 0}, {"temperature": "2"}, {"t": 1.0}, [2.0]])
def test_a_bundle_with_an_unusable_temperature_is_refused(tmp_path, onnx_file, calibration):
    bundle = _bundle(tmp_path, onnx_file, {"temperature": 1.5})
    (bundle / "calibration.json").write_text(json.dumps(calibration))
    write_checksums(bundle)  # a consistent bundle whose calibration.json says nothing usable
    with pytest.raises(BundleError, match="calibration.json: temperature"):
        verify_bundle(bundle)
