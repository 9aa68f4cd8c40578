"""Suspicious labels on the bundled digits with labels flipped on purpose: how many does the ranking find, at what cost.

The digits go through ingest, validate and the plan as a pipeline run does (params/default.yaml); then a seeded
5% of the train split's rows get another class in the clean manifest (the images are untouched) and the training
entry point (`python -m components.training.fit SPEC`) trains on them. Its suspicious-label ranking (area under
the margin, train.suspicious_labels) is scored against the flipped set: precision and recall of the top k and top
2k (k = the number flipped), and of the rows it flags (AUM and last epoch's margin below 0). A random ranking's
precision is the flip rate. The cost: the seconds the training process spent recording margins and writing the
ranking (timed inside it, so a busy machine does not blur it), beside the training's wall time and that of the same
training with train.suspicious_labels off. One more training with mixup on half the batches shows the ranking from
the unmixed half.

    python bench/label_noise.py                    # 10 epochs, 5% flipped, seed 0
    python bench/label_noise.py --max-epochs 20 --noise 0.1 --seed 1
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from components.quiet import set_offline_defaults  # noqa: E402 - before prefect / mlflow / albumentations

set_offline_defaults()

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from components.config import load_params  # noqa: E402
from components.data.ingest import ingest, read_manifest  # noqa: E402
from components.data.validate import validate  # noqa: E402
from components.planning import plan_for_manifest  # noqa: E402
from components.training.fit import FitResult, FitSpec  # noqa: E402

JOBS = {  # job -> train params it changes
    "AUM": {"suspicious_labels": True},
    "AUM, mixup on half the batches": {"suspicious_labels": True, "mixup_p": 0.5},
    "off (cost reference)": {"suspicious_labels": False},
}


def flip_labels(manifest: Path, rate: float, seed: int) -> set[str]:
    """Give a seeded `rate` share of the manifest's train rows another class, in place; returns their paths."""
    rows = read_manifest(str(manifest))
    classes = sorted({row["label"] for row in rows})
    train = [row for row in rows if row["split"] == "train"]
    rng = random.Random(seed)
    flipped = rng.sample(train, round(rate * len(train)))
    for row in flipped:
        row["label"] = rng.choice([c for c in classes if c != row["label"]])
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {row["path"] for row in flipped}


def prepare(work: Path, args: argparse.Namespace) -> tuple[FitSpec, set[str], int]:
    """Ingest, validate and plan the digits, flip the labels; returns (spec without a run, flipped paths, train)."""
    overrides = [
        f"run.cache_dir={work / 'cache'}",
        f"train.max_epochs={args.max_epochs}",
        "train.progress_bar=false",
        "train.num_workers=0",
        f"train.seed={args.seed}",
    ]
    params = load_params(str(REPO / "params" / "default.yaml"), overrides)
    snapshot = ingest(params.data, work / "snapshot", work / "cache")
    report = validate(snapshot, params.data, work / "data")
    params = plan_for_manifest(params, report.clean_manifest_path).params
    flipped = flip_labels(Path(report.clean_manifest_path), args.noise, args.seed)
    train = sum(1 for row in read_manifest(report.clean_manifest_path) if row["split"] == "train")
    spec = FitSpec(
        params=params,
        manifest_path=report.clean_manifest_path,
        classes=snapshot.classes,
        run_dir="",
        result_path="",
        progress_bar=False,
    )
    return spec, flipped, train


def run_job(spec: FitSpec, train: dict, out: Path, top_k: int) -> tuple[FitResult, float]:
    """Train with the changed train params in the training entry point's own process; returns its result and
    wall seconds."""
    changed = spec.params.train.model_copy(update={**train, "suspicious_top_k": top_k})
    params = spec.params.model_copy(update={"train": changed})
    out.mkdir(parents=True)
    job = spec.model_copy(update={"params": params, "run_dir": str(out), "result_path": str(out / "result.json")})
    (out / "spec.json").write_text(job.model_dump_json())
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "components.training.fit", str(out / "spec.json")], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode or not (out / "result.json").is_file():
        raise SystemExit(f"training failed ({train}): {done.stderr[-2000:]}")
    return FitResult.model_validate_json((out / "result.json").read_text()), seconds


def scores(csv_path: str, flipped: set[str], k: int) -> dict[str, str]:
    """Precision and recall of the ranking's top k, top 2k and flagged rows against the flipped set."""
    ranked = list(csv.DictReader(Path(csv_path).read_text().splitlines()))
    found: dict[str, str] = {}
    picks = {"k": ranked[:k], "2k": ranked[: 2 * k], "flagged": [row for row in ranked if row["flagged"] == "True"]}
    for name, rows in picks.items():
        hits = sum(1 for row in rows if row["path"] in flipped)
        found[f"P@{name}"] = f"{hits / len(rows):.2f}" if rows else "-"
        found[f"R@{name}"] = f"{hits / len(flipped):.2f}"
    found["flagged"] = str(len(picks["flagged"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=10, help="train.max_epochs of each training")
    parser.add_argument("--noise", type=float, default=0.05, help="share of the train split's labels flipped")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flips and of the training")
    args = parser.parse_args()
    console = Console(width=220)
    with tempfile.TemporaryDirectory(prefix="visionflow-bench-noise-") as tmp:
        work = Path(tmp)
        spec, flipped, train = prepare(work, args)
        k = len(flipped)
        table = Table(
            title=f"suspicious labels: {k} of {train} digits training labels flipped (seed {args.seed}), "
            f"k = {k}; a random ranking's precision is {k / train:.2f}",
            title_justify="left",
        )
        columns = ("job", "P@k", "R@k", "P@2k", "R@2k", "flagged", "P@flagged", "R@flagged", "best val acc")
        columns += ("wall s", "recording s", "ranking + grid s", "share of wall")
        for column in columns:
            table.add_column(column)
        for i, (name, train_params) in enumerate(JOBS.items()):
            result, seconds = run_job(spec, train_params, work / f"job{i}", train)  # the CSV ranks them all
            found = scores(result.suspicious_labels.csv, flipped, k) if result.suspicious_labels else {}
            row = [found.get(column, "-") for column in columns[1:8]]
            cost = result.suspicious_labels.seconds if result.suspicious_labels else None
            if cost is None:
                costs = ("-", "-", "-")
            else:
                record = result.suspicious_labels.record_seconds
                costs = (f"{record:.2f}", f"{cost - record:.2f}", f"{cost / seconds:.2%}")
            table.add_row(name, *row, f"{result.best_val_acc or 0:.4f}", f"{seconds:.1f}", *costs)
            console.print(f"{name}: {found} {seconds:.1f} s", highlight=False, markup=False)
    console.print(table)
    console.print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python bench/label_noise.py "
        f"{' '.join(sys.argv[1:])}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
