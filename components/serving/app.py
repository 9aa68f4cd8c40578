"""The HTTP inference server: FastAPI + uvicorn over a verified bundle, onnxruntime inside.

POST /predict takes raw image bytes (Content-Type image/* or application/octet-stream) or
multipart/form-data with one or more files in fields "file" / "files". Concurrent requests are
batched: each decoded image goes to an asyncio queue; one worker task takes up to max_batch images
(waiting at most batch_timeout_ms after the first) and runs them as one onnxruntime call in a thread.
Bad input always gets a 4xx JSON {"error", "kind"}; the server keeps serving. GET /health, /ready,
/metadata and /metrics (Prometheus text, one registry per app, with the process's CPU and memory)
complete the API. With a prediction log folder set, every prediction (statistics, no image unless
store_images) and every failed request (kind and reason) is appended to a size-bounded JSON-lines log
that `visionflow monitor` compares with the bundle's reference profile; /predict then also returns
the ids of the logged predictions, which feedback CSVs refer to.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from components.errors import ImageDecodeError
from components.monitoring.image_stats import image_statistics, prediction_statistics
from components.monitoring.prediction_log import PredictionLog, new_record_id, utc_now
from components.packaging.bundle import MODEL_FILE
from components.serving.predictor import Predictor, top_k_predictions

logger = logging.getLogger(__name__)

_ENDPOINTS = ("/predict", "/health", "/ready", "/metadata", "/metrics")
_FILE_FIELDS = ("file", "files")


class ServeSettings(BaseModel):
    """Limits and batching of the model server (extra keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        "127.0.0.1", description="Interface to bind (loopback by default; put a proxy with auth in front to share)."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    max_body_bytes: int = Field(10_000_000, gt=0, description="Largest request body; larger gets 413.")
    max_pixels: int = Field(
        40_000_000,
        gt=0,
        description="Largest image (width x height, read from the header before decoding); larger gets 413.",
    )
    max_images: int = Field(32, ge=1, description="Most images in one request; more gets 413.")
    top_k: int = Field(
        3,
        ge=1,
        description="Labels returned per image (clipped to the number of labels); a request may ask fewer or more with ?top_k=.",
    )
    max_batch: int = Field(32, ge=1, description="Most images in one onnxruntime call (dynamic batching).")
    batch_timeout_ms: float = Field(
        5, ge=0, description="How long the batcher waits for more images after the first one."
    )
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (None = onnxruntime's default).")
    model_name: str | None = Field(
        None, description="Name shown by /metadata and /predict (default: the bundle folder's name)."
    )
    model_version: str | None = Field(
        None, description="Version shown by /metadata and /predict (e.g. the registry version)."
    )
    prediction_log_dir: str | None = Field(
        None, description="Folder of the prediction log read by `visionflow monitor` (None = no log)."
    )
    prediction_log_max_bytes: int = Field(
        10_000_000, ge=1024, description="Largest size of one prediction log file; the log rotates before passing it."
    )
    prediction_log_files: int = Field(
        5,
        ge=2,
        description="Most prediction log files kept (the current one included); the oldest is deleted on rotation.",
    )
    store_images: bool = Field(
        False,
        description="Also store each predicted image (PNG, base64) in the prediction log; off by default (privacy, size).",
    )


class RequestRejected(Exception):
    """A request refused with a 4xx status: the message is safe to return and to log."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass
class _Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    errors: Counter
    predictions: Counter
    confidence: Histogram
    batch_size: Histogram


def _make_metrics(max_batch: int) -> _Metrics:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
    batch_buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch} | {max_batch})
    return _Metrics(
        registry=registry,
        requests=Counter(
            "visionflow_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=registry,
        ),
        latency=Histogram(
            "visionflow_request_latency_seconds",
            "Request latency by endpoint.",
            ["endpoint"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        ),
        errors=Counter(
            "visionflow_errors",
            "Failed requests by kind (bad_input, too_large, model_failure, ...).",
            ["kind"],
            registry=registry,
        ),
        predictions=Counter("visionflow_predictions", "Top-1 predictions per class.", ["label"], registry=registry),
        confidence=Histogram(
            "visionflow_prediction_confidence",
            "Top-1 probability of each prediction.",
            registry=registry,
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
        ),
        batch_size=Histogram(
            "visionflow_batch_size",
            "Images per onnxruntime call (dynamic batching).",
            registry=registry,
            buckets=batch_buckets,
        ),
    )


@dataclass
class _Item:
    array: np.ndarray
    future: asyncio.Future


@dataclass
class _Upload:
    """One decoded upload: the model input, and (with a prediction log) its statistics and PNG."""

    array: np.ndarray
    stats: dict[str, float] | None = None
    png: bytes | None = None


@dataclass
class _State:
    predictor: Predictor
    settings: ServeSettings
    metrics: _Metrics
    model_info: dict[str, Any]
    prediction_log: PredictionLog | None = None
    queue: asyncio.Queue | None = None
    worker: asyncio.Task | None = None
    ready: bool = False


async def _collect(queue: asyncio.Queue, max_batch: int, timeout_s: float) -> list[_Item]:
    """Wait for one item, then gather more until max_batch or timeout_s after the first."""
    items = [await queue.get()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(items) < max_batch:
        try:
            items.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            items.append(await asyncio.wait_for(queue.get(), remaining))
        except TimeoutError:
            break
    return items


async def _batch_worker(state: _State) -> None:
    """Run queued images through the model in batches until cancelled."""
    settings = state.settings
    assert state.queue is not None
    while True:
        items = await _collect(state.queue, settings.max_batch, settings.batch_timeout_ms / 1000.0)
        items = [item for item in items if not item.future.done()]  # a cancelled request's images
        if not items:
            continue
        try:
            batch = np.stack([item.array for item in items])
            probabilities = await asyncio.to_thread(state.predictor.probabilities, batch)
        except asyncio.CancelledError:
            for item in items:
                if not item.future.done():
                    item.future.cancel()
            raise
        except Exception as err:  # the model failed on a well-formed batch: fail these requests, keep serving
            logger.error("model failure on a batch of %d images: %s", len(items), err)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(RequestRejected(500, "model_failure", "the model failed on this request"))
            continue
        state.metrics.batch_size.observe(len(items))
        for item, row in zip(items, probabilities, strict=False):
            if not item.future.done():
                item.future.set_result(row)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it (or its declared length) passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            raise RequestRejected(400, "bad_input", "invalid Content-Length") from None
        if declared_size > limit:
            raise RequestRejected(413, "too_large", f"body of {declared_size} bytes exceeds max_body_bytes {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestRejected(413, "too_large", f"body exceeds max_body_bytes {limit}")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestRejected(400, "bad_input", "client disconnected before the body was complete") from None
    return b"".join(chunks)


async def _form_files(request: Request, body: bytes, max_images: int) -> list[bytes]:
    """The uploaded files of a multipart body (fields "file" / "files"), in order."""

    async def stream():
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=max_images + 1, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        if "too many files" in str(err).lower():
            raise RequestRejected(413, "too_large", f"more than max_images {max_images} images") from None
        raise RequestRejected(400, "bad_input", f"malformed multipart body: {err}") from None
    try:
        uploads = [value for key, value in form.multi_items() if key in _FILE_FIELDS and isinstance(value, UploadFile)]
        if not uploads:
            raise RequestRejected(400, "bad_input", "no file in the form (send the image in field 'file' or 'files')")
        if len(uploads) > max_images:
            raise RequestRejected(413, "too_large", f"{len(uploads)} images exceed max_images {max_images}")
        return [await upload.read() for upload in uploads]
    finally:
        await form.close()


def _decode_and_preprocess(
    predictor: Predictor, blobs: list[bytes], describe: bool = False, keep_png: bool = False
) -> list[_Upload]:
    """Decode and preprocess each upload (with image statistics when `describe`, and the decoded
    image as PNG when `keep_png`); the first bad one refuses the whole request."""
    uploads = []
    for index, blob in enumerate(blobs, start=1):
        prefix = f"image {index}: " if len(blobs) > 1 else ""
        try:
            image = predictor.decode(blob)
        except ImageDecodeError as err:
            if err.reason.startswith("too many pixels"):
                raise RequestRejected(413, "too_large", prefix + err.reason) from None
            raise RequestRejected(400, "bad_input", prefix + err.reason) from None
        upload = _Upload(predictor.preprocess_image(image))
        if describe:
            upload.stats = image_statistics(image)
        if keep_png:
            import cv2

            upload.png = cv2.imencode(".png", image if image.shape[2] == 1 else image[:, :, ::-1])[1].tobytes()
        uploads.append(upload)
    return uploads


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "kind": kind}, status_code=status, headers=headers)


def create_app(bundle_dir: Path, settings: ServeSettings | None = None) -> FastAPI:
    """Build the FastAPI app over a bundle.

    Takes the bundle directory (verified and loaded now, so a bad bundle fails before serving: raises
    BundleError) and the ServeSettings (defaults when None). Returns the FastAPI app; its lifespan starts
    and stops the batching worker. `app.state.visionflow` holds the predictor and the metrics registry.
    """
    settings = settings or ServeSettings()
    bundle_dir = Path(bundle_dir)
    predictor = Predictor(bundle_dir, max_pixels=settings.max_pixels, threads=settings.threads)
    model_info = {"name": settings.model_name or bundle_dir.resolve().name, "version": settings.model_version}
    state = _State(
        predictor=predictor, settings=settings, metrics=_make_metrics(settings.max_batch), model_info=model_info
    )
    model_sha256 = predictor.files[MODEL_FILE]
    if settings.prediction_log_dir:
        state.prediction_log = PredictionLog(
            Path(settings.prediction_log_dir), settings.prediction_log_max_bytes, settings.prediction_log_files
        )

    def log_failure(kind: str, status: int, reason: str) -> None:
        if state.prediction_log is not None:
            state.prediction_log.append(
                {
                    "event": "error",
                    "id": new_record_id(),
                    "ts": utc_now(),
                    "kind": kind,
                    "status": status,
                    "reason": reason[:500],
                    "model": model_info["name"],
                    "version": model_info["version"],
                    "model_sha256": model_sha256,
                }
            )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.queue = asyncio.Queue()
        state.worker = asyncio.create_task(_batch_worker(state), name="visionflow-batcher")
        state.ready = True
        logger.info("serving %s (%d labels) from %s", model_info["name"], len(predictor.labels), bundle_dir)
        try:
            yield
        finally:
            state.ready = False
            state.worker.cancel()
            try:
                await state.worker
            except asyncio.CancelledError:
                pass
            if state.prediction_log is not None:
                state.prediction_log.close()

    app = FastAPI(title="visionflow model server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.visionflow = state
    metrics = state.metrics

    class CountRequests:
        """Pure ASGI middleware counting requests and their latency: Starlette's @app.middleware("http")
        (BaseHTTPMiddleware) costs about 0.25 ms of CPU per request, a fifth of the server's own work."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            start = time.perf_counter()
            status = 500

            async def send_noting_status(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, send_noting_status)
            finally:
                metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
                metrics.requests.labels(endpoint, str(status)).inc()

    app.add_middleware(CountRequests)

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, err: RequestRejected):
        metrics.errors.labels(err.kind).inc()
        log = logger.error if err.status >= 500 else logger.warning
        log("%s %s refused (%d %s): %s", request.method, request.url.path, err.status, err.kind, err.message)
        log_failure(err.kind, err.status, err.message)
        headers = {"Connection": "close"} if err.status == 413 else None
        return _error(err.status, err.kind, err.message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        metrics.errors.labels("bad_input").inc()
        logger.warning("%s %s refused (400 bad_input): %s", request.method, request.url.path, message)
        log_failure("bad_input", 400, message)
        return _error(400, "bad_input", message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found" if err.status_code == 404 else "bad_request"
        if err.status_code != 404:
            metrics.errors.labels(kind).inc()
            log_failure(kind, err.status_code, str(err.detail))
        return _error(err.status_code, kind, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        metrics.errors.labels("internal").inc()
        logger.exception("%s %s failed: %s", request.method, request.url.path, type(err).__name__)
        log_failure("internal", 500, type(err).__name__)
        return _error(500, "internal", "internal server error")

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None):
        """Raw image bytes or multipart files -> {"predictions": [[{"label", "probability"}, ...]], "model"}."""
        if top_k is not None and top_k < 1:
            raise RequestRejected(400, "bad_input", "top_k must be at least 1")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        is_form = content_type == "multipart/form-data"
        if not (is_form or content_type.startswith("image/") or content_type == "application/octet-stream"):
            raise RequestRejected(
                415,
                "bad_input",
                f"unsupported Content-Type {content_type or '(none)'!r}: send image/*, application/octet-stream or multipart/form-data",
            )
        body = await _read_body(request, settings.max_body_bytes)
        if not body:
            raise RequestRejected(400, "bad_input", "empty body")
        blobs = await _form_files(request, body, settings.max_images) if is_form else [body]
        logging_on = state.prediction_log is not None
        uploads = await asyncio.to_thread(
            _decode_and_preprocess, predictor, blobs, logging_on, logging_on and settings.store_images
        )

        assert state.queue is not None
        loop = asyncio.get_running_loop()
        items = [_Item(upload.array, loop.create_future()) for upload in uploads]
        for item in items:
            state.queue.put_nowait(item)
        try:
            rows = await asyncio.gather(*(item.future for item in items))
        except asyncio.CancelledError:
            for item in items:
                item.future.cancel()
            raise
        results = top_k_predictions(np.stack(rows), predictor.labels, top_k or settings.top_k)
        for result in results:
            metrics.predictions.labels(result[0]["label"]).inc()
            metrics.confidence.observe(result[0]["probability"])
        # A JSONResponse, not a dict: FastAPI's jsonable_encoder walk of every prediction cost ~20% of the
        # server's CPU per request (bench/serve.py).
        if state.prediction_log is None:
            return JSONResponse({"predictions": results, "model": model_info})
        ids = []
        for upload, row, result in zip(uploads, rows, results, strict=False):
            record = {
                "event": "prediction",
                "id": new_record_id(),
                "ts": utc_now(),
                "model": model_info["name"],
                "version": model_info["version"],
                "model_sha256": model_sha256,
                "predicted": result[0]["label"],
                **prediction_statistics(row),
                **(upload.stats or {}),
            }
            if upload.png is not None:
                record["image_png_b64"] = base64.b64encode(upload.png).decode()
            state.prediction_log.append(record)
            ids.append(record["id"])
        return JSONResponse({"predictions": results, "model": model_info, "ids": ids})

    @app.get("/health")
    async def health():
        """Liveness: {"status": "ok"} while the process serves."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: 200 once the model is loaded and the batcher runs, 503 before."""
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metadata")
    async def metadata():
        """Model name, version, labels, metrics.json, preprocess.json, input and limits."""
        return {
            **model_info,
            "labels": predictor.labels,
            "metrics": predictor.metrics,
            "preprocess": predictor.preprocess,
            "input": {"name": predictor.input_name, "shape": predictor.input_shape},
            "model_sha256": predictor.files.get("model.onnx"),
            "limits": {
                "max_body_bytes": settings.max_body_bytes,
                "max_pixels": settings.max_pixels,
                "max_images": settings.max_images,
                "max_batch": settings.max_batch,
            },
        }

    @app.get("/metrics")
    async def prometheus():
        """This app's metrics in Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(bundle_dir: Path, settings: ServeSettings | None = None) -> None:
    """Serve a bundle over HTTP until interrupted.

    Takes a bundle directory or a bundle .tar.gz (unpacked safely into a temporary folder for the
    server's lifetime) and the ServeSettings (loopback 127.0.0.1:8000 by default). Returns when uvicorn
    stops. Raises BundleError for a bundle that does not verify.
    """
    import uvicorn

    from components.packaging.bundle import unpack_bundle

    settings = settings or ServeSettings()
    bundle_dir = Path(bundle_dir)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it against the previous handler; with
    # Python's default handler the process would die before the unpacked bundle is removed.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with tempfile.TemporaryDirectory(prefix="visionflow-serve-") as scratch:
            if bundle_dir.is_file():
                bundle_dir = unpack_bundle(bundle_dir, Path(scratch))
            app = create_app(bundle_dir, settings)
            uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)
