"""Overhead of `visionflow run` and of its train stage against a plain PyTorch loop, with a breakdown.

Same data (the default params' data set), model, transforms, epochs and batch size; early stopping off so both
do the same number of epochs. Each round trains the plain loop in this process, then runs the `visionflow run`
command (a fresh process: interpreter, imports, Prefect's temporary server, flow, exit) on the same params and
reads its MLflow runs back for the breakdown. Prints a table of wall times and ratios (medians over --repeat
rounds), then what each part of the fixed cost took. The bench runs under the glibc allocator settings the
training processes get (flows/warm_start.py, ALLOCATOR_ENV), so the plain loop has them too. The table's last row
is the floor of any tracked Lightning script: the plain loop plus a new interpreter's imports of torch, Lightning
and MLflow.

With --with-server each round also runs the command against a Prefect server that is already running (what
`visionflow up` gives: no temporary server to start), in the same MLflow store. With --package the runs package
too (off otherwise, as the plain loop exports nothing): the breakdown adds the package stage, which from the
second run on compares the new version with the champion the run before registered and diffs them.

    python bench/train_overhead.py [--params params/default.yaml] [--set train.max_epochs=10] [--repeat 3]
                                   [--with-server] [--package]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from components.quiet import set_offline_defaults  # noqa: E402 - before prefect / mlflow / albumentations

set_offline_defaults()
from flows.warm_start import process_env  # noqa: E402 - the allocator settings the training processes get

if process_env(dict(os.environ)) != dict(os.environ):
    # glibc reads its allocator variables when a process starts: run the plain loop under the same settings as
    # the training processes, so the ratios show visionflow's overhead and not an allocator's.
    os.execve(sys.executable, [sys.executable, *sys.argv], process_env(dict(os.environ)))
for key, value in {
    # Prefect's 20 s default for its temporary server is too short on a loaded machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(key, value)

import torch
from rich.console import Console
from rich.table import Table

from components.config import load_params
from components.data.ingest import ingest, read_manifest
from components.data.validate import validate
from components.models import build_model
from components.training.fit import datamodule_from_params, model_spec_from_params
from components.training.warm import TIMINGS_FILE

BENCH_SETS = [
    "train.early_stopping_patience=0",
    "train.progress_bar=false",
    "augment.preview_images=0",
    "package.enabled=false",
    "run.experiment=bench-train-overhead",
]


def train_batch(data, batch):
    """A training batch as the training run sees it: a train split held in memory is augmented in whole batches
    (the data module's hook does that in training); otherwise uint8 batches are normalised after loading."""
    if getattr(data, "_memory", None) is not None:
        return data._memory_augment(batch)
    return data.normalize_batch(batch)


def plain_loop(params, manifest: str, classes: list[str]) -> tuple[float, float]:
    """Train with a hand-written loop (train + val pass per epoch); returns (wall seconds, first epoch seconds).

    The image cache is built before the clock starts (the pipeline, run next, then finds it built
    too); the loaders are made once, as Lightning makes them, so their persistent workers start
    once and not every epoch."""
    torch.manual_seed(params.train.seed)
    data = datamodule_from_params(params, read_manifest(manifest), classes)
    data.prepare_data()
    model = build_model(model_spec_from_params(params, len(classes)))
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    first = 0.0
    train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
    for epoch in range(params.train.max_epochs):
        model.train()
        for batch in train_loader:
            x, y = train_batch(data, batch)[:2]
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for batch in val_loader:
                model(data.normalize_batch(batch)[0])
        if epoch == 0:
            first = time.perf_counter() - start
    return time.perf_counter() - start, first


def run_cli(params_file: str, sets: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Run `visionflow run` in a fresh process; returns (launch, exit) as epoch seconds and the wall seconds."""
    command = [sys.executable, "-c", "from flows.cli import main; main()", "run", "--params", params_file]
    for item in sets:
        command += ["--set", item]
    launched, start = time.time(), time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"visionflow run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return launched, launched + wall, wall


def breakdown(experiment: str, launched: float, ended: float, wall: float) -> dict[str, float]:
    """The parts of one `visionflow run` (seconds), from its MLflow runs and the training process's result."""
    from components import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=20)
    parent = next(r for r in runs if tracking.PARENT_TAG not in r.data.tags and r.info.end_time)  # newest ended
    children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id]
    train = next(r for r in children if r.data.tags.get(tracking.STAGE_TAG) == "train")
    ms = 1000.0
    parts = {"whole": wall, "start": parent.info.start_time / ms - launched, "end": ended - parent.info.end_time / ms}
    for key, value in parent.data.metrics.items():
        if key.startswith("stage/") and key.endswith("/seconds"):
            parts[key.removeprefix("stage/").removesuffix("/seconds")] = value
    stamps = sorted(m.timestamp / ms for m in c.get_metric_history(train.info.run_id, "val/acc"))
    t_start, t_end = train.info.start_time / ms, train.info.end_time / ms
    epoch = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    parts.update(
        train_stage=t_end - t_start,
        train_epochs=len(stamps),
        train_epoch=epoch,
        train_before_first_epoch=stamps[0] - epoch - t_start,
        train_after_last_epoch=t_end - stamps[-1],
    )
    timings_file = Path(parent.data.tags[tracking.RUN_DIR_TAG]) / "train" / TIMINGS_FILE
    if timings_file.is_file():  # the training process started ahead kept its own clock (epoch seconds)
        timings = json.loads(timings_file.read_text())
        parts.update(
            proc_start_to_imported=timings["imported"] - timings["process_start"],
            proc_waiting=max(0.0, timings["spec_read"] - timings["imported"]),
            proc_spec_to_first_epoch=stamps[0] - epoch - timings["spec_read"],
            proc_last_epoch_to_returned=timings["returned"] - stamps[-1],
            proc_returned_to_run_end=t_end - timings["returned"],
        )
    return parts


