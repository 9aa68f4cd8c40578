"""The devices a training run asks for, checked against the machine and the launcher before Lightning starts.

Lightning does the work (strategies, torchrun / SLURM environment detection); this module turns the requests
it would reject with a traceback, hang on, or silently change (fp16 on CPU becomes bf16) into one clear line,
and works out the effective batch size and the scaled learning rate.
"""

from __future__ import annotations

import math
import os

import torch
from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment
from pydantic import BaseModel

from components.config import PipelineParams, TrainerParams
from components.errors import TrainingError


class DevicePlan(BaseModel):
    """What the run will use: the resolved accelerator, processes per node, nodes, and the launcher found."""

    accelerator: str
    devices: int
    num_nodes: int
    launcher: str | None

    @property
    def world_size(self) -> int:
        """Training processes over all nodes."""
        return self.devices * self.num_nodes


def launcher_environment() -> str | None:
    """The multi-process launcher this process runs under: "torchrun", "slurm", "lsf", "manual" (MASTER_ADDR and
    NODE_RANK set by hand, Lightning's own multi-node convention) or None."""
    if TorchElasticEnvironment.detect():
        return "torchrun"
    if SLURMEnvironment.detect():
        return "slurm"
    if LSFEnvironment.detect():
        return "lsf"
    if "MASTER_ADDR" in os.environ and "NODE_RANK" in os.environ:
        return "manual"
    return None


def resolve_accelerator(accelerator: str) -> str:
    """ "cuda", "mps" or "cpu" for a TrainerParams.accelerator ("auto" and "gpu" pick what the machine has)."""
    if accelerator in ("auto", "gpu"):
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu" if accelerator == "auto" else "cuda"  # "gpu" without one: refused by plan_devices
    return accelerator


def _available(accelerator: str) -> int:
    if accelerator == "cuda":
        return torch.cuda.device_count()
    if accelerator == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _launched_processes_per_node(launcher: str | None) -> int | None:
    if launcher == "torchrun":
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if launcher == "slurm" and "SLURM_NTASKS_PER_NODE" in os.environ:
        return int(os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0])
    return None


def plan_devices(trainer: TrainerParams) -> DevicePlan:
    """Check the trainer params against this machine and launcher; returns the DevicePlan.

    Raises TrainingError (one line) for: a GPU accelerator without GPUs, more devices than the machine has,
    fsdp or 16-mixed without a GPU, bf16-mixed on a GPU without bfloat16, num_nodes > 1 without a launcher,
    and a launcher whose process count differs from devices × num_nodes. Under torchrun / SLURM,
    devices "auto" means the processes the launcher started on this node.
    """
    accelerator = resolve_accelerator(trainer.accelerator)
    available = _available(accelerator)
    if accelerator in ("cuda", "mps") and available == 0:
        raise TrainingError(
            f"trainer.accelerator is {trainer.accelerator} but this machine has no GPU (use cpu or auto)"
        )
    launcher = launcher_environment()
    launched = _launched_processes_per_node(launcher)
    if trainer.devices == "auto":
        devices = launched or (available if accelerator == "cuda" else 1)
    else:
        devices = trainer.devices
    unit = "GPU(s)" if accelerator in ("cuda", "mps") else "CPU core(s) available to this process"
    if devices > available:
        raise TrainingError(f"trainer.devices is {devices} but this machine has {available} {unit}")
    if trainer.strategy == "fsdp" and accelerator != "cuda":
        raise TrainingError(f"trainer.strategy fsdp needs CUDA GPUs but training would run on {accelerator}; use ddp")
    if trainer.precision == "16-mixed" and accelerator == "cpu":
        raise TrainingError(
            "trainer.precision 16-mixed needs a GPU (Lightning would silently use bf16 on CPU); "
            "use bf16-mixed or 32-true"
        )
    if trainer.precision == "bf16-mixed" and accelerator == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("trainer.precision bf16-mixed: this GPU has no bfloat16 support; use 16-mixed")
    if trainer.num_nodes > 1 and launcher is None:
        raise TrainingError(
            f"trainer.num_nodes is {trainer.num_nodes} but no launcher environment was found: start the training "
            f"under torchrun (--nnodes {trainer.num_nodes} --nproc-per-node {devices}) or SLURM (srun), see the README"
        )
    if launcher in ("torchrun", "slurm"):
        world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or devices * trainer.num_nodes)
        if launched is not None and launched != devices or world != devices * trainer.num_nodes:
            raise TrainingError(
                f"{launcher} started {world} process(es) ({launched or '?'} per node) but trainer.devices × "
                f"trainer.num_nodes is {devices} × {trainer.num_nodes}: set trainer.devices={launched or devices} "
                f"trainer.num_nodes={max(1, world // max(1, launched or devices))}"
            )
    return DevicePlan(accelerator=accelerator, devices=devices, num_nodes=trainer.num_nodes, launcher=launcher)


def effective_batch_size(params: PipelineParams, plan: DevicePlan, accumulate: int) -> int:
    """Images per optimizer step: batch_size × processes over all nodes × accumulated batches."""
    return params.train.batch_size * plan.world_size * accumulate


def scaled_lr(params: PipelineParams, effective_batch: int) -> float:
    """train.lr scaled by train.lr_scaling: linear (× effective / base), sqrt (× √(effective / base)) or none."""
    ratio = effective_batch / params.train.lr_base_batch_size
    if params.train.lr_scaling == "linear":
        return params.train.lr * ratio
    if params.train.lr_scaling == "sqrt":
        return params.train.lr * math.sqrt(ratio)
    return params.train.lr
