"""Training throughput on this machine's devices: the default job and a resnet18 at 224×224.

Each run goes through the real training entry point (`python -m components.training.fit SPEC`, what the train
task launches) with an MLflow run in a temporary store: first on one device, then, when the machine has several
GPUs, on all of them under DDP. Prints images/second (last epoch, all processes, validation excluded), GPU
utilisation sampled with nvidia-smi while training (mean / max), and peak GPU memory (torch, per process).

    python bench/train_devices.py               # on a GPU machine (bench/gpu.sh runs this)
    python bench/train_devices.py --cpu-smoke   # a tiny CPU run of the same code paths (1 process and DDP over 2)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from components.quiet import set_offline_defaults  # noqa: E402 - before prefect / mlflow / albumentations

set_offline_defaults()

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataloader import make_jpegs  # noqa: E402  (bench/dataloader.py)

from components import tracking  # noqa: E402
from components.config import load_params  # noqa: E402
from components.data.ingest import ingest  # noqa: E402
from components.data.validate import validate  # noqa: E402
from components.planning import plan_for_manifest  # noqa: E402
from components.training.fit import FitResult, FitSpec  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class GpuSampler:
    """nvidia-smi utilisation and memory samples every 500 ms on a thread, while in a `with` block."""

    def __init__(self):
        self.samples: list[tuple[int, float, float]] = []  # (gpu index, utilisation %, memory MiB)
        self.process = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=index,utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "500",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                index, util, memory = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((int(index), util, memory))

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def utilisation(self, gpus: int) -> str:
        """ "mean / max %" over the samples of the first `gpus` GPUs, or "n/a"."""
        values = [u for i, u, _ in self.samples if i < gpus]
        return f"{sum(values) / len(values):.0f} / {max(values):.0f} %" if values else "n/a"


def run_fit(name: str, overrides: list[str], work: Path, gpus: int) -> dict[str, str]:
    """Ingest, validate and train with `overrides` through the entry point; returns one table row."""
    params = load_params(None, overrides + [f"run.experiment=bench-{name}", f"run.cache_dir={work / 'cache'}"])
    snapshot = ingest(params.data, work / name / "snapshot", work / "cache")
    report = validate(snapshot, params.data, work / name / "data")
    params = plan_for_manifest(params, report.clean_manifest_path).params  # no `auto` reaches fit
    run_id = tracking.start_run(params.run.experiment, "train", {tracking.STAGE_TAG: "train"})
    spec = FitSpec(
        params=params,
        manifest_path=report.clean_manifest_path,
        classes=snapshot.classes,
        run_dir=str(work / name / "train"),
        result_path=str(work / name / "result.json"),
        mlflow_run_id=run_id,
        tracking_uri=tracking.tracking_uri(),
        progress_bar=False,
    )
    spec_path = work / name / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    start = time.perf_counter()
    with GpuSampler() as sampler:
        out = subprocess.run(
            [sys.executable, "-m", "components.training.fit", str(spec_path)], capture_output=True, text=True, cwd=REPO
        )
    wall = time.perf_counter() - start
    tracking.end_run(run_id, "FINISHED" if out.returncode == 0 else "FAILED")
    result_path = Path(spec.result_path)
    result = FitResult.model_validate_json(result_path.read_text()) if result_path.is_file() else None
    if out.returncode != 0 or result is None or result.error:
        print(out.stdout[-3000:], out.stderr[-3000:], sep="\n", file=sys.stderr)
        return {"run": name, "images/s": "FAILED", "wall s": f"{wall:.0f}"}
    metrics = result.final_metrics
    peak = metrics.get("perf/gpu_peak_mem_mb")
    return {
        "run": name,
        "processes": str(result.world_size),
        "precision": params.trainer.precision,
        "batch (effective)": f"{params.train.batch_size} ({result.effective_batch_size})",
        "images/s": f"{metrics.get('perf/train_images_per_sec', float('nan')):,.0f}",
        "GPU util mean / max": sampler.utilisation(gpus) if gpus else "n/a (CPU)",
        "peak GPU mem": f"{peak / 1024:.2f} GiB" if peak is not None else "n/a",
        "val acc": f"{result.best_val_acc:.3f}" if result.best_val_acc is not None else "n/a",
        "wall s": f"{wall:.0f}",
    }


def plans(args: argparse.Namespace, gpus: int, jpegs: Path) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every run: default and resnet18, on one device and (several GPUs / smoke) all under DDP."""
    common = ["train.early_stopping_patience=0", "train.progress_bar=false", f"train.max_epochs={args.epochs}"]
    if gpus:
        device = ["trainer.accelerator=gpu", f"trainer.precision={args.precision}"]
        multi = gpus if gpus > 1 else 0
    else:
        device = ["trainer.accelerator=cpu"]
        multi = 2 if args.cpu_smoke else 0
    default = [
        *common,
        *device,
        "data.path=bundled:digits",
        "data.channels=1",
        "augment.mean=[0.5]",
        "augment.std=[0.5]",
    ]
    side = 64 if args.cpu_smoke else 224
    resnet = [
        *common,
        *device,
        f"data.path={jpegs}",
        "model.name=resnet18",
        f"augment.image_size={side}",
        "augment.crop_scale_min=0.8",
        "augment.hflip_p=0.5",
        f"train.batch_size={args.batch_size}",
    ]
    runs = [
        ("default-1dev", [*default, "trainer.devices=1"]),
        (f"resnet18-{side}-1dev", [*resnet, "trainer.devices=1"]),
    ]
    if multi:
        ddp = [f"trainer.devices={multi}", "trainer.strategy=ddp"]
        runs += [(f"default-ddp{multi}", [*default, *ddp]), (f"resnet18-{side}-ddp{multi}", [*resnet, *ddp])]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run (no GPU needed) to check the script")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (3; 2 with --cpu-smoke)")
    parser.add_argument(
        "--images", type=int, default=None, help="generated 224×224 JPEGs for resnet18 (5000; 300 smoke)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="resnet18 batch size per process")
    parser.add_argument("--precision", default="bf16-mixed", help="trainer.precision on GPUs")
    args = parser.parse_args()
    args.epochs = args.epochs or (2 if args.cpu_smoke else 3)
    args.images = args.images or (300 if args.cpu_smoke else 5000)
    if args.cpu_smoke:
        args.batch_size = min(args.batch_size, 32)
    gpus = 0 if args.cpu_smoke else torch.cuda.device_count()
    if not gpus and not args.cpu_smoke:
        sys.exit("no CUDA GPU found: run on a GPU machine, or pass --cpu-smoke for a tiny CPU check")
    name = torch.cuda.get_device_name(0) if gpus else "CPU"
    rows = []
    with tempfile.TemporaryDirectory(prefix="visionflow-bench-devices-") as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        side = 64 if args.cpu_smoke else 224
        make_jpegs(work / "jpegs", args.images, side)
        for run_name, overrides in plans(args, gpus, work / "jpegs"):
            print(f"[bench] {run_name}", flush=True)
            rows.append(run_fit(run_name, overrides, work, gpus))
    table = Table(
        title=f"training throughput — {gpus or 'no'} GPU(s) ({name}), {os.cpu_count()} CPU(s), "
        f"{args.epochs} epochs, images/s of the last epoch"
    )
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        table.add_row(*(row.get(c, "") for c in columns))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
