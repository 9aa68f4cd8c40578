"""Reading a visionflow checkpoint safely (torch.load with weights_only=True), with one-line refusals.

Apart from components.training.module (which imports Lightning) so that a command can check a checkpoint
before it starts anything, at the cost of importing torch alone.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from components.errors import CheckpointError


def read_checkpoint(path: str) -> dict[str, Any]:
    """torch.load(weights_only=True) of a Lightning checkpoint; CheckpointError (one line) for anything else."""

    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a visionflow checkpoint ({reason})")

    file = Path(path)
    if not file.is_file():
        raise refuse("a directory" if file.is_dir() else "no such file")
    if file.stat().st_size == 0:
        raise refuse("empty file")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if not found:
            raise refuse("not a PyTorch file") from None
        safe_loader = "the safe loader, torch.load(weights_only=True), refuses"
        raise refuse(f"it holds a Python object, {found.group(1)}, that {safe_loader}") from None
    except OSError as err:
        raise refuse(f"cannot read it: {err.strerror or err}") from None
    except Exception:  # the unpickler's KeyError / IndexError / EOFError, the zip reader's RuntimeError
        raise refuse("not a PyTorch file") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "spec" not in hparams or "classes" not in hparams:
        kind = "a Lightning checkpoint" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise refuse(f"{kind} without a visionflow model spec and classes")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise refuse("no state_dict")
    return ckpt


def check_checkpoint(checkpoint_path: str) -> None:
    """Raise CheckpointError (one line naming the file and why) unless the file is a visionflow checkpoint: the
    check a command makes before it starts anything."""
    read_checkpoint(checkpoint_path)
