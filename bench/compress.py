"""Compression against the fp32 reference, and its targets, on the default digits CNN or a real-sized model.

Trains the default model (params/default.yaml, packaging off) with the pipeline flow, or takes a
finished pipeline run with --from-run, then runs the compression stage exactly as
`visionflow optimize --from-run RUN_ID` does, with the optimize section of params/compress.yaml
(int8 static and dynamic, 50% channel pruning + fine-tuning, 50% unstructured sparsity, a
quarter-width student distilled and its no-teacher baseline). Every variant lands in MLflow.
Prints the machine (CPU model and its int8 instruction sets: AMX, VNNI, AVX-512), the comparison
table and, per target, the measured value and PASS / MISS.

--model resnet18 (or mobilenet_v3_small, ...) trains that torchvision architecture from scratch on
the same bundled digits at --image-size (64 by default; 224 is slow on 2 cores) for --epochs, and
compresses it with int8 (static, dynamic) and 50% channel pruning + fine-tuning (no student, no
sparsity); its targets are the real-model ones (int8 ≥ 2.5× faster at batch 32 on a CPU with
AMX / VNNI, pruning ≥ 1.8× faster).

    python bench/compress.py [--from-run RUN_ID] [--compress-params params/compress.yaml] [--set optimize.threads=2]
    python bench/compress.py --model resnet18 --image-size 64 --epochs 4
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import time

from components.quiet import set_offline_defaults  # noqa: E402 - before prefect / mlflow / albumentations

set_offline_defaults()
for key, value in {
    # Prefect's 20 s default for its temporary server is too short on a loaded machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(key, value)

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from components.config import load_params, params_to_flat_dict
from components.optimization.measure import VariantResult, cpu_model, int8_instruction_sets

INT8_SIZE_RATIO = 3.5
INT8_SPEEDUP_B32 = 1.5
REAL_INT8_SPEEDUP_B32 = 2.5  # a real-sized CNN on a CPU with AMX or VNNI
REAL_PRUNE_SPEEDUP_B32 = 1.8
PRUNE_MACS_RATIO = 2.0
STUDENT_SIZE_RATIO = 3.0
MAX_DROP = 0.01  # one accuracy point


class TargetCheck(BaseModel):
    """One target of the issue: what was aimed for, what was measured, and whether it was met."""

    target: str
    aim: str
    measured: str
    passed: bool | None  # None: the variant it needs was not produced


def _by_name(variants: list[VariantResult]) -> dict[str, VariantResult]:
    return {v.name: v for v in variants}


def check_targets(variants: list[VariantResult], real_model: bool = False) -> list[TargetCheck]:
    """The targets against the fp32 reference, from the compression stage's variants.

    Takes the gated variants (names as flows/optimize.py gives them: fp32, int8-static,
    pruned-NN, student-*-distilled, student-*-baseline) and whether they compress a real-sized
    torchvision model (int8 then aims at REAL_INT8_SPEEDUP_B32 where the CPU has AMX or VNNI, and
    pruning at REAL_PRUNE_SPEEDUP_B32 at batch 32). Returns one TargetCheck per target; a target
    whose variant is missing has passed=None.
    """
    found = _by_name(variants)
    ref = found.get("fp32")
    checks: list[TargetCheck] = []

    def missing(target: str, aim: str) -> None:
        checks.append(TargetCheck(target=target, aim=aim, measured="variant not produced", passed=None))

    def drop_check(target: str, v: VariantResult, against: VariantResult) -> None:
        drop = against.accuracy - v.accuracy
        checks.append(
            TargetCheck(
                target=target,
                aim=f"≤ {MAX_DROP * 100:.0f} pt",
                measured=f"{drop * 100:+.2f} pt ({against.accuracy:.4f} → {v.accuracy:.4f})",
                passed=drop <= MAX_DROP + 1e-12,
            )
        )

    int8 = found.get("int8-static")
    vnni = any(f.startswith(("amx", "avx512_vnni", "avx_vnni")) for f in int8_instruction_sets())
    int8_aim = REAL_INT8_SPEEDUP_B32 if real_model and vnni else INT8_SPEEDUP_B32
    if ref and int8:
        size_ratio = ref.size_bytes / int8.size_bytes
        speedup = ref.latency_b32_ms / int8.latency_b32_ms
        checks.append(
            TargetCheck(
                target="int8 (static) file size",
                aim=f"≥ {INT8_SIZE_RATIO}× smaller",
                measured=f"{size_ratio:.2f}× ({ref.size_bytes / 1024:.0f} → {int8.size_bytes / 1024:.0f} KiB)",
                passed=size_ratio >= INT8_SIZE_RATIO,
            )
        )
        checks.append(
            TargetCheck(
                target="int8 (static) latency, batch 32",
                aim=f"≥ {int8_aim}× faster",
                measured=f"{speedup:.2f}× ({ref.latency_b32_ms:.2f} → {int8.latency_b32_ms:.2f} ms)",
                passed=speedup >= int8_aim,
            )
        )
        drop_check("int8 (static) accuracy drop", int8, ref)
    else:
        for target in ("int8 (static) file size", "int8 (static) latency, batch 32", "int8 (static) accuracy drop"):
            missing(target, "")

    pruned = next((v for v in variants if v.name.startswith("pruned-")), None)
    if ref and pruned and real_model:
        speedup = ref.latency_b32_ms / pruned.latency_b32_ms
        checks.append(
            TargetCheck(
                target=f"{pruned.name} latency, batch 32",
                aim=f"≥ {REAL_PRUNE_SPEEDUP_B32}× faster",
                measured=f"{speedup:.2f}× ({ref.latency_b32_ms:.2f} → {pruned.latency_b32_ms:.2f} ms)",
                passed=speedup >= REAL_PRUNE_SPEEDUP_B32,
            )
        )
    if ref and pruned and ref.macs and pruned.macs:
        ratio = ref.macs / pruned.macs
        checks.append(
            TargetCheck(
                target=f"{pruned.name} MACs",
                aim=f"≥ {PRUNE_MACS_RATIO}× fewer",
                measured=f"{ratio:.2f}× ({ref.macs / 1e6:.2f} M → {pruned.macs / 1e6:.2f} M)",
                passed=ratio >= PRUNE_MACS_RATIO,
            )
        )
        drop_check(f"{pruned.name} accuracy drop (after fine-tuning)", pruned, ref)
    else:
        missing("structured pruning MACs", f"≥ {PRUNE_MACS_RATIO}× fewer")
        missing("structured pruning accuracy drop", f"≤ {MAX_DROP * 100:.0f} pt")

    student = next((v for v in variants if v.name.startswith("student-") and v.name.endswith("-distilled")), None)
    baseline = next((v for v in variants if v.name.startswith("student-") and v.name.endswith("-baseline")), None)
    if real_model and not student:
        return checks  # the real-model run trains no student
    if ref and student and ref.params and student.params:
        ratio = ref.params / student.params
        checks.append(
            TargetCheck(
                target="student size (parameters)",
                aim=f"≥ {STUDENT_SIZE_RATIO}× smaller than teacher",
                measured=f"{ratio:.1f}× ({ref.params:,} → {student.params:,}; "
                f"{ref.size_bytes / 1024:.0f} → {student.size_bytes / 1024:.0f} KiB)",
                passed=ratio >= STUDENT_SIZE_RATIO,
            )
        )
        drop_check("student accuracy vs teacher", student, ref)
        if baseline:
            gain = student.accuracy - baseline.accuracy
            checks.append(
                TargetCheck(
                    target="student above its no-teacher baseline",
                    aim="> baseline",
                    measured=f"{gain * 100:+.2f} pt ({baseline.accuracy:.4f} → {student.accuracy:.4f})",
                    passed=gain > 0,
                )
            )
        else:
            missing("student above its no-teacher baseline", "> baseline")
    else:
        for target in (
            "student size (parameters)",
            "student accuracy vs teacher",
            "student above its no-teacher baseline",
        ):
            missing(target, "")
    return checks


def interleaved_latency_b32(
    artifacts: dict[str, str], images, threads: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Batch-32 latency of several ONNX models timed in turn, round after round, so that a load change on a
    shared machine hits all of them alike. Takes {name: .onnx path}, the test images (N, C, S, S), the
    onnxruntime intra-op threads and the rounds. Returns {name: (best ms, median ms)}; the best of many runs
    is the figure least inflated by other processes taking the CPU."""
    import statistics

    import numpy as np
    import onnxruntime as ort

    batch = np.ascontiguousarray(np.resize(np.asarray(images, dtype=np.float32), (32, *images.shape[1:])))
    sessions = {}
    for name, path in artifacts.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
        sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_ in range(rounds + 3):
        for name, session in sessions.items():
            feed = {session.get_inputs()[0].name: batch}
            start = time.perf_counter()
            session.run(None, feed)
            if round_ >= 3:  # the first rounds warm up
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def run_test_images(run_id: str):
    """The test split of a finished pipeline run through its model's eval transform, (N, C, S, S) float32."""
    import json
    from pathlib import Path

    from components import tracking
    from components.data.augment import build_eval_transform
    from components.data.dataset import eval_arrays
    from components.data.ingest import read_manifest
    from components.data.manifest import rows_of_split
    from components.training.module import load_classifier

    run_dir = Path(tracking.get_run(run_id).data.tags[tracking.RUN_DIR_TAG])
    classifier = load_classifier(json.loads((run_dir / "result.json").read_text())["checkpoint"])
    rows = rows_of_split(read_manifest(run_dir / "data" / "manifest.clean.csv"), "test")
    images, _ = eval_arrays(
        rows, classifier.classes, build_eval_transform(classifier.augment), classifier.spec.in_channels, 10**9
    )
    return images


