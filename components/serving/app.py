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

The pieces: `limits.py` (error kinds, refusals, reading a request's images within the limits),
`batching.py` (the dynamic batcher), `metrics.py` (Prometheus registry and request-counting middleware),
`recording.py` (the prediction-log records); this module holds the settings, the error mapping, the
routes and `create_app` / `serve`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.bundle_format import MODEL_FILE
from components.monitoring.prediction_log import PredictionLog
from components.serving.batching import Batcher
from components.serving.limits import ErrorKind, RequestRejected, bad_input, decode_uploads, error_response, read_images
from components.serving.metrics import CountRequests, ServerMetrics, make_metrics
from components.serving.predictor import Predictor
from components.serving.recording import PredictionRecorder
from components.serving.settings import ServeSettings

logger = logging.getLogger(__name__)


@dataclass
class _State:
    """What the app's routes and handlers share (`app.state.visionflow`)."""

    predictor: Predictor
    settings: ServeSettings
    metrics: ServerMetrics
    model_info: dict[str, Any]
    bundle_dir: Path
    batcher: Batcher
    recorder: PredictionRecorder | None = None
    ready: bool = False

    def failed(self, kind: ErrorKind, status: int, reason: str) -> None:
        """Count a failed request and log it to the prediction log (when there is one)."""
        self.metrics.errors.labels(kind).inc()
        if self.recorder is not None:
            self.recorder.failure(kind, status, reason)


def _state(request: Request) -> _State:
    return request.app.state.visionflow


# Error mapping: every failure becomes {"error", "kind"} with a 4xx/5xx status, counted and logged.


async def _rejected(request: Request, err: RequestRejected) -> JSONResponse:
    _state(request).failed(err.kind, err.status, err.message)
    log = logger.error if err.status >= 500 else logger.warning
    log("%s %s refused (%d %s): %s", request.method, request.url.path, err.status, err.kind, err.message)
    headers = {"Connection": "close"} if err.status == 413 else None
    return error_response(err.status, err.kind, err.message, headers)


async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    _state(request).failed(ErrorKind.BAD_INPUT, 400, message)
    logger.warning("%s %s refused (400 bad_input): %s", request.method, request.url.path, message)
    return error_response(400, ErrorKind.BAD_INPUT, message)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = ErrorKind.NOT_FOUND if err.status_code == 404 else ErrorKind.BAD_REQUEST
    if err.status_code != 404:
        _state(request).failed(kind, err.status_code, str(err.detail))
    return error_response(err.status_code, kind, str(err.detail), getattr(err, "headers", None))


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    _state(request).failed(ErrorKind.INTERNAL, 500, type(err).__name__)
    logger.exception("%s %s failed: %s", request.method, request.url.path, type(err).__name__)
    return error_response(500, ErrorKind.INTERNAL, "internal server error")


_ERROR_HANDLERS = {
    RequestRejected: _rejected,
    RequestValidationError: _invalid,
    StarletteHTTPException: _http_error,
    Exception: _unexpected,
}

# Routes

router = APIRouter()


@router.post("/predict")
async def predict(request: Request, top_k: int | None = None) -> JSONResponse:
    """Raw image bytes or multipart files -> {"predictions": [[{"label", "probability"}, ...]], "model"}
    (and "ids" of the logged predictions when the prediction log is on). A multilabel bundle answers every
    label over its threshold ({"label", "probability", "threshold"}; top_k does not apply)."""
    state = _state(request)
    settings, predictor, recorder = state.settings, state.predictor, state.recorder
    if top_k is not None and top_k < 1:
        raise bad_input("top_k must be at least 1")
    blobs = await read_images(request, settings.max_body_bytes, settings.max_images)
    logging_on = recorder is not None
    uploads = await asyncio.to_thread(
        decode_uploads, predictor, blobs, logging_on, logging_on and settings.store_images
    )
    rows = await state.batcher.submit([upload.array for upload in uploads])
    results = predictor.answer(np.stack(rows), top_k or settings.top_k)  # multilabel: the labels over threshold
    state.metrics.count_predictions(results)
    # A JSONResponse, not a dict: FastAPI's jsonable_encoder walk of every prediction cost ~20% of the
    # server's CPU per request (bench/serve.py).
    body: dict[str, Any] = {"predictions": results, "model": state.model_info}
    if recorder is not None:
        body["ids"] = recorder.predictions(uploads, rows, results)
    return JSONResponse(body)


@router.get("/health")
async def health():
    """Liveness: {"status": "ok"} while the process serves."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """Readiness: 200 once the model is loaded and the batcher runs, 503 before."""
    if not _state(request).ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready"}


@router.get("/metadata")
async def metadata(request: Request):
    """Model name, version, labels, metrics.json, preprocess.json, the calibration temperature, input and limits."""
    state = _state(request)
    predictor, settings = state.predictor, state.settings
    return {
        **state.model_info,
        "labels": predictor.labels,
        "task": predictor.task,
        "thresholds": predictor.thresholds,
        "metrics": predictor.metrics,
        "preprocess": predictor.preprocess,
        "temperature": predictor.temperature,  # probabilities are softmax(logits / temperature)
        "input": {"name": predictor.input_name, "shape": predictor.input_shape},
        "model_sha256": predictor.files.get(MODEL_FILE),
        "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "max_pixels": settings.max_pixels,
            "max_images": settings.max_images,
            "max_batch": settings.max_batch,
        },
    }


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    """This app's metrics in Prometheus text format."""
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start the batcher (the app is ready from then on); stop it and close the prediction log at shutdown."""
    state: _State = app.state.visionflow
    state.batcher.start()
    state.ready = True
    name = state.model_info["name"]
    logger.info("serving %s (%d labels) from %s", name, len(state.predictor.labels), state.bundle_dir)
    try:
        yield
    finally:
        state.ready = False
        await state.batcher.stop()
        if state.recorder is not None:
            state.recorder.close()


def _new_state(bundle_dir: Path, settings: ServeSettings) -> _State:
    predictor = Predictor(bundle_dir, max_pixels=settings.max_pixels, threads=settings.threads)
    model_info = {"name": settings.model_name or bundle_dir.resolve().name, "version": settings.model_version}
    metrics = make_metrics(settings.max_batch)
    batcher = Batcher(
        predictor.probabilities, settings.max_batch, settings.batch_timeout_ms / 1000.0, metrics.batch_size.observe
    )
    state = _State(predictor, settings, metrics, model_info, bundle_dir, batcher)
    if settings.prediction_log_dir:
        log = PredictionLog(
            Path(settings.prediction_log_dir), settings.prediction_log_max_bytes, settings.prediction_log_files
        )
        multilabel = predictor.task == "multilabel"
        state.recorder = PredictionRecorder(log, model_info, predictor.files[MODEL_FILE], multilabel)
    return state


def create_app(bundle_dir: Path, settings: ServeSettings | None = None) -> FastAPI:
    """Build the FastAPI app over a bundle.

    Takes the bundle directory (verified and loaded now, so a bad bundle fails before serving: raises
    BundleError) and the ServeSettings (defaults when None). Returns the FastAPI app; its lifespan starts
    and stops the batching worker. `app.state.visionflow` holds the predictor and the metrics registry.
    """
    state = _new_state(Path(bundle_dir), settings or ServeSettings())
    app = FastAPI(
        title="visionflow model server",
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        exception_handlers=_ERROR_HANDLERS,
    )
    app.state.visionflow = state
    app.add_middleware(CountRequests, metrics=state.metrics)
    app.include_router(router)
    return app


def serve(bundle_dir: Path, settings: ServeSettings | None = None) -> None:
    """Serve a bundle over HTTP until interrupted.

    Takes a bundle directory or a bundle .tar.gz (unpacked safely into a temporary folder for the
    server's lifetime) and the ServeSettings (loopback 127.0.0.1:8000 by default). Returns when uvicorn
    stops. Raises BundleError for a bundle that does not verify.
    """
    import uvicorn

    from components.bundle_format import unpack_bundle

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
