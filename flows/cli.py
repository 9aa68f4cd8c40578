"""The `visionflow` command line: run, resume, validate-data, evaluate.

Expected failures (bad params, bad data, a failed stage) print one line and exit 2.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

# Offline-safe defaults, set before prefect / mlflow / albumentations are imported.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}.items():
    os.environ.setdefault(_key, _value)

import typer
from rich.console import Console
from rich.table import Table

from components.config import load_params
from components.errors import VisionflowError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="visionflow: tracked, compressed, deployable image classifiers.")
console = Console()
err_console = Console(stderr=True)

PARAMS_OPTION = typer.Option(None, "--params", "-p", help="Params YAML (default: built-in defaults).")
SET_OPTION = typer.Option(None, "--set", "-s", help="Override one parameter, e.g. --set train.max_epochs=5 (repeatable).")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _is_interrupt(err: BaseException) -> bool:
    from prefect.exceptions import TerminationSignal

    return isinstance(err, (KeyboardInterrupt, TerminationSignal))


def _run_guarded(fn):
    """Call fn(); VisionflowError → one line on stderr and exit 2; SIGTERM ends runs as KILLED."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return fn()
    except VisionflowError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except BaseException as err:
        if not _is_interrupt(err):
            raise
        err_console.print("[bold red]interrupted[/]: the MLflow run is marked KILLED; `visionflow resume RUN_ID` continues it")
        raise typer.Exit(130) from None


def _summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _print_pipeline_result(result) -> None:
    from components.tracking import ui_hint

    m = result.metrics
    counts = result.split_counts
    console.print(
        _summary_table(
            "visionflow run finished",
            [
                ("test accuracy", f"{m.get('test/accuracy', float('nan')):.4f}"),
                ("macro F1", f"{m.get('test/macro_f1', float('nan')):.4f}"),
                ("images train / val / test", f"{counts.get('train', 0)} / {counts.get('val', 0)} / {counts.get('test', 0)}"),
                ("quarantined files", str(len(result.quarantined))),
                ("MLflow run", f"{result.run_id} (experiment {result.experiment})"),
                ("MLflow UI", ui_hint(result.tracking_uri)),
                ("run directory", result.run_dir),
                ("best checkpoint", result.checkpoint),
                *([("bundle", result.bundle), ("registered model", f"{result.model_version}: {result.registry_decision}")]
                  if result.bundle else []),
                *([("best compressed variant", f"{result.best_variant or 'none accepted'} ({result.comparison})")]
                  if result.comparison else []),
            ],
        )
    )
    for line in result.quarantined[:20]:
        console.print(f"  quarantined: {line}", highlight=False)


@app.command()
def run(
    params: Optional[Path] = PARAMS_OPTION,
    set_: Optional[list[str]] = SET_OPTION,
) -> None:
    """Run the whole pipeline (ingest, validate, train, evaluate) and print where to look."""

    def go():
        p = load_params(params, set_ or [])
        from flows.pipeline import pipeline

        return pipeline(p, params_file=str(params) if params else None)

    _print_pipeline_result(_run_guarded(go))


@app.command()
def resume(
    run_id: str = typer.Argument(..., help="MLflow run id of the failed or killed pipeline run."),
    set_: Optional[list[str]] = SET_OPTION,
) -> None:
    """Resume a failed or killed pipeline run: same MLflow run, training from its last checkpoint."""

    def go():
        from components import tracking
        from flows.pipeline import pipeline

        try:
            run = tracking.get_run(run_id)
        except Exception:
            raise VisionflowError(f"no MLflow run {run_id} in {tracking.tracking_uri()}") from None
        run_dir = run.data.tags.get(tracking.RUN_DIR_TAG)
        if not run_dir or not (Path(run_dir) / "params.yaml").is_file():
            raise VisionflowError(f"run {run_id} has no run directory with params.yaml to resume from")
        p = load_params(Path(run_dir) / "params.yaml", ["train.resume=true", *(set_ or [])])
        return pipeline(p, params_file=run.data.tags.get("visionflow.params_file") or None, resume_run_id=run_id)

    _print_pipeline_result(_run_guarded(go))