def lscpu_model() -> str:
    """The CPU's model name as lscpu prints it (falls back to /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return cpu_model()


def compress_overrides(path: str, extra: list[str]) -> list[str]:
    """The optimize section of the params file at `path` as KEY=VALUE overrides, then `extra`."""
    params = load_params(path)
    return [
        f"{key}={_yaml_value(value)}"
        for key, value in params_to_flat_dict(params).items()
        if key.startswith("optimize.")
    ] + ["optimize.enabled=true", *extra]


def _yaml_value(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def train_default(params_path: str, extra: list[str]) -> str:
    """Run the pipeline flow on `params_path` (packaging off); returns the MLflow run id."""
    from flows.pipeline import pipeline

    params = load_params(
        params_path, ["package.enabled=false", "train.progress_bar=false", "augment.preview_images=0", *extra]
    )
    result = pipeline(params, params_file=params_path)
    print(
        f"trained {params.model.name}: test accuracy {result.metrics['test/accuracy']:.4f}, "
        f"MLflow run {result.run_id}, checkpoint {result.checkpoint}"
    )
    return result.run_id


def real_model_overrides(model: str, image_size: int, epochs: int) -> tuple[list[str], list[str]]:
    """(training overrides, optimize overrides) of the real-model run: `model` from scratch on the bundled digits at
    `image_size` for `epochs`, then int8 (static, dynamic) and 50% channel pruning with fine-tuning (no student,
    no sparsity: a real-sized teacher makes them slow and they answer other questions)."""
    train = [
        f"model.name={model}",
        "model.pretrained=false",
        f"augment.image_size={image_size}",
        f"train.max_epochs={epochs}",
        "train.early_stopping_patience=0",
        "train.batch_size=64",
    ]
    optimize = [
        "optimize.distill.enabled=false",
        "optimize.prune.unstructured_amount=0",
        "optimize.prune.enabled=true",
        f"optimize.prune.finetune_epochs={epochs}",
        "optimize.quantize.dynamic=true",
        "optimize.latency_repeats=10",
    ]
    return train, optimize


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-run", default=None, help="MLflow run id of a finished pipeline run (skips training)")
    parser.add_argument(
        "--params", default="params/default.yaml", help="params of the model trained when no --from-run"
    )
    parser.add_argument("--train-set", action="append", default=[], help="KEY=VALUE override for training")
    parser.add_argument("--compress-params", default="params/compress.yaml", help="its optimize section is used")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override of the optimize section")
    parser.add_argument("--model", default=None, help="a torchvision architecture (resnet18, mobilenet_v3_small, ...)")
    parser.add_argument("--image-size", type=int, default=64, help="input size of --model (224 is slow on 2 cores)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of --model")
    parser.add_argument(
        "--rounds", type=int, default=200, help="rounds of the interleaved fp32/int8 batch-32 re-timing"
    )
    return parser.parse_args()


def _variant_table(variants: list[VariantResult]) -> Table:
    table = Table(title="compression variants against the fp32 ONNX reference (same test split)", title_justify="left")
    columns = ("variant", "accuracy", "drop pt", "size KiB", "params", "MACs", "b1 ms", "b32 ms", "accepted", "note")
    for column in columns:
        table.add_column(column, overflow="fold")
    for v in variants:
        table.add_row(
            v.name,
            f"{v.accuracy:.4f}",
            f"{v.accuracy_drop * 100:+.2f}",
            f"{v.size_bytes / 1024:.0f}",
            f"{v.params:,}" if v.params else "–",
            f"{v.macs / 1e6:.2f} M" if v.macs else "–",
            f"{v.latency_b1_ms:.3f}",
            f"{v.latency_b32_ms:.3f}",
            "yes" if v.accepted else "no",
            v.note,
        )
    return table


def main() -> None:
    args = _arguments()

    import onnxruntime
    import torch

    from components import tracking
    from flows.optimize import optimize_from_run

    train_extra, optimize_extra = (
        real_model_overrides(args.model, args.image_size, args.epochs) if args.model else ([], [])
    )
    started = datetime.datetime.now(datetime.UTC)
    load = os.getloadavg()
    clock = time.perf_counter()
    run_id = args.from_run or train_default(args.params, [*train_extra, *args.train_set])
    trained = time.perf_counter()
    overrides = compress_overrides(args.compress_params, [*optimize_extra, *args.set])
    result = optimize_from_run(run_id, overrides)
    finished = time.perf_counter()
    threads = sorted({v.threads for v in result.variants})

    console = Console(width=200)
    console.print(
        f"date: {started:%Y-%m-%d %H:%M} UTC; CPU: {lscpu_model()} ({platform.machine()}), "
        f"{os.cpu_count()} logical CPUs, load average at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}; "
        f"int8 instruction sets: {', '.join(int8_instruction_sets()) or 'none found'}; "
        f"onnxruntime {onnxruntime.__version__} with {', '.join(map(str, threads))} intra-op thread(s), "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)",
        highlight=False,
    )
    console.print(
        f"model: {args.model or 'from the params'}{f' at {args.image_size} px' if args.model else ''}; "
        f"wall clock: training {trained - clock:.0f} s{' (skipped: --from-run)' if args.from_run else ''}, "
        f"compression stage {finished - trained:.0f} s; MLflow: {tracking.tracking_uri()}, "
        f"source run {run_id}, optimize run {result.run_id}; best ({result.objective}): {result.best}",
        highlight=False,
    )
    console.print(_variant_table(result.variants))

    checks = check_targets(result.variants, real_model=bool(args.model))
    targets = Table(title="targets (against the fp32 reference)", title_justify="left")
    for column in ("target", "aim", "measured", "result"):
        targets.add_column(column)
    for c in checks:
        targets.add_row(c.target, c.aim, c.measured, "n/a" if c.passed is None else "PASS" if c.passed else "MISS")
    console.print(targets)
    _print_interleaved(console, result.variants, run_id, args.rounds)
    console.print(
        f"{sum(c.passed is True for c in checks)}/{len(checks)} targets met; comparison: {result.comparison_md}",
        highlight=False,
    )


def _print_interleaved(console: Console, variants: list[VariantResult], run_id: str, rounds: int) -> None:
    """Re-time fp32, int8-static and the pruned model at batch 32 in turn, round after round, and print the ratios."""
    found = {v.name: v for v in variants if v.artifact}
    names = [n for n in found if n == "fp32" or n == "int8-static" or n.startswith("pruned-")]
    if "fp32" not in names or len(names) < 2:
        return
    timed = interleaved_latency_b32(
        {n: found[n].artifact for n in names}, run_test_images(run_id), found["fp32"].threads, rounds
    )
    ref_best, ref_median = timed["fp32"]
    for name in names[1:]:
        best, median = timed[name]
        console.print(
            f"{name} batch-32 re-timed interleaved with fp32 ({rounds} rounds, {found['fp32'].threads} thread(s)): "
            f"best {ref_best:.2f} → {best:.2f} ms = {ref_best / best:.2f}×, "
            f"median {ref_median:.2f} → {median:.2f} ms = {ref_median / median:.2f}×",
            highlight=False,
        )


if __name__ == "__main__":
    main()