def standalone_costs(env: dict[str, str]) -> dict[str, float]:
    """What importing the pipeline's modules and starting Prefect's temporary server take alone (fresh processes)."""
    out = {}
    for name, code in {
        "import flows.pipeline": "import flows.pipeline",
        "import lightning (training process)": "import components.training.fit",
        "Prefect temporary server start": "from prefect.server.api.server import SubprocessASGIServer as S\n"
        "s = S(); s.start(); s.stop()",
    }.items():
        timed = f"import time\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
        done = subprocess.run([sys.executable, "-c", timed], env=env, capture_output=True, text=True)
        out[name] = float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else float("nan")
    # The floor of any tracked Lightning script: a new interpreter that imports torch, Lightning and MLflow (what
    # visionflow's training process imports, as any Lightning + MLflow script would) and exits without teardown.
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import os, lightning.pytorch, mlflow; os._exit(0)"], env=env)
    out[FLOOR] = time.perf_counter() - start if done.returncode == 0 else float("nan")
    return out


FLOOR = "interpreter start + import torch, Lightning, MLflow"


ROWS = [
    ("start", "  start: interpreter, imports, Prefect temporary server, flow run (until the MLflow run starts)"),
    ("ingest", "  ingest stage"),
    ("validate", "  validate stage"),
    ("plan", "  plan stage"),
    ("augment", "  augmentation preview stage"),
    ("train", "  train stage (task)"),
    ("train_before_first_epoch", "    before the first epoch: MLflow run, process start, imports, set-up"),
    ("proc_start_to_imported", "      training process: its imports (started ahead, before the stage)"),
    ("proc_waiting", "      training process: imports done, waiting for the spec"),
    ("proc_spec_to_first_epoch", "      spec handed over → first epoch starts (set-up, sanity check)"),
    ("train_after_last_epoch", "    after the last epoch: end of fit, MLflow flush, checkpoint upload, run end"),
    ("proc_last_epoch_to_returned", "      last epoch → training returned (flush, system metrics, result)"),
    ("proc_returned_to_run_end", "      training returned → train run ended (process exit, upload)"),
    ("evaluate", "  evaluate stage"),
    ("package", "  package stage (export, parity, bundle, register, gate; with --package)"),
    ("end", "  end: summary, run end, server stop, exit"),
]


