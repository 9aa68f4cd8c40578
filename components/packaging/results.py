"""What the packaging stage hands on: a plain pydantic model, importable without torch (the pipeline's process reads
it back from the training process that packaged, flows/warm_start.call)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel


class PackagedModel(BaseModel):
    """The packaging result: bundle folder and archive, the ONNX file, parity figures, an input example."""

    model_config = {"arbitrary_types_allowed": True}

    bundle_dir: str
    archive: str
    onnx_path: str
    parity: dict[str, float]
    executorch_parity: dict[str, float] | None = None
    input_example: np.ndarray
