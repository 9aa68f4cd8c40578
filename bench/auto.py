"""The plan with `auto` values against the fixed digits recipe, on data sets of different shapes.

For each data set, two jobs go through the same steps a pipeline run takes (ingest, validate, plan, the training
entry point `python -m components.training.fit SPEC`, test-split evaluation), without Prefect or MLflow servers:
- "digits recipe": params/default.yaml with only data.path changed (1 channel, 32 px, no flips, batch 64, ...);
- "plan (auto)": only data.path (and the CPU accelerator) set, every other decidable field left to the plan,
  train.lr: auto (Lightning's lr_find in the training process).
Prints test accuracy, macro F1 and wall time (ingest to evaluation) side by side, and what the plan decided.

    python bench/auto.py                      # digits (8x8 grey) and generated 96 px RGB shapes
    python bench/auto.py --max-epochs 10      # cap both jobs' epochs (a busy or small machine)
"""

from __future__ import annotations

import argparse
import os
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

from components.config import EvaluateParams, load_params  # noqa: E402
from components.data.ingest import ingest, read_manifest  # noqa: E402
from components.data.manifest import rows_of_split  # noqa: E402
from components.data.validate import validate  # noqa: E402
from components.evaluation.evaluate import evaluate_checkpoint  # noqa: E402
from components.planning import plan_for_manifest  # noqa: E402
from components.training.fit import FitResult, FitSpec  # noqa: E402
from tests.helpers.shapes import make_shapes  # noqa: E402

SHOWN = ("data.channels", "augment.image_size", "augment.hflip_p", "model.name", "train.max_epochs", "train.batch_size")


def datasets(work: Path, shapes_per_class: int) -> dict[str, str]:
    """name -> data.path: the bundled digits and generated 96 px RGB shapes (colour and outline tell the classes)."""
    shapes = make_shapes(work / "shapes96", per_class=shapes_per_class, size=96, bad_files=False, seed=1)
    return {"digits 8x8 grey": "bundled:digits", f"shapes 96px RGB ({3 * shapes_per_class})": str(shapes)}


def job_overrides(job: str, data_path: str, work: Path, max_epochs: int | None) -> tuple[str | None, list[str]]:
    """(params file, overrides) of a job."""
    common = [f"data.path={data_path}", f"run.cache_dir={work / 'cache'}", "train.progress_bar=false"]
    if max_epochs:
        common.append(f"train.max_epochs={max_epochs}")
    if job == "digits recipe":
        return str(REPO / "params" / "default.yaml"), common
    return None, [*common, "trainer.accelerator=cpu", "train.lr=auto"]


def run_job(job: str, data_path: str, work: Path, max_epochs: int | None) -> dict[str, str]:
    """Ingest, validate, plan, train (entry point process) and evaluate one job; returns its table row."""
    params_file, overrides = job_overrides(job, data_path, work, max_epochs)
    params = load_params(params_file, overrides)
    out = work / f"{job}-{abs(hash(data_path))}".replace(" ", "_").replace("(", "").replace(")", "")
    start = time.perf_counter()
    snapshot = ingest(params.data, out / "snapshot", work / "cache")
    report = validate(snapshot, params.data, out / "data")
    plan = plan_for_manifest(params, report.clean_manifest_path)
    spec = FitSpec(
        params=plan.params,
        manifest_path=report.clean_manifest_path,
        classes=snapshot.classes,
        run_dir=str(out / "train"),
        result_path=str(out / "result.json"),
        progress_bar=False,
    )
    (out / "spec.json").write_text(spec.model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "components.training.fit", str(out / "spec.json")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    result = FitResult.model_validate_json((out / "result.json").read_text())
    if done.returncode or not result.best_checkpoint:
        raise SystemExit(f"{job} on {data_path} failed: {result.error or done.stderr[-2000:]}")
    rows = rows_of_split(read_manifest(report.clean_manifest_path), "test")
    metrics = evaluate_checkpoint(result.best_checkpoint, rows, out / "eval", EvaluateParams(), 40_000_000).metrics
    seconds = time.perf_counter() - start
    decided = {d.field: d.value for d in plan.decisions}
    shown = ", ".join(f"{f.split('.')[1]} {decided[f]}" for f in SHOWN)
    found = [line[len("[visionflow] tuner found ") :] for line in done.stdout.splitlines() if "tuner found" in line]
    return {
        "job": job,
        "accuracy": f"{metrics['accuracy']:.4f}",
        "macro F1": f"{metrics['macro_f1']:.4f}",
        "epochs run": str(result.epochs),
        "wall s": f"{seconds:.0f}",
        "params": shown + (f"; found {found[0]}" if found else f", lr {result.lr:g}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=None, help="cap both jobs' train.max_epochs")
    parser.add_argument("--shapes-per-class", type=int, default=60, help="generated images per class (3 classes)")
    args = parser.parse_args()
    console = Console(width=200)
    table = Table(title="plan (auto) vs the digits recipe", title_justify="left")
    for column in ("data set", "job", "test accuracy", "macro F1", "epochs run", "wall s", "decided / used"):
        table.add_column(column, overflow="fold")
    with tempfile.TemporaryDirectory(prefix="visionflow-bench-auto-") as tmp:
        work = Path(tmp)
        for name, path in datasets(work, args.shapes_per_class).items():
            for job in ("digits recipe", "plan (auto)"):
                row = run_job(job, path, work, args.max_epochs)
                console.print(f"{name} / {job}: {row}", highlight=False, markup=False)
                table.add_row(
                    name, job, row["accuracy"], row["macro F1"], row["epochs run"], row["wall s"], row["params"]
                )
    console.print(table)
    console.print(f"{os.cpu_count()} CPUs; python bench/auto.py {' '.join(sys.argv[1:])}", highlight=False)


if __name__ == "__main__":
    main()
