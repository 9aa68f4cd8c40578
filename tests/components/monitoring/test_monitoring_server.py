"""The server's monitoring over real HTTP: the bounded prediction log under a 2,000-request run,
failed requests logged by kind without their content, process CPU/memory in /metrics, stored images
only when enabled, and a log the monitor reads back as the reference's own distribution."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from components.bundle_format import verify_bundle
from components.config import MonitorParams
from components.monitoring.drift import compare_window
from components.monitoring.prediction_log import LOG_FILE, read_prediction_log
from components.monitoring.profile import read_reference_profile
from components.serving.app import ServeSettings, create_app
from tests.components.serving.test_serving import _LiveServer, _metrics
from tests.helpers.digits_bundle import digits_bundle, split

MAX_BYTES, MAX_FILES, REQUESTS = 80_000, 3, 2000
# The server runs in its own process: a uvicorn thread inside the pytest process answered ~8x slower
# here (threads of one interpreter contend for the GIL), which 2,000 requests would feel.
_LAUNCH = (
    "import sys; from components.serving.app import ServeSettings, serve; serve(sys.argv[1], "
    "ServeSettings.model_validate_json(sys.argv[2]))"
)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0], "L").save(buffer, "PNG")
    return buffer.getvalue()


class _ServerProcess:
    """`components.serving.app.serve` in a child process on a free loopback port."""

    def __init__(self, settings: ServeSettings):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        settings = settings.model_copy(update={"port": port})
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(digits_bundle()), settings.model_dump_json()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def __enter__(self) -> _ServerProcess:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"server did not start: {self.process.stderr.read().decode()[-2000:]}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.process.stderr.close()


@pytest.fixture(scope="module")
def logged_server(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("prediction-log")
    settings = ServeSettings(
        max_body_bytes=100_000,
        max_pixels=10_000,
        batch_timeout_ms=2,
        model_name="digits",
        model_version="3",
        prediction_log_dir=str(log_dir),
        prediction_log_max_bytes=MAX_BYTES,
        prediction_log_files=MAX_FILES,
    )
    with _ServerProcess(settings) as live:
        yield live, log_dir


def test_prediction_log_stays_bounded_over_2000_requests(logged_server):
    server, log_dir = logged_server
    images, _ = split("heldout")
    blobs = [_png(images[i % len(images)]) for i in range(REQUESTS)]

    def send(chunk: list[bytes]) -> list[str]:
        ids = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for blob in chunk:
                response = client.post("/predict", content=blob, headers={"content-type": "image/png"})
                assert response.status_code == 200, response.text
                body = response.json()
                assert len(body["ids"]) == 1 and body["model"]["version"] == "3"
                ids.extend(body["ids"])
        return ids

    with ThreadPoolExecutor(4) as pool:
        returned = [i for ids in pool.map(send, [blobs[k::4] for k in range(4)]) for i in ids]
    last = send([blobs[0]])[0]
    files = sorted(log_dir.iterdir())
    # ~430 bytes a record: 2,000 records overflow the 3 x 80 KB budget, so every backup slot is in use.
    assert [p.name for p in files] == [LOG_FILE, f"{LOG_FILE}.1", f"{LOG_FILE}.2"]
    assert all(p.stat().st_size < MAX_BYTES for p in files)
    contents = read_prediction_log(log_dir)
    assert contents.malformed_lines == 0
    records = [r for r in contents.records if r["event"] == "prediction"]
    # RotatingFileHandler rolls a file over before a record would take it to MAX_BYTES: each full file holds
    # within one record of the limit, and every line in the files is a prediction read back (none lost).
    lengths = [len(line) + 1 for path in files for line in path.read_bytes().splitlines()]
    rotated = [path for path in files if path.name != LOG_FILE]
    assert all(MAX_BYTES - max(lengths) <= path.stat().st_size < MAX_BYTES for path in rotated)
    assert len(records) == len(lengths) < REQUESTS  # the oldest were rotated out
    assert len(records) >= 2 * ((MAX_BYTES - max(lengths)) // max(lengths)) + 1
    assert records[-1]["id"] == last and {r["id"] for r in records} <= {*returned, last}
    sha = verify_bundle(digits_bundle())["files"]["model.onnx"]
    assert all(r["model_sha256"] == sha and r["version"] == "3" and "image_png_b64" not in r for r in records)
    # the served images are the held-out digits: the monitor finds the reference's own distribution
    report = compare_window(log_dir, read_reference_profile(digits_bundle()), MonitorParams(), sha)
    assert report.window.predictions == len(records)
    assert all(c.computed for c in report.checks) and not report.drift_detected, report.triggered


def test_failed_requests_are_counted_and_logged_without_content(logged_server):
    server, log_dir = logged_server
    secret = b"SECRET-PAYLOAD-1234567890" * 4
    big = np.zeros((200, 200, 1), np.uint8)  # 40,000 pixels > max_pixels 10,000
    with httpx.Client(base_url=server.url, timeout=30) as client:
        before = _metrics(client)
        assert client.post("/predict", content=secret, headers={"content-type": "image/png"}).status_code == 400
        assert client.post("/predict", content=_png(big), headers={"content-type": "image/png"}).status_code == 413
        assert client.post("/predict", content=b"", headers={"content-type": "image/png"}).status_code == 400
        after = _metrics(client)

    def delta(kind: str) -> float:
        key = ("visionflow_errors_total", (("kind", kind),))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("bad_input") == 2 and delta("too_large") == 1
    assert after[("process_resident_memory_bytes", ())] > 10_000_000
    assert after[("process_cpu_seconds_total", ())] > 0
    assert ("visionflow_request_latency_seconds_count", (("endpoint", "/predict"),)) in after
    errors = [r for r in read_prediction_log(log_dir).records if r["event"] == "error"][-3:]
    assert [(e["kind"], e["status"]) for e in errors] == [("bad_input", 400), ("too_large", 413), ("bad_input", 400)]
    assert errors[0]["reason"] == "not an image" and "too many pixels" in errors[1]["reason"]
    assert all(b"SECRET-PAYLOAD" not in p.read_bytes() for p in log_dir.iterdir())


def test_images_are_stored_only_when_enabled(tmp_path):
    settings = ServeSettings(prediction_log_dir=str(tmp_path), store_images=True)
    image = split("heldout")[0][0]
    with _LiveServer(create_app(digits_bundle(), settings)) as live:
        response = httpx.post(
            live.url + "/predict", content=_png(image), headers={"content-type": "image/png"}, timeout=30
        )
    assert response.status_code == 200
    (record,) = read_prediction_log(tmp_path).records
    assert record["id"] == response.json()["ids"][0]
    stored = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["image_png_b64"]))))
    assert np.array_equal(stored, image[:, :, 0])
