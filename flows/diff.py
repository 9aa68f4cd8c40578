"""`visionflow diff RUN_A RUN_B`: both runs' models scored on the same rows (the newer run's test split, or a
data set), what changed written as files, logged to a new MLflow run tagged with both run ids and published
as a Prefect markdown artifact. The registry gate attaches the same diff (champion → challenger) to its
decision's run (`record_diff`)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from components import tracking
from components.config import DataParams, load_params
from components.data.ingest import read_manifest
from components.data.manifest import ManifestRow, rows_of_split
from components.errors import VisionflowError
from components.evaluation.results import DiffResult, ModelSource, read_calibration
from flows import warm_start
from flows.runs import pipeline_run
from flows.tasks import ingest_task, validate_task

RUN_A_TAG = "visionflow.diff.run_a"
RUN_B_TAG = "visionflow.diff.run_b"
BUNDLE_ARTIFACTS = "bundle"


class RunModel(BaseModel):
    """A run resolved for a diff: its model, labels, data params and the manifest its split came from."""

    run_id: str
    experiment: str
    started: int
    run_dir: str
    manifest: str | None
    source: ModelSource
    labels: list[str]
    data: DataParams


class DiffRun(BaseModel):
    """What `visionflow diff` produced: its MLflow run, folder and the diff itself."""

    run_id: str
    out_dir: str
    result: DiffResult


def _run_dir(run) -> Path | None:
    """The run directory a run's tag names (None without one: never the current folder)."""
    tag = run.data.tags.get(tracking.RUN_DIR_TAG)
    return Path(tag) if tag else None


def _home(run) -> Path | None:
    """The folder holding a run's params.yaml and data/: its run directory, or its parent pipeline run's (a
    `package --from-run` child run keeps only its package folder)."""
    run_dir, parent = _run_dir(run), run.data.tags.get(tracking.PARENT_TAG)
    if (run_dir is None or not (run_dir / "params.yaml").is_file()) and parent:
        return _run_dir(pipeline_run(parent))
    return run_dir


def _model_source(run, run_dir: Path | None, home: Path | None, task: str) -> ModelSource:
    """The run's bundle (its package folder, else its MLflow `bundle` artifacts), else its best checkpoint (with
    the temperature its evaluation fitted); VisionflowError when it has neither."""
    run_id = run.info.run_id
    bundle = run_dir / "package" / "bundle" if run_dir else None
    if (bundle is None or not bundle.is_dir()) and tracking.client().list_artifacts(run_id, BUNDLE_ARTIFACTS):
        bundle = tracking.download_run_artifacts(run_id, BUNDLE_ARTIFACTS, Path(".visionflow") / "diff" / run_id)
    if bundle is not None and bundle.is_dir():
        return ModelSource(run_id=run_id, kind="bundle", path=str(bundle), task=task)
    checkpoint = home / "train" / "checkpoints" / "best.ckpt" if home else None
    if checkpoint and checkpoint.is_file():
        calibration = read_calibration(home / "evaluation")
        temperature = calibration.temperature if calibration else 1.0
        source = ModelSource(run_id=run_id, kind="checkpoint", path=str(checkpoint), temperature=temperature, task=task)
        if task == "multilabel":
            source.thresholds = _checkpoint_thresholds(run_id, home / "evaluation" / "thresholds.json")
        return source
    where = f"looked in {run_dir}" if run_dir else "it names no run directory"
    raise VisionflowError(f"run {run_id} has no bundle or checkpoint to score ({where})")


def _checkpoint_thresholds(run_id: str, path: Path) -> dict[str, float]:
    """The per-label thresholds a multi-label run's evaluation tuned; VisionflowError when they are missing."""
    if not path.is_file():
        raise VisionflowError(f"run {run_id} is multilabel but has no thresholds.json to answer with ({path})")
    from components.evaluation.multilabel import read_thresholds

    return read_thresholds(path)


def run_model(run_id: str) -> RunModel:
    """Resolve a pipeline run (or a package child run) for a diff; raises VisionflowError, one line, for an
    unknown run or one without a bundle or checkpoint."""
    from components.evaluation.diff import model_labels

    run = pipeline_run(run_id)
    run_dir, home = _run_dir(run), _home(run)
    params = load_params(home / "params.yaml") if home and (home / "params.yaml").is_file() else load_params()
    task = getattr(params.data, "task", "single")
    task = "single" if task == "auto" else task
    source = _model_source(run, run_dir, home, task)
    manifest = home / "data" / "manifest.clean.csv" if home else None
    return RunModel(
        run_id=run_id,
        experiment=tracking.client().get_experiment(run.info.experiment_id).name,
        started=run.info.start_time or 0,
        run_dir=str(run_dir or ""),
        manifest=str(manifest) if manifest and manifest.is_file() else None,
        source=source,
        labels=model_labels(source),
        data=params.data,
    )


def check_pair(run_a: str, run_b: str) -> tuple[RunModel, RunModel]:
    """Both runs resolved, refused (VisionflowError, one line) when their models answer different questions."""
    from components.evaluation.diff import label_set_problem, task_diff

    a, b = run_model(run_a), run_model(run_b)
    problem = label_set_problem(a.labels, b.labels)
    if problem:
        raise VisionflowError(f"cannot diff {run_a} and {run_b}: {problem}")
    if a.source.task != b.source.task:
        raise VisionflowError(f"cannot diff {run_a} ({a.source.task}) and {run_b} ({b.source.task}): other tasks")
    task_diff(a.source.task)
    return a, b