@contextlib.contextmanager
def prefect_server(work: Path, env: dict[str, str]):
    """A `prefect server start` on a free loopback port for the rounds (its own home in `work`); yields its API URL."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (work / "prefect-server.log").open("w")
    server_env = dict(env, PREFECT_HOME=str(work / "prefect-server"))
    command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1"]
    server = subprocess.Popen([*command, "--port", str(port)], env=server_env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            sys.exit(f"the Prefect server did not answer within 180 s (log: {log.name})")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/default.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--repeat", type=int, default=1, help="Rounds (plain loop then visionflow run); medians.")
    parser.add_argument(
        "--with-server", action="store_true", help="Also run against a running Prefect server (as after visionflow up)."
    )
    parser.add_argument("--package", action="store_true", help="Package in the runs too (export, register, gate).")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="visionflow-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    bench_sets = [s for s in BENCH_SETS if not (args.package and s == "package.enabled=false")]
    sets = [*bench_sets, f"run.output_dir={work / 'runs'}", *args.set]
    params = load_params(args.params, sets)
    snapshot = ingest(params.data, work / "snapshot", Path(params.run.cache_dir))
    report = validate(snapshot, params.data, work / "data")
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect"))
    with prefect_server(work, env) if args.with_server else contextlib.nullcontext() as api_url:
        rounds = [
            measure_round(i, args.params, sets, params, report, snapshot, env, api_url) for i in range(args.repeat)
        ]
    alone = standalone_costs(env)
    med = {key: median([r[key] for r in rounds if key in r]) for key in rounds[0]}
    keys = ("train_stage", "whole", "whole_server") if args.with_server else ("train_stage", "whole")
    ratios = {k: median([r[k] / r["plain"] for r in rounds]) for k in keys}
    print_tables(params, rounds, med, ratios, alone)


def measure_round(index, params_file, sets, params, report, snapshot, env, api_url) -> dict[str, float]:
    """One round: the plain loop, `visionflow run` (its temporary server) and, given `api_url`, the command again
    against that server; returns the parts (seconds)."""
    plain, first = plain_loop(params, report.clean_manifest_path, snapshot.classes)
    launched, ended, wall = run_cli(params_file, sets, env)
    parts = breakdown(params.run.experiment, launched, ended, wall)
    parts.update(plain=plain, plain_epoch=(plain - first) / max(1, params.train.max_epochs - 1))
    line = (
        f"round {index + 1}: plain {plain:.1f} s, train stage {parts['train_stage']:.1f} s, visionflow run {wall:.1f} s"
    )
    if api_url:
        parts["whole_server"] = run_cli(params_file, sets, dict(env, PREFECT_API_URL=api_url))[2]
        line += f", with a running server {parts['whole_server']:.1f} s"
    print(line, flush=True)
    return parts


def print_tables(params, rounds, med, ratios, alone) -> None:
    """The table of wall times and ratios, then where the time goes."""
    console = Console()
    title = (
        f"`visionflow run` overhead: {params.model.name}, {params.train.max_epochs} epochs, batch "
        f"{params.train.batch_size}, {os.cpu_count()} CPUs, median of {len(rounds)}"
    )
    table = Table(title=title)
    for column in ("what", "wall s", "× plain loop"):
        table.add_column(column)
    table.add_row("plain PyTorch loop (train + val passes, no tracking)", f"{med['plain']:.1f}", "1.00")
    table.add_row("visionflow train stage (own process, Lightning, MLflow)", f"{med['train_stage']:.1f}",
                  f"{ratios['train_stage']:.2f}")  # fmt: skip
    last = "package" if "package" in med else "evaluate"
    table.add_row(f"whole `visionflow run` (new process, Prefect, ingest … {last})", f"{med['whole']:.1f}",
                  f"{ratios['whole']:.2f}")  # fmt: skip
    if "whole_server" in ratios:
        table.add_row("whole `visionflow run`, Prefect server already running (visionflow up)",
                      f"{med['whole_server']:.1f}", f"{ratios['whole_server']:.2f}")  # fmt: skip
    floor = med["plain"] + alone[FLOOR]
    table.add_row("floor: plain loop + a new process's imports of torch, Lightning, MLflow", f"{floor:.1f}",
                  f"{floor / med['plain']:.2f}")  # fmt: skip
    console.print(table)

    parts = Table(title="where the time goes (median seconds)")
    parts.add_column("part")
    parts.add_column("s")
    parts.add_row("epoch: plain loop / visionflow", f"{med['plain_epoch']:.2f} / {med['train_epoch']:.2f}")
    for key, label in ROWS:
        if key in med or key != "package":
            parts.add_row(label, f"{med.get(key, float('nan')):.1f}")
    for label, seconds in alone.items():
        parts.add_row(f"alone, in a fresh process: {label}", f"{seconds:.1f}")
    console.print(parts)


if __name__ == "__main__":
    main()
