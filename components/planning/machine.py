"""The machine facts a plan needs: accelerator, memory for activations, processes, cached pretrained weights."""

from __future__ import annotations

import os
import sys

from pydantic import BaseModel

from components.config import TORCHVISION_MODELS, TrainerParams


class Machine(BaseModel):
    """Where the training will run, as far as the plan cares."""

    accelerator: str  # cpu, cuda, mps
    memory_bytes: int  # per device: GPU memory, or the host memory available now on CPUs
    world_size: int = 1
    cached_weights: list[str] = []  # torchvision architectures whose pretrained weights are in the local cache


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _may_have_device() -> bool:
    """False only where no accelerator can answer: not macOS (MPS) and no NVIDIA (or ROCm) driver's device node."""
    device_nodes = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")
    return sys.platform == "darwin" or any(os.path.exists(node) for node in device_nodes)


def machine_of(trainer: TrainerParams) -> Machine:
    """The Machine the trainer params would train on (no device is initialised beyond CUDA's properties)."""
    from components.models.weights import cached_weights

    accelerator = {"gpu": "cuda"}.get(trainer.accelerator, trainer.accelerator)
    if accelerator == "auto" and not _may_have_device():
        accelerator = "cpu"
    memory = _host_available_bytes()
    if accelerator != "cpu":  # torch (3 s to import) only where a device may answer
        import torch

        if accelerator == "auto":  # Lightning's order: CUDA, then MPS, then CPU
            cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
            accelerator = "cuda" if cuda else "mps" if mps else "cpu"
        if accelerator == "cuda" and torch.cuda.is_available():
            memory = int(torch.cuda.get_device_properties(0).total_memory)
    devices = trainer.devices if isinstance(trainer.devices, int) else 1
    return Machine(
        accelerator=accelerator,
        memory_bytes=memory,
        world_size=devices * trainer.num_nodes,
        cached_weights=[name for name in TORCHVISION_MODELS if cached_weights(name)],
    )
