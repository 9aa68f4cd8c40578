"""What the server writes to the prediction log: one record per prediction (statistics, the image only
when asked) and one per failed request (kind and reason), each with the same header built in one place."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from components.monitoring.image_stats import prediction_statistics
from components.monitoring.prediction_log import PredictionLog, new_record_id, utc_now
from components.serving.limits import ErrorKind, Upload

MAX_REASON_CHARS = 500


class PredictionRecorder:
    """Appends the server's records to a PredictionLog, each naming the model that served it."""

    def __init__(self, log: PredictionLog, model_info: dict[str, Any], model_sha256: str, multilabel: bool = False):
        self.multilabel = multilabel  # a multilabel model's record holds its label set in "predicted"
        self.log = log
        self.model_info = model_info
        self.model_sha256 = model_sha256

    def record(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        """A new record: event, a fresh id, the time, the model's name, version and SHA-256, then `fields`."""
        return {
            "event": event,
            "id": new_record_id(),
            "ts": utc_now(),
            "model": self.model_info["name"],
            "version": self.model_info["version"],
            "model_sha256": self.model_sha256,
            **fields,
        }

    def failure(self, kind: ErrorKind, status: int, reason: str) -> None:
        """Log a failed request (never image content: the reason is the refusal's message)."""
        self.log.append(self.record("error", {"kind": kind, "status": status, "reason": reason[:MAX_REASON_CHARS]}))

    def predictions(
        self, uploads: list[Upload], rows: list[np.ndarray], results: list[list[dict[str, Any]]]
    ) -> list[str]:
        """Log one record per predicted image; returns their ids (in order)."""
        ids = []
        for upload, row, result in zip(uploads, rows, results, strict=False):
            # multilabel: the labels over threshold joined by ';' ("" for none), as a manifest label cell
            predicted = ";".join(sorted(e["label"] for e in result)) if self.multilabel else result[0]["label"]
            fields = {"predicted": predicted, **prediction_statistics(row), **(upload.stats or {})}
            record = self.record("prediction", fields)
            if upload.png is not None:
                record["image_png_b64"] = base64.b64encode(upload.png).decode()
            self.log.append(record)
            ids.append(record["id"])
        return ids

    def close(self) -> None:
        self.log.close()
