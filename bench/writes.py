"""What the training thread waits for while a fit writes: checkpoint saves and the flush of MLflow's logging queue.

Checkpoints: for the default digits CNN, resnet18 and resnet50 (10 classes, with Adam's state, as a Lightning
checkpoint holds them), the time one save holds the training thread with the synchronous writer and with the
background writer visionflow uses (trainer.async_checkpoints: components/training/fit.py), medians over --saves
saves spaced as epochs would be. The background writer still spends the CPU time of writing, on another thread.

MLflow: the flush that ends a fit (Lightning's MLFlowLogger.finalize → set_terminated) after a few asynchronous
metric writes, with MLflow's default queue polling and with the buffering visionflow sets (ASYNC_LOGGING_ENV).

    python bench/writes.py [--saves 5] [--gap 1.0] [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from components.quiet import set_offline_defaults  # noqa: E402 - before mlflow

set_offline_defaults()
logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up lines

import torch  # noqa: E402
import torchvision  # noqa: E402
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from components.models import ModelSpec, build_model  # noqa: E402
from components.training.fit import ASYNC_LOGGING_ENV, WaitingAsyncCheckpointIO, async_logger  # noqa: E402


def models() -> dict[str, torch.nn.Module]:
    digits = build_model(ModelSpec(name="cnn", num_classes=10, in_channels=1, image_size=32))
    return {
        "digits CNN (default job)": digits,
        "resnet18": torchvision.models.resnet18(num_classes=10),
        "resnet50": torchvision.models.resnet50(num_classes=10),
    }


def checkpoint_of(model: torch.nn.Module, device: str) -> tuple[dict, float]:
    """A checkpoint as Lightning writes one (weights, Adam's two moments) after one step on `device`; returns it and
    its MiB."""
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters())
    channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    model(torch.randn(2, channels, 32, 32, device=device)).sum().backward()
    optimizer.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "epoch": 0}
    tensors = [*model.state_dict().values(), *(t for s in optimizer.state.values() for t in s.values())]
    return checkpoint, sum(t.numel() * t.element_size() for t in tensors) / 2**20


def stall(writer, checkpoint: dict, path: Path, saves: int, gap: float) -> tuple[float, float]:
    """(median seconds a save holds the caller, seconds the final wait for the writes takes)."""
    held = []
    for _ in range(saves):
        start = time.perf_counter()
        writer.save_checkpoint(checkpoint, path)
        held.append(time.perf_counter() - start)
        time.sleep(gap)  # the next epoch trains
    start = time.perf_counter()
    writer.teardown()
    return statistics.median(held), time.perf_counter() - start


def flush_seconds(work: Path, buffered: bool) -> float:
    """Seconds of the logger's finalize after five asynchronous metric writes (one per 0.3 s)."""
    from mlflow import MlflowClient

    for key in ASYNC_LOGGING_ENV:
        os.environ.pop(key, None)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("writes") or client.create_experiment("writes")
    experiment_id = getattr(experiment, "experiment_id", experiment)
    run_id = client.create_run(experiment_id).info.run_id
    logger = async_logger("writes", uri, run_id)
    if not buffered:
        for key in ASYNC_LOGGING_ENV:
            os.environ.pop(key, None)
    for step in range(5):
        logger.log_metrics({"val/acc": step / 5}, step)
        time.sleep(0.3)
    start = time.perf_counter()
    logger.finalize("success")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=5, help="Saves per model and writer (medians).")
    parser.add_argument("--gap", type=float, default=1.0, help="Seconds between saves (an epoch's training).")
    parser.add_argument("--device", default="cpu", help="Where the model and its optimizer state live (cpu, cuda).")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="visionflow-writes-"))
    console = Console()
    where = f"{os.cpu_count()} CPUs" + (f", tensors on {args.device}" if args.device != "cpu" else "")
    table = Table(title=f"checkpoint save: seconds the training thread waits ({where}, median)")
    for column in ("model", "MiB", "synchronous", "background (visionflow)", "ratio"):
        table.add_column(column)
    for name, model in models().items():
        checkpoint, mib = checkpoint_of(model, args.device)
        sync, _ = stall(TorchCheckpointIO(), checkpoint, work / "sync.ckpt", args.saves, args.gap)
        held, _ = stall(
            WaitingAsyncCheckpointIO(TorchCheckpointIO()), checkpoint, work / "bg.ckpt", args.saves, args.gap
        )
        table.add_row(name, f"{mib:.0f}", f"{sync:.3f}", f"{held:.3f}", f"{sync / held:.1f}×")
    console.print(table)
    flush = Table(title="end of a fit: MLflow logger finalize (flush + run end), seconds")
    for column in ("MLflow default (queue polled each 1 s)", "buffered (visionflow)"):
        flush.add_column(column)
    flush.add_row(f"{flush_seconds(work, False):.3f}", f"{flush_seconds(work, True):.3f}")
    console.print(flush)


if __name__ == "__main__":
    main()