def record_diff(
    a: ModelSource,
    b: ModelSource,
    rows: list[ManifestRow],
    out_dir: Path,
    log_run_id: str,
    source_text: str,
    max_pixels: int,
    grid: int = 25,
) -> DiffResult | None:
    """Score both models on `rows`, write the diff into `out_dir`, log its files (artifact folder `diff`), figures
    and both run ids (tags) to MLflow run `log_run_id`, and publish its summary as the Prefect markdown artifact
    `run-diff`. Returns the DiffResult; None, with nothing written, for a task the diff cannot read. The scoring
    and figures run in the training process when one serves (components.evaluation.diff.diff_models), else here."""
    if not rows:
        raise VisionflowError("no images to compare the two models on")
    target = "components.evaluation.diff:diff_models"
    result = warm_start.call(target, a, b, rows, Path(out_dir), source_text, max_pixels, grid)
    if result is None:
        return None
    tracking.set_tags(log_run_id, {RUN_A_TAG: a.run_id, RUN_B_TAG: b.run_id})
    metrics = {f"diff/{kind}": float(n) for kind, n in result.counts.items()}
    for side, summary in (("a", result.summary_a), ("b", result.summary_b)):
        metrics.update({f"diff/{side}/{k}": v for k, v in summary.items() if k != "num_samples"})
    tracking.log_metrics(log_run_id, metrics)
    tracking.log_artifacts(log_run_id, result.files.values(), "diff")
    create_markdown_artifact(
        key="run-diff",
        markdown=f"{result.markdown}\nMLflow: {tracking.run_link(log_run_id)}\n",
        description=f"diff {a.run_id[:8]} → {b.run_id[:8]}",
    )
    get_run_logger().info(
        "diff %s → %s on %d images: %d fixed, %d broken",
        a.run_id[:8], b.run_id[:8], result.num_images, result.counts["fixed"], result.counts["broken"],
    )  # fmt: skip
    return result


def _rows(a: RunModel, b: RunModel, data: str | None, split: str | None, out_dir: Path, run_id: str):
    """The rows both models are scored on and where they came from: the newer run's manifest split (test by
    default), or the data set `data` ingested and validated here (all of it by default)."""
    if data:
        newer = max((a, b), key=lambda r: r.started)
        update = {"path": data, "channels": 3, **({"task": newer.source.task} if hasattr(newer.data, "task") else {})}
        params = newer.data.model_copy(update=update)
        snapshot = ingest_task(params, str(Path(".visionflow")))
        report = validate_task(snapshot, params, str(out_dir), run_id)
        split = split or "all"
        return rows_of_split(read_manifest(report.clean_manifest_path), split), f"{data}, split {split}"
    newer = max((r for r in (a, b) if r.manifest), key=lambda r: r.started, default=None)
    if newer is None:
        raise VisionflowError("neither run has a validated manifest to take test rows from: give --data")
    split = split or "test"
    return rows_of_split(read_manifest(newer.manifest), split), f"run {newer.run_id[:8]}'s {split} split"


@flow(name="visionflow-diff", log_prints=True)
def diff_flow(
    run_a: str,
    run_b: str,
    data: str | None = None,
    split: str | None = None,
    out_dir: str | None = None,
    grid: int = 25,
) -> DiffRun:
    """Diff the models of runs `run_a` (before) and `run_b` (after) on the same rows; returns a DiffRun."""
    a, b = check_pair(run_a, run_b)
    out = Path(out_dir or Path("runs") / f"diff-{time.strftime('%Y%m%d-%H%M%S')}-{run_a[:8]}-{run_b[:8]}").resolve()
    experiment = max((a, b), key=lambda r: r.started).experiment
    tags = {
        tracking.STAGE_TAG: "diff",
        tracking.RUN_DIR_TAG: str(out),
        RUN_A_TAG: run_a,
        RUN_B_TAG: run_b,
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
    }
    with tracking.run_scope(experiment, f"diff-{run_a[:8]}-{run_b[:8]}", tags) as run:
        rows, source_text = _rows(a, b, data, split, out, run.run_id)
        tracking.log_params(run.run_id, {"run_a": run_a, "run_b": run_b, "rows": source_text})
        max_pixels = max(a.data.max_pixels, b.data.max_pixels)
        result = record_diff(a.source, b.source, rows, out, run.run_id, source_text, max_pixels, grid)
    return DiffRun(run_id=run.run_id, out_dir=str(out), result=result)


def gate_diff(
    champion_run_id: str,
    champion_bundle: Path,
    challenger_run_id: str,
    challenger_bundle: Path,
    rows: list[ManifestRow],
    out_dir: Path,
    max_pixels: int,
    what: str,
) -> DiffResult | None:
    """The registry decision's diff, champion (A) → challenger (B), on the gate's test rows, logged to the
    challenger's run (its `diff/` artifacts and tags); None, with a warning, for a task the diff cannot read."""
    from components.bundle_format import verify_bundle

    task = verify_bundle(Path(challenger_bundle)).get("task", "single")
    champion = ModelSource(run_id=champion_run_id, kind="bundle", path=str(champion_bundle), task=task)
    challenger = ModelSource(run_id=challenger_run_id, kind="bundle", path=str(challenger_bundle), task=task)
    result = record_diff(champion, challenger, rows, out_dir, challenger_run_id, what, max_pixels)
    if result is None:
        get_run_logger().warning("no diff attached to the registry decision: diff does not read %s models", task)
    return result
