"""What the server accepts: error kinds, the refusal every bad request becomes, and reading a request's
images within the limits (body size, images per request, pixels per image) before any model work."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from components.errors import ImageDecodeError, ImageTooLargeError
from components.monitoring.image_stats import image_statistics
from components.serving.predictor import Predictor

FILE_FIELDS = ("file", "files")
IMAGE_CONTENT_TYPES = ("application/octet-stream",)  # besides image/*
FORM_CONTENT_TYPE = "multipart/form-data"


class ErrorKind(StrEnum):
    """The `kind` of an error response, of a logged failure and of the visionflow_errors metric."""

    BAD_INPUT = "bad_input"
    TOO_LARGE = "too_large"
    MODEL_FAILURE = "model_failure"
    NOT_FOUND = "not_found"
    BAD_REQUEST = "bad_request"
    INTERNAL = "internal"


class RequestRejected(Exception):
    """A request refused with a 4xx (or 500 model_failure) status: the message is safe to return and to log."""

    def __init__(self, status: int, kind: ErrorKind, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def bad_input(message: str, status: int = 400) -> RequestRejected:
    return RequestRejected(status, ErrorKind.BAD_INPUT, message)


def too_large(message: str) -> RequestRejected:
    return RequestRejected(413, ErrorKind.TOO_LARGE, message)


def error_response(status: int, kind: ErrorKind, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON body of every error: {"error": message, "kind": kind}."""
    return JSONResponse({"error": message, "kind": kind}, status_code=status, headers=headers)


@dataclass
class Upload:
    """One decoded upload: the model input, and (with a prediction log) its statistics and PNG."""

    array: np.ndarray
    stats: dict[str, float] | None = None
    png: bytes | None = None


async def read_images(request: Request, max_body_bytes: int, max_images: int) -> list[bytes]:
    """The image files of a /predict request: its raw body, or the files of a multipart form.

    Refuses (RequestRejected) an unsupported Content-Type (415), a body past `max_body_bytes` or more
    than `max_images` files (413), and an empty body or form without a file (400).
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_form = content_type == FORM_CONTENT_TYPE
    if not (is_form or content_type.startswith("image/") or content_type in IMAGE_CONTENT_TYPES):
        raise bad_input(
            f"unsupported Content-Type {content_type or '(none)'!r}: "
            "send image/*, application/octet-stream or multipart/form-data",
            status=415,
        )
    body = await _read_body(request, max_body_bytes)
    if not body:
        raise bad_input("empty body")
    return await _form_files(request, body, max_images) if is_form else [body]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it (or its declared length) passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            raise bad_input("invalid Content-Length") from None
        if declared_size > limit:
            raise too_large(f"body of {declared_size} bytes exceeds max_body_bytes {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"body exceeds max_body_bytes {limit}")
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_input("client disconnected before the body was complete") from None
    return b"".join(chunks)


async def _form_files(request: Request, body: bytes, max_images: int) -> list[bytes]:
    """The uploaded files of a multipart body (fields "file" / "files"), in order."""

    async def stream():
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=max_images + 1, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        if "too many files" in str(err).lower():  # Starlette's own message for passing max_files
            raise too_large(f"more than max_images {max_images} images") from None
        raise bad_input(f"malformed multipart body: {err}") from None
    try:
        uploads = [value for key, value in form.multi_items() if key in FILE_FIELDS and isinstance(value, UploadFile)]
        if not uploads:
            raise bad_input("no file in the form (send the image in field 'file' or 'files')")
        if len(uploads) > max_images:
            raise too_large(f"{len(uploads)} images exceed max_images {max_images}")
        return [await upload.read() for upload in uploads]
    finally:
        await form.close()


def decode_uploads(
    predictor: Predictor, blobs: list[bytes], describe: bool = False, keep_png: bool = False
) -> list[Upload]:
    """Decode and preprocess each upload (with image statistics when `describe`, and the decoded
    image as PNG when `keep_png`); the first bad one refuses the whole request (413 for too many
    pixels, 400 otherwise)."""
    uploads = []
    for index, blob in enumerate(blobs, start=1):
        prefix = f"image {index}: " if len(blobs) > 1 else ""
        try:
            image = predictor.decode(blob)
        except ImageTooLargeError as err:
            raise too_large(prefix + err.reason) from None
        except ImageDecodeError as err:
            raise bad_input(prefix + err.reason) from None
        upload = Upload(predictor.preprocess_image(image))
        if describe:
            upload.stats = image_statistics(image)
        if keep_png:
            import cv2

            upload.png = cv2.imencode(".png", image if image.shape[2] == 1 else image[:, :, ::-1])[1].tobytes()
        uploads.append(upload)
    return uploads
