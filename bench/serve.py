"""Model server throughput and latency against onnxruntime in-process, on the same bundle and images.

Builds a bundle by training the default model (params/default.yaml: a small CNN on the bundled digits,
32x32 grey) for a few epochs through the components (ingest, validate, Lightning, ONNX export, bundle),
or takes an existing bundle with --bundle (e.g. runs/RUN/package/bundle of a `visionflow run`). Then
starts the real server (`python -m components.serving`, uvicorn, in its own process, on a free loopback
port) and sends the digits test images from N concurrent keep-alive clients (httpx), one image per
request and 8 images per request (multipart). The same images go through the same Predictor in this
process (decode, preprocess, onnxruntime; same client threads, same onnxruntime threads). Each row is
the median of --repeats rounds, server and in-process rounds interleaved (the machine may be shared).
Prints one table: requests/s, images/s, p50 and p99 latency, CPU milliseconds per request (the server
process's own, or this process's for in-process: a figure other tenants disturb less than wall time) and
the ratio server / in-process of requests/s.

    python bench/serve.py [--bundle PATH] [--clients 8] [--requests 400] [--repeats 3] [--threads 1]
                          [--epochs 2] [--set model.name=resnet18 --set augment.image_size=64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from components.quiet import set_offline_defaults  # noqa: E402 - before prefect / mlflow / albumentations

set_offline_defaults()

import httpx
import numpy as np
import psutil
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from components.config import PipelineParams, load_params
from components.data.ingest import ingest, read_manifest
from components.data.manifest import rows_of_split
from components.optimization.measure import cpu_model
from components.serving.predictor import Predictor, top_k_predictions

BATCH_SIZES = (1, 8)
ROOT = Path(__file__).resolve().parents[1]


class Figures(BaseModel):
    """One measured configuration."""

    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float


def build_bundle(params: PipelineParams, epochs: int, work: Path) -> Path:
    """Train params' model for `epochs` on params' data (train/val splits) and write a verified bundle.

    Uses the components directly (no Prefect, no MLflow): ingest, validate, ClassifierModule +
    fit_in_process, export_onnx, write_bundle. Returns the bundle folder; its metrics hold the
    test-split accuracy.
    """
    from components.data.augment import eval_preprocess_spec
    from components.data.validate import validate
    from components.packaging.bundle import write_bundle
    from components.packaging.export import export_onnx
    from components.packaging.model_card import model_card
    from components.packaging.package import bundle_accuracy
    from components.training.fit import fit_in_process, model_spec_from_params
    from components.training.module import ClassifierModule

    snapshot = ingest(params.data, work / "snapshot", Path(params.run.cache_dir))
    report = validate(snapshot, params.data, work / "data")
    rows = read_manifest(report.clean_manifest_path)
    spec = model_spec_from_params(params, len(snapshot.classes))
    module = ClassifierModule(
        spec.model_dump(), params.train.model_dump(), snapshot.classes, params.augment.model_dump()
    )
    if epochs:  # 0: untrained weights, the same speed
        fit_in_process(module, params, rows, snapshot.classes, epochs)
    onnx_path = export_onnx(module.model.eval(), spec, work / "export" / "model.onnx")
    preprocess = eval_preprocess_spec(params.augment, params.data.channels)
    card = model_card(
        f"bench-{spec.name}",
        params.data.path,
        snapshot.fingerprint,
        snapshot.split_counts,
        {},
        architecture=spec.name,
        labels=snapshot.classes,
    )
    bundle = write_bundle(work / "bundle", onnx_path, snapshot.classes, preprocess, {}, card)
    accuracy = bundle_accuracy(bundle, rows_of_split(rows, "test"), params.data.max_pixels)
    return write_bundle(work / "bundle", onnx_path, snapshot.classes, preprocess, {"accuracy": accuracy}, card)


def test_images(params: PipelineParams, work: Path, count: int = 64) -> list[bytes]:
    """The encoded files of up to `count` test-split images of params' data set."""
    snapshot = ingest(params.data, work / "images-snapshot", Path(params.run.cache_dir))
    rows = rows_of_split(read_manifest(snapshot.manifest_path), "test")[:count]
    return [Path(row["path"]).read_bytes() for row in rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    """Start `python -m components.serving` on a free loopback port; returns (process, base URL) once /ready."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "components.serving",
            str(bundle),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--max-batch",
            str(max_batch),
            "--batch-timeout-ms",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.terminate()
    raise RuntimeError("server not ready within 60 s")


def run_clients(
    make_call: Callable[[], Callable[[list[bytes]], bool]],
    jobs: list[list[bytes]],
    clients: int,
    cpu_seconds: Callable[[], float],
) -> Figures:
    """Run `jobs` (lists of encoded images) from `clients` threads, each with its own call from make_call().

    A call returns True on success; `cpu_seconds` reads the CPU clock of whoever does the work. Returns
    the Figures (latency per job, throughput and CPU time over the run).
    """
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        nonlocal errors
        call = make_call()
        barrier.wait()
        for job in jobs[index::clients]:
            start = time.perf_counter()
            ok = call(job)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                errors += not ok

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        barrier.wait()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for future in futures:
            future.result()
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    ms = np.asarray(latencies) * 1000
    images = sum(len(job) for job in jobs)
    return Figures(
        requests=len(jobs),
        errors=errors,
        seconds=seconds,
        requests_per_s=len(jobs) / seconds,
        images_per_s=images / seconds,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        cpu_ms_per_request=cpu * 1000 / len(jobs),
    )


def median_round(rounds: list[Figures]) -> Figures:
    """The round with the median requests/s."""
    return sorted(rounds, key=lambda f: f.requests_per_s)[len(rounds) // 2]


def encode_request(images: list[bytes]) -> tuple[bytes, str]:
    """(body, Content-Type) of a /predict request: one image as the raw body, several as multipart files.

    Bodies are encoded before the clock starts, so the load generator measures the server, not
    httpx's multipart encoder (which shares the CPUs with the server here)."""
    if len(images) == 1:
        return images[0], "image/png"
    request = httpx.Request(
        "POST", "http://x/predict", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
    )
    return request.read(), request.headers["content-type"]


def http_call(url: str, bodies: dict[int, tuple[bytes, str]]) -> Callable[[list[bytes]], bool]:
    """A keep-alive client posting the pre-encoded body of each job (keyed by the job's id()).

    http.client rather than httpx: the load generator shares the CPUs with the server, and the standard
    library's client spends about a third of httpx's CPU time per request."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def call(images: list[bytes]) -> bool:
        body, content_type = bodies[id(images)]
        connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        payload = response.read()
        return response.status == 200 and len(json.loads(payload)["predictions"]) == len(images)

    return call


def inprocess_call(predictor: Predictor, top_k: int) -> Callable[[list[bytes]], bool]:
    """The server's work without HTTP: decode, preprocess, one onnxruntime call, top-k."""

    def call(images: list[bytes]) -> bool:
        batch = np.stack([predictor.preprocess_image(predictor.decode(data)) for data in images])
        return len(top_k_predictions(predictor.probabilities(batch), predictor.labels, top_k)) == len(images)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="An existing bundle folder (default: train one).")
    parser.add_argument("--params", default=str(ROOT / "params" / "default.yaml"))
    parser.add_argument(
        "--set", action="append", default=[], help="Param override for the trained model and the images."
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="Epochs of the model trained for the bench (0: untrained)."
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="Requests per round (after a 5%% warm-up).")
    parser.add_argument("--repeats", type=int, default=3, help="Rounds per configuration; the median is shown.")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, server and in-process.")
    parser.add_argument("--max-batch", type=int, default=32, help="The server's dynamic batching limit (images).")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="visionflow-bench-serve-"))
    params = load_params(args.params, ["train.progress_bar=false", "train.num_workers=0", *args.set])
    start = time.perf_counter()
    bundle = args.bundle or build_bundle(params, args.epochs, work)
    built = time.perf_counter() - start
    images = test_images(params, work)
    predictor = Predictor(bundle, threads=args.threads)
    server, url = start_server(bundle, args.threads, args.max_batch)
    server_process = psutil.Process(server.pid)

    def server_cpu() -> float:
        return sum(server_process.cpu_times()[:2])

    rows = []
    try:
        for batch in BATCH_SIZES:
            jobs = [[images[(i * batch + j) % len(images)] for j in range(batch)] for i in range(args.requests)]
            bodies = {id(job): encode_request(job) for job in jobs}
            warm = jobs[: max(args.clients, args.requests // 20)]
            run_clients(lambda bodies=bodies: http_call(url, bodies), warm, args.clients, server_cpu)
            run_clients(lambda: inprocess_call(predictor, 3), warm, args.clients, time.process_time)
            rounds_http, rounds_local = [], []
            for _ in range(args.repeats):
                call = lambda bodies=bodies: http_call(url, bodies)  # noqa: E731
                rounds_http.append(run_clients(call, jobs, args.clients, server_cpu))
                rounds_local.append(
                    run_clients(lambda: inprocess_call(predictor, 3), jobs, args.clients, time.process_time)
                )
            rows.append((batch, median_round(rounds_http), median_round(rounds_local)))
    finally:
        server.terminate()
        server.wait(timeout=30)

    table = Table(
        title=(
            f"model server vs onnxruntime in-process: {Predictor(bundle).input_shape} input, {args.clients} clients, "
            f"median of {args.repeats} rounds of {args.requests} requests, {args.threads} onnxruntime thread(s); "
            f"{cpu_model()}, "
            f"{os.cpu_count()} CPUs"
        ),
        title_justify="left",
    )
    for column in (
        "images / request",
        "path",
        "requests/s",
        "images/s",
        "p50 ms",
        "p99 ms",
        "CPU ms / request",
        "errors",
        "server / in-process",
    ):
        table.add_column(column)
    for batch, over_http, in_process in rows:
        for name, f in (("HTTP server (uvicorn, dynamic batching)", over_http), ("onnxruntime in-process", in_process)):
            ratio = f"{over_http.requests_per_s / in_process.requests_per_s:.2f}" if f is over_http else ""
            table.add_row(
                str(batch),
                name,
                f"{f.requests_per_s:.0f}",
                f"{f.images_per_s:.0f}",
                f"{f.p50_ms:.2f}",
                f"{f.p99_ms:.2f}",
                f"{f.cpu_ms_per_request:.2f}",
                str(f.errors),
                ratio,
            )
    console = Console(width=200)
    console.print(table)
    source = (
        f"--bundle {args.bundle}"
        if args.bundle
        else f"trained {params.model.name} for {args.epochs} epochs in {built:.0f} s"
    )
    console.print(
        f"bundle: {bundle} ({source}); test accuracy {Predictor(bundle).metrics.get('accuracy', float('nan')):.4f}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
