"""The model server over real HTTP on loopback: a real uvicorn, a real onnxruntime session, httpx clients."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from components.bundle_format import BundleError
from components.data.augment import build_eval_transform
from components.errors import ImageDecodeError
from components.packaging.bundle import write_bundle
from components.packaging.model_card import model_card
from components.serving.app import ServeSettings, create_app
from components.serving.predictor import Predictor, decode_image_bytes
from tests.components.packaging.test_bundle import LABELS, preprocess_16, tiny_onnx_model
from tests.helpers.bad_images import png_with_declared_size

SETTINGS = ServeSettings(
    max_body_bytes=300_000,
    max_pixels=1_000_000,
    max_images=4,
    top_k=3,
    max_batch=32,
    batch_timeout_ms=50,
    model_name="shapes",
    model_version="7",
)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _image(seed: int, size: tuple[int, int] = (30, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serving")
    # 5 output columns for 3 labels: a multi-task model whose primary task comes first
    onnx_path = tiny_onnx_model(folder / "model.onnx", outputs=5, seed=3)
    metrics = {"accuracy": 0.93}
    card = model_card("shapes", "generated", "fp", {"train": 10, "val": 2, "test": 2}, metrics)
    return write_bundle(folder / "bundle", onnx_path, LABELS, preprocess_16()[1], metrics, card)


class _LiveServer:
    """uvicorn serving an app on a free loopback port in a background thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("server did not become ready within 20 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="module")
def server(bundle):
    with _LiveServer(create_app(bundle, SETTINGS)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=20) as c:
        yield c


def _metrics(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _check_predictions(predictions: list[dict], k: int) -> None:
    assert len(predictions) == k
    assert {p["label"] for p in predictions} <= set(LABELS)
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0 <= p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6


def test_health_ready_metadata(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    meta = client.get("/metadata").json()
    assert meta["name"] == "shapes" and meta["version"] == "7"
    assert meta["labels"] == LABELS and meta["metrics"] == {"accuracy": 0.93}
    assert meta["preprocess"] == preprocess_16()[1]
    assert len(meta["model_sha256"]) == 64


def test_predict_raw_png(client):
    response = client.post("/predict", content=_png(_image(1)), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "shapes", "version": "7"}
    assert len(body["predictions"]) == 1
    _check_predictions(body["predictions"][0], 3)
    octet = client.post(
        "/predict?top_k=2", content=_png(_image(1)), headers={"Content-Type": "application/octet-stream"}
    )
    assert octet.status_code == 200
    _check_predictions(octet.json()["predictions"][0], 2)
    assert octet.json()["predictions"][0] == body["predictions"][0][:2]


def test_predict_multipart(client):
    files = [("files", (f"{i}.png", _png(_image(i)), "image/png")) for i in range(3)]
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    for p in predictions:
        _check_predictions(p, 3)
    single = client.post("/predict", files={"file": ("a.png", _png(_image(0)), "image/png")})
    assert single.status_code == 200
    assert single.json()["predictions"][0] == predictions[0]


@pytest.mark.filterwarnings("error::UserWarning")
def test_predictor_matches_training_eval_transform(bundle, client):
    """preprocess.json + the Predictor reproduce albumentations' eval transform, through to the probabilities."""
    params, _spec = preprocess_16()
    transform = build_eval_transform(params)
    predictor = Predictor(bundle)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    for seed, size in ((11, (30, 40)), (12, (16, 16)), (13, (9, 57))):
        image = _image(seed, size)
        expected_input = transform(image=image)["image"].numpy()[None]
        np.testing.assert_allclose(predictor.preprocess_image(image)[None], expected_input, atol=1e-5)
        logits = session.run(None, {"image": expected_input})[0][:, : len(LABELS)]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected = exp / exp.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(
            predictor.probabilities(predictor.preprocess_image(image)[None]), expected, atol=1e-4
        )
        top = predictor.predict([image], top_k=3)[0]
        for entry in top:
            assert entry["probability"] == pytest.approx(expected[0, LABELS.index(entry["label"])], abs=1e-4)
        over_http = client.post("/predict", content=_png(image), headers={"Content-Type": "image/png"}).json()
        for entry in over_http["predictions"][0]:
            assert entry["probability"] == pytest.approx(expected[0, LABELS.index(entry["label"])], abs=1e-4)


def test_decode_image_bytes_reasons():
    good = _png(_image(0))
    assert decode_image_bytes(good, 3, 1_000_000).shape == (30, 40, 3)
    assert decode_image_bytes(good, 1, 1_000_000).shape == (30, 40, 1)
    cases = {
        b"": "empty file",
        b"hello, I am text\n": "not an image",
        good[: len(good) // 2]: "truncated",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_image_bytes(data, 3, 1_000_000)
        assert info.value.reason == reason and info.value.path == "upload"
    with pytest.raises(ImageDecodeError, match=r"too many pixels \(2000×2000"):
        decode_image_bytes(png_with_declared_size(2000, 2000), 3, 1_000_000)


def test_bad_requests_get_4xx_and_server_keeps_serving(client, caplog):
    before = _metrics(client)
    png = _png(_image(5))
    raw = {"Content-Type": "image/png"}

    def chunked(data: bytes, size: int = 65536):
        for i in range(0, len(data), size):
            yield data[i : i + size]

    bad = [
        ("empty body", 400, "bad_input", dict(content=b"", headers=raw)),
        ("text", 400, "bad_input", dict(content=b"this is not an image at all", headers=raw)),
        ("truncated", 400, "bad_input", dict(content=png[: len(png) // 2], headers=raw)),
        ("declared 2000x2000", 413, "too_large", dict(content=png_with_declared_size(2000, 2000), headers=raw)),
        ("body over limit", 413, "too_large", dict(content=b"\x89PNG" + b"\0" * 400_000, headers=raw)),
        ("chunked body over limit", 413, "too_large", dict(content=chunked(b"\0" * 400_000), headers=raw)),
        (
            "too many images",
            413,
            "too_large",
            dict(files=[("files", (f"{i}.png", png, "image/png")) for i in range(5)]),
        ),
        ("empty file part", 400, "bad_input", dict(files={"file": ("a.png", b"", "image/png")})),
        (
            "one bad part",
            400,
            "bad_input",
            dict(files=[("files", ("a.png", png, "image/png")), ("files", ("b.png", b"junk", "image/png"))]),
        ),
        ("wrong field", 400, "bad_input", dict(files={"image": ("a.png", png, "image/png")})),
        ("unsupported type", 415, "bad_input", dict(content=png, headers={"Content-Type": "text/plain"})),
        ("bad top_k", 400, "bad_input", dict(content=png, headers=raw, params={"top_k": "many"})),
    ]
    expected_errors: dict[str, int] = {}
    expected_status: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="components.serving.app"):
        for name, status, kind, kwargs in bad:
            # a fresh connection per request: a 413 closes its connection without reading the body
            with httpx.Client(base_url=client.base_url, timeout=20) as fresh:
                response = fresh.post("/predict", **kwargs)
            assert response.status_code == status, (name, response.text)
            body = response.json()
            assert body["kind"] == kind and body["error"], name
            expected_errors[kind] = expected_errors.get(kind, 0) + 1
            expected_status[str(status)] = expected_status.get(str(status), 0) + 1
            assert client.get("/health").status_code == 200, f"server unhealthy after {name}"
    reasons = [r.getMessage() for r in caplog.records]
    assert any("not an image" in m for m in reasons) and any("truncated" in m for m in reasons)
    assert not any("PNG" in m or "\\x" in m for m in reasons)  # reasons only, never image content
    assert client.get("/health").json() == {"status": "ok"}
    assert client.post("/predict", content=png, headers=raw).status_code == 200

    after = _metrics(client)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for kind, count in expected_errors.items():
        assert delta("visionflow_errors_total", kind=kind) == count, kind
    for status, count in expected_status.items():
        assert delta("visionflow_requests_total", endpoint="/predict", status=status) == count, status
    assert delta("visionflow_requests_total", endpoint="/predict", status="200") == 1
    assert delta("visionflow_requests_total", endpoint="/health", status="200") == len(bad) + 1
    assert delta("visionflow_request_latency_seconds_count", endpoint="/predict") == len(bad) + 1
    assert sum(delta("visionflow_predictions_total", label=label) for label in LABELS) == 1
    assert delta("visionflow_prediction_confidence_count") == 1


def test_concurrent_requests_are_batched(client):
    before = _metrics(client)
    images = [_png(_image(100 + i)) for i in range(20)]
    barrier = threading.Barrier(20, timeout=10)

    def call(data: bytes) -> httpx.Response:
        with httpx.Client(base_url=client.base_url, timeout=30) as own:
            barrier.wait()
            return own.post("/predict", content=data, headers={"Content-Type": "image/png"})

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(call, images))
    assert [r.status_code for r in responses] == [200] * 20
    for response in responses:
        _check_predictions(response.json()["predictions"][0], 3)

    after = _metrics(client)
    batches = after[("visionflow_batch_size_count", ())] - before.get(("visionflow_batch_size_count", ()), 0)
    images_run = after[("visionflow_batch_size_sum", ())] - before.get(("visionflow_batch_size_sum", ()), 0)
    singles = after[("visionflow_batch_size_bucket", (("le", "1.0"),))] - before.get(
        ("visionflow_batch_size_bucket", (("le", "1.0"),)), 0
    )
    assert images_run == 20
    assert batches < 20 and singles < batches, "no batch held more than one image"


def test_500_concurrent_requests_from_8_clients_complete_with_no_error(bundle):
    """8 keep-alive clients, 500 requests over real HTTP: every answer is a 200 and belongs to its own image."""
    clients, total = 8, 500
    # max_batch = number of clients: a full batch runs at once instead of waiting out the batch timeout
    settings = SETTINGS.model_copy(update={"max_batch": clients, "batch_timeout_ms": 20})
    pngs = [_png(_image(200 + i, (20 + i, 24))) for i in range(16)]
    predictor = Predictor(bundle)
    expected = [predictor.predict([predictor.decode(png)], top_k=3)[0] for png in pngs]
    with _LiveServer(create_app(bundle, settings)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        answers, before, after = _load(client, pngs, clients, total)
    assert len(answers) == total
    failures = [(n, status, body) for n, status, body in answers if status != 200]
    assert not failures, failures[:3]
    for n, _, body in answers:
        predictions = body["predictions"][0]
        want = expected[n % len(pngs)]
        assert [p["label"] for p in predictions] == [p["label"] for p in want], n
        assert [p["probability"] for p in predictions] == pytest.approx([p["probability"] for p in want], abs=1e-5)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("visionflow_requests_total", endpoint="/predict", status="200") == total
    assert delta("visionflow_batch_size_sum") == total
    assert delta("visionflow_batch_size_count") < total  # batched, not one call per request
    assert not any(k[0] == "visionflow_errors_total" and after[k] != before.get(k, 0.0) for k in after)


def _load(client: httpx.Client, pngs: list[bytes], clients: int, total: int):
    """Send `total` requests from `clients` threads (request n carries pngs[n % len]); returns (answers,
    metrics before, after)."""
    before = _metrics(client)
    barrier = threading.Barrier(clients, timeout=10)

    def worker(index: int) -> list[tuple[int, int, dict | str]]:
        answers = []
        with httpx.Client(base_url=client.base_url, timeout=30) as own:
            barrier.wait()
            for n in range(index, total, clients):
                response = own.post("/predict", content=pngs[n % len(pngs)], headers={"Content-Type": "image/png"})
                answers.append(
                    (n, response.status_code, response.json() if response.status_code == 200 else response.text)
                )
        return answers

    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = [a for batch in pool.map(worker, range(clients)) for a in batch]
    return answers, before, _metrics(client)


def test_tampered_bundle_is_not_served(bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "labels.json").write_text('["a", "b", "c"]\n')
    with pytest.raises(BundleError, match="checksum mismatch: labels.json"):
        create_app(copy, SETTINGS)
