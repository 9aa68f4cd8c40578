"""The reference profile: how the packaged model sees its own held-out data, saved in the bundle as
reference_profile.json (listed in SHA256SUMS) so the monitor can compare live traffic with it.

The profile holds the predicted-class counts, the accuracy (when true labels were given) and, per
statistic of components.monitoring.image_stats, a sample of the values (at most max_samples, evenly
spaced), from which the monitor runs two-sample KS tests. It names the model it belongs to by the
SHA-256 of model.onnx.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from components.bundle_format import MODEL_FILE, verify_bundle, write_checksums
from components.errors import VisionflowError
from components.monitoring.image_stats import image_statistics, prediction_statistics

PROFILE_FILE = "reference_profile.json"
MAX_SAMPLES = 2000
_BATCH = 64


class ReferenceProfile(BaseModel):
    """Predictions and image statistics of the packaged model on its test split."""

    schema_version: Literal[1] = 1
    model_sha256: str = Field(description="SHA-256 of the model.onnx the profile was computed with.")
    labels: list[str] = Field(description="The model's labels, in output order.")
    num_images: int = Field(description="Images the profile was computed on.")
    predicted_counts: dict[str, int] = Field(
        description="Top-1 predictions per label (multilabel: images answered with the label, at its threshold)."
    )
    accuracy: float | None = Field(
        None,
        description="Top-1 accuracy (multilabel: exact match of the label set) on those images (None without labels).",
    )
    task: str = Field("single", description="The bundle's task: single or multilabel (label frequencies).")
    samples: dict[str, list[float]] = Field(description="Per statistic, a sample of its values (evenly spaced).")


def _thin(values: list[float], max_samples: int) -> list[float]:
    if len(values) <= max_samples:
        return [round(v, 6) for v in values]
    picks = np.linspace(0, len(values) - 1, max_samples).round().astype(int)
    return [round(values[i], 6) for i in picks]


def build_reference_profile(
    predictor, images: Iterable[np.ndarray], true_labels: Iterable[str] | None = None, max_samples: int = MAX_SAMPLES
) -> ReferenceProfile:
    """Run a bundle's model over held-out images and summarise what it saw.

    Takes a components.serving.predictor.Predictor, the decoded images (HxWxC uint8, streamed in
    batches of 64), optionally their true labels (same order) and the largest sample kept per
    statistic. Returns the ReferenceProfile. Raises VisionflowError when there are no images.
    """
    labels = list(predictor.labels)
    multilabel = getattr(predictor, "task", "single") == "multilabel"
    truth = iter(true_labels) if true_labels is not None else None
    counts = {label: 0 for label in labels}
    samples: dict[str, list[float]] = {}
    correct = total = 0

    def flush(batch: list[np.ndarray]) -> None:
        nonlocal correct, total
        probabilities = predictor.probabilities(np.stack([predictor.preprocess_image(image) for image in batch]))
        for image, row in zip(batch, probabilities, strict=False):
            predicted = predictor.predicted_cell(row)  # multilabel: "a;b" (labels over threshold), "" for none
            for label in predicted.split(";") if multilabel else [predicted]:
                if label:
                    counts[label] += 1
            for name, value in {**image_statistics(image), **prediction_statistics(row)}.items():
                samples.setdefault(name, []).append(value)
            if truth is not None:
                correct += int(next(truth) == predicted)
            total += 1

    batch: list[np.ndarray] = []
    for image in images:
        batch.append(image)
        if len(batch) == _BATCH:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if total == 0:
        raise VisionflowError("cannot build a reference profile from no images")
    return ReferenceProfile(
        model_sha256=predictor.files[MODEL_FILE],
        labels=labels,
        num_images=total,
        predicted_counts=counts,
        accuracy=correct / total if truth is not None else None,
        task="multilabel" if multilabel else "single",
        samples={name: _thin(values, max_samples) for name, values in samples.items()},
    )


def save_reference_profile(path: Path, profile: ReferenceProfile) -> Path:
    """Write the profile as JSON to `path` (e.g. an extra file for write_bundle); returns the path."""
    path = Path(path)
    path.write_text(profile.model_dump_json(indent=1) + "\n")
    return path


def write_reference_profile(bundle_dir: Path, profile: ReferenceProfile) -> Path:
    """Add (or replace) reference_profile.json in a bundle and re-list it in SHA256SUMS.

    Takes the bundle directory and the profile (it must belong to the bundle's model.onnx). Returns the
    profile's path. Raises BundleError when the bundle does not verify, VisionflowError on a mismatch.
    """
    bundle_dir = Path(bundle_dir)
    files = verify_bundle(bundle_dir)["files"]
    if files[MODEL_FILE] != profile.model_sha256:
        raise VisionflowError(f"the reference profile belongs to another model than {bundle_dir / MODEL_FILE}")
    path = save_reference_profile(bundle_dir / PROFILE_FILE, profile)
    write_checksums(bundle_dir)
    verify_bundle(bundle_dir)
    return path


def read_reference_profile(bundle_dir: Path) -> ReferenceProfile | None:
    """The reference profile of a verified bundle, or None when the bundle has none (older bundles).

    Takes the bundle directory (verify it first: this only reads the file). Raises VisionflowError when
    the file is there but unreadable.
    """
    path = Path(bundle_dir) / PROFILE_FILE
    if not path.is_file():
        return None
    try:
        return ReferenceProfile.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as err:
        raise VisionflowError(
            f"{PROFILE_FILE} in {bundle_dir} is not a valid reference profile: {str(err).splitlines()[0]}"
        ) from None