@app.command("validate-data")
def validate_data(
    path: str = typer.Argument(..., help="Folder, CSV manifest, archive, bundled:digits or torchvision:NAME."),
    params: Optional[Path] = PARAMS_OPTION,
    set_: Optional[list[str]] = SET_OPTION,
    out: Optional[Path] = typer.Option(None, help="Where to write manifest and report (default: a temp folder)."),
) -> None:
    """Check every image of a data set and print the validation report (no training)."""

    def go():
        import tempfile

        from components.data.ingest import ingest
        from components.data.validate import format_report, validate

        p = load_params(params, [*(set_ or []), f"data.path={path}"])
        out_dir = out or Path(tempfile.mkdtemp(prefix="visionflow-validate-"))
        snapshot = ingest(p.data, out_dir / "snapshot", Path(p.run.cache_dir))
        report = validate(snapshot, p.data, out_dir)
        console.print(format_report(report), highlight=False)
        console.print(f"report: {report.report_path}\nquarantine list: {report.quarantine_path}", highlight=False)

    _run_guarded(go)


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A visionflow checkpoint (.ckpt)."),
    data: str = typer.Option(..., "--data", "-d", help="Data set to evaluate on (any source `run` accepts)."),
    split: str = typer.Option("all", help="all, train, val or test."),
    params: Optional[Path] = PARAMS_OPTION,
    set_: Optional[list[str]] = SET_OPTION,
) -> None:
    """Evaluate an existing checkpoint on a data set; logs an MLflow run and prints the figures."""

    def go():
        if split not in ("all", "train", "val", "test"):
            raise VisionflowError(f"invalid --split {split!r}: choose all, train, val or test")
        if not checkpoint.is_file():
            raise VisionflowError(f"checkpoint not found: {checkpoint}")
        p = load_params(params, [*(set_ or []), f"data.path={data}"])
        from flows.evaluate import evaluate_flow

        return evaluate_flow(
            str(checkpoint.resolve()), p.data, split, p.evaluate, p.run.experiment, p.run.output_dir, p.run.cache_dir
        )

    result = _run_guarded(go)
    m = result.metrics
    console.print(
        _summary_table(
            "visionflow evaluation",
            [
                ("images", str(result.num_images)),
                ("accuracy", f"{m['test/accuracy']:.4f}"),
                ("macro F1", f"{m['test/macro_f1']:.4f}"),
                ("quarantined files", str(len(result.quarantined))),
                ("MLflow run", result.run_id),
                ("run directory", result.run_dir),
            ],
        )
    )


@app.command()
def optimize(
    from_run: Optional[str] = typer.Option(None, "--from-run", help="MLflow run id of a finished pipeline run."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A visionflow checkpoint (with --data)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data set for --checkpoint (any source `run` accepts)."),
    params: Optional[Path] = PARAMS_OPTION,
    set_: Optional[list[str]] = SET_OPTION,
) -> None:
    """Compress a trained model (distill, prune, quantize); every variant measured and gated."""

    def go():
        from flows.optimize import optimize_from_checkpoint, optimize_from_run

        if bool(from_run) == bool(checkpoint):
            raise VisionflowError("give exactly one of --from-run RUN_ID or --checkpoint CKPT (with --data)")
        if from_run:
            return optimize_from_run(from_run, set_ or [])
        if not data:
            raise VisionflowError("--checkpoint needs --data (the data set to fine-tune, calibrate and measure on)")
        if not checkpoint.is_file():
            raise VisionflowError(f"checkpoint not found: {checkpoint}")
        p = load_params(params, ["optimize.enabled=true", *(set_ or []), f"data.path={data}"])
        return optimize_from_checkpoint(str(checkpoint.resolve()), p)

    result = _run_guarded(go)
    _print_variants(result)


def _print_variants(result) -> None:
    table = Table(title="visionflow compression", title_justify="left")
    for column in ("variant", "accuracy", "drop", "size KB", "params", "b1 ms", "b32 ms", "accepted"):
        table.add_column(column)
    for v in result.variants:
        table.add_row(
            v.name, f"{v.accuracy:.4f}", f"{v.accuracy_drop:+.4f}", f"{v.size_bytes / 1024:.0f}",
            f"{v.params:,}" if v.params else "-", f"{v.latency_b1_ms:.2f}", f"{v.latency_b32_ms:.2f}",
            "yes" if v.accepted else "no",
        )
    console.print(table)
    console.print(f"best accepted variant ({result.objective}): {result.best or 'none'}", highlight=False)
    console.print(f"comparison: {result.comparison_md}\nMLflow run: {result.run_id}", highlight=False)


@app.command()
def serve(
    source: str = typer.Argument(..., help="A bundle folder, a bundle .tar.gz, or a registry URI like models:/NAME@champion."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1 by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, help="Port."),
    max_body_bytes: int = typer.Option(10_000_000, help="Largest request body."),
    max_pixels: int = typer.Option(40_000_000, help="Largest image (width x height)."),
    max_images: int = typer.Option(32, help="Most images in one request."),
    top_k: int = typer.Option(3, help="Labels returned per image."),
) -> None:
    """Serve a model bundle over HTTP: POST /predict, GET /health /ready /metadata /metrics."""

    def go():
        from components.serving.app import ServeSettings, serve as run_server
        from flows.package import resolve_bundle

        bundle = resolve_bundle(source)
        settings = ServeSettings(host=host, port=port, max_body_bytes=max_body_bytes, max_pixels=max_pixels,
                                 max_images=max_images, top_k=top_k)
        console.print(f"serving {bundle} on http://{host}:{port} (POST /predict)", highlight=False)
        run_server(bundle, settings)

    _run_guarded(go)


@app.command()
def promote(
    version: str = typer.Argument(..., help="Registered model version to make champion."),
    name: str = typer.Option("visionflow-classifier", "--name", help="Registered model name (package.model_name)."),
) -> None:
    """Make a registered model version the champion (recorded in the registry history)."""

    def go():
        from flows.package import promote_version

        return promote_version(name, version)

    console.print(_run_guarded(go), highlight=False)


@app.command()
def rollback(
    name: str = typer.Option("visionflow-classifier", "--name", help="Registered model name (package.model_name)."),
) -> None:
    """Give the champion alias back to the version that held it before the last promotion."""

    def go():
        from flows.package import rollback_champion

        return rollback_champion(name)

    console.print(_run_guarded(go), highlight=False)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="visionflow")


if __name__ == "__main__":
    sys.exit(main())
