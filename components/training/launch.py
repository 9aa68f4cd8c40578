"""A training spec for an external launcher: ingest, validate and an MLflow train run, then torchrun / SLURM lines.

The pipeline's train task writes its own spec and starts `python -m components.training.fit SPEC` on one node.
For several nodes, a launcher must start that same entry point on every node: `prepare_fit_spec` does the steps
before training once (on a shared file system) and `launch_commands` prints how to start it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from components import tracking
from components.config import PipelineParams, params_to_flat_dict
from components.data.ingest import ingest
from components.data.validate import validate
from components.planning import plan_for_manifest
from components.training.fit import FitSpec


def prepare_fit_spec(params: PipelineParams, out_dir: Path) -> Path:
    """Ingest and validate the params' data into out_dir, open an MLflow train run (params logged) and write
    out_dir/fit_spec.json; returns the spec's path. Paths are absolute so every node reads the same files."""
    out_dir = Path(out_dir).resolve()
    cache_dir = Path(params.run.cache_dir).resolve()
    params = params.model_copy(update={"run": params.run.model_copy(update={"cache_dir": str(cache_dir)})})
    snapshot = ingest(params.data, out_dir / "snapshot", cache_dir)
    report = validate(snapshot, params.data, out_dir / "data")
    params = plan_for_manifest(params, report.clean_manifest_path).params  # no `auto` reaches the training process
    run_id = tracking.start_run(params.run.experiment, "train", {tracking.STAGE_TAG: "train"})
    tracking.log_params(run_id, params_to_flat_dict(params))
    spec = FitSpec(
        params=params,
        manifest_path=str(Path(report.clean_manifest_path).resolve()),
        classes=snapshot.classes,
        run_dir=str(out_dir / "train"),
        result_path=str(out_dir / "train" / "result.json"),
        mlflow_run_id=run_id,
        tracking_uri=tracking.tracking_uri(),
        progress_bar=False,
    )
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    path = out_dir / "fit_spec.json"
    path.write_text(spec.model_dump_json(indent=2))
    return path


def launch_commands(spec_path: Path, params: PipelineParams) -> dict[str, str]:
    """{"torchrun": ..., "slurm": ...}: the lines that start the entry point on params.trainer.num_nodes nodes
    with params.trainer.devices processes each (HEAD_NODE_ADDRESS is the first node's host name)."""
    nodes = params.trainer.num_nodes
    per_node = params.trainer.devices if isinstance(params.trainer.devices, int) else "gpu"
    spec = shlex.quote(str(spec_path))
    return {
        "torchrun": f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d "
        f"--rdzv-endpoint HEAD_NODE_ADDRESS:29500 -m components.training.fit {spec}",
        "slurm": f"srun --nodes {nodes} --ntasks-per-node {per_node if per_node != 'gpu' else 'GPUS_PER_NODE'} "
        f"python -m components.training.fit {spec}",
    }
