"""Serving latency and throughput of the lungtf dev server, beside the model's own compute time.

Starts ``python -m lungtf.serving serve`` on a free loopback port over an exported model, then for
every batch size x concurrency sends ``Predict`` requests of real JPEG tiles (``serving_default``,
image bytes) from that many client threads and reports p50/p95 request latency and images/s. Beside
it, "model only" calls the loaded SavedModel's ``predict_pixels`` signature in this process on the
same tiles, already decoded. The server overhead (gRPC + protobuf + JPEG decode + resize) for one
224-px tile is measured in alternating pairs (an in-process call, then a served call of the same
tile) and reported as the median difference; the goal is <= 5 ms p50. On a loaded machine that
difference drowns in the model's own jitter, so its two parts are also timed without any model
compute: a Predict round trip to the input-less ``metadata`` signature and the decode + resize.
``--explain N`` (default 20) also times ``explain`` (prediction + Grad-CAM heatmap) beside
``serving_default`` for one tile over the server, alternating the two, N calls each.

    python bench/serving.py [--base-path models/lungtf | --backbone resnet50 --image-size 224]
        [--batch-sizes 1,8,32] [--concurrency 1,4,16] [--requests 8] [--pairs 20] [--explain 20]
        [--tiles DIR] [--out FILE]

Without ``--base-path`` it builds ``build_model(backbone, weights="none")`` (untrained weights time
the same as trained ones) and exports it to a temporary folder. Numbers depend on the machine and
on its load: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from lungtf import export
from lungtf.constants import CLASS_NAMES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "lc25000-lung-224"


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, in the same unit."""
    return float(np.percentile(np.asarray(values), q))


def load_tiles(folder: Path, count: int) -> list[bytes]:
    """``count`` JPEG tiles, round-robin over the class folders (repeated if there are fewer)."""
    per_class = [sorted((folder / c).glob("*.jp*g")) for c in CLASS_NAMES]
    files = [f for group in zip(*per_class) for f in group] or sorted(folder.rglob("*.jp*g"))
    if not files:
        raise FileNotFoundError(f"no JPEG tiles under {folder}")
    return [files[i % len(files)].read_bytes() for i in range(count)]


def start_server(base_path: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """The dev server on a free loopback port; returns the process and ``HOST:PORT``."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lungtf.serving",
            "serve",
            "--model-base-path",
            str(base_path),
            "--port",
            "0",
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    for line in proc.stdout:
        if line.decode().startswith("listening on "):
            return proc, line.decode().split()[-1]
    raise RuntimeError(f"the dev server exited with code {proc.wait()} before listening")


def model_only_ms(fn: Any, tiles: list[bytes], size: int, batch: int, repeats: int) -> list[float]:
    """Milliseconds per ``predict_pixels`` call (``fn``) on pre-decoded tiles, in this process."""
    pixels = export.decode_and_resize(tf.constant(tiles[:batch]), size)
    fn(pixels=pixels)  # first call allocates buffers for this shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(pixels=pixels)["probabilities"].numpy()
        times.append(1000 * (time.perf_counter() - start))
    return times


def paired_overhead_ms(fn: Any, target: str, tile: bytes, size: int, pairs: int) -> list[float]:
    """Single-tile server latency minus model-only time, measured in alternating pairs.

    On a shared machine the load drifts; timing a Predict call right after an in-process
    ``predict_pixels`` call on the same (pre-decoded) tile, and taking the median difference,
    keeps both halves of each pair under nearly the same load.
    """
    pixels = export.decode_and_resize(tf.constant([tile]), size)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "lungtf"
    req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([tile], dtype=tf.string))
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(req, timeout=600)
        fn(pixels=pixels)
        diffs = []
        for _ in range(pairs):
            start = time.perf_counter()
            fn(pixels=pixels)["probabilities"].numpy()
            middle = time.perf_counter()
            stub.Predict(req, timeout=600)
            diffs.append(1000 * ((time.perf_counter() - middle) - (middle - start)))
    return diffs


def overhead_parts_ms(target: str, tile: bytes, size: int, repeats: int) -> tuple[float, float]:
    """p50 of the two parts of the overhead, each free of model compute: a gRPC round trip
    through the server's Predict path (the ``metadata`` signature, no inputs, no compute) and the
    decode + resize of one tile (the ops ``serving_default`` runs before the model)."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name, req.model_spec.signature_name = "lungtf", "metadata"
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        rtt = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            stub.Predict(req, timeout=600)
            rtt.append(1000 * (time.perf_counter() - start))
    decode_fn = tf.function(lambda data: export.decode_and_resize(data, size))  # a graph, as served
    batch = tf.constant([tile])
    decode = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        decode_fn(batch).numpy()
        decode.append(1000 * (time.perf_counter() - start))
    return statistics.median(rtt[1:]), statistics.median(decode[1:])


def explain_vs_predict_ms(target: str, tile: bytes, calls: int) -> dict[str, list[float]]:
    """Latencies of one-tile ``serving_default`` and ``explain`` calls, alternated (after one
    untimed call of each) so both see the same machine load."""
    requests = {}
    for name in ("serving_default", "explain"):
        req = predict_pb2.PredictRequest()
        req.model_spec.name, req.model_spec.signature_name = "lungtf", name
        req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([tile], dtype=tf.string))
        requests[name] = req
    times: dict[str, list[float]] = {name: [] for name in requests}
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for i in range(calls + 1):
            for name, req in requests.items():
                start = time.perf_counter()
                stub.Predict(req, timeout=600)
                if i:
                    times[name].append(1000 * (time.perf_counter() - start))
    return times


def server_cell(target: str, tiles: list[bytes], batch: int, threads: int, requests: int) -> dict:
    """``requests`` Predict calls of ``batch`` tiles from ``threads`` concurrent clients."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "lungtf"
    req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(tiles[:batch], dtype=tf.string))
    channel = grpc.insecure_channel(target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    stub.Predict(req, timeout=600)  # warm the connection and this batch shape
    latencies: list[float] = []
    lock = threading.Lock()
    todo = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            start = time.perf_counter()
            stub.Predict(req, timeout=600)
            with lock:
                latencies.append(1000 * (time.perf_counter() - start))

    pool = [threading.Thread(target=client) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - start
    channel.close()
    return {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "img_s": batch * requests / wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-path", type=Path, help="existing export (integer versions inside)")
    p.add_argument("--backbone", default="resnet50", help="built when --base-path is not given")
    p.add_argument("--variant", default=None)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument(
        "--requests", type=int, default=8, help="requests per cell (at least concurrency)"
    )
    p.add_argument("--repeats", type=int, default=10, help="model-only calls per batch size")
    p.add_argument("--pairs", type=int, default=20, help="paired single-tile overhead samples")
    p.add_argument("--explain", type=int, default=20, help="one-tile explain vs predict calls")
    p.add_argument("--tiles", type=Path, default=SHARED, help="class folders of JPEG tiles")
    p.add_argument("--workers", type=int, default=16, help="server worker threads")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="lungtf-bench-")
    if args.base_path is None:
        import lungtf.models
        from lungtf.config import ModelConfig

        cfg = ModelConfig(
            backbone=args.backbone, variant=args.variant, weights="none", image_size=args.image_size
        )
        args.base_path = Path(tmp.name) / "lungtf"
        export.export_model(
            lungtf.models.build_model(cfg),
            args.base_path,
            {"backbone": args.backbone, "variant": args.variant},
        )
    version_dir = args.base_path / str(export.numeric_versions(args.base_path)[-1])
    loaded = tf.saved_model.load(str(version_dir))
    fn = loaded.signatures["predict_pixels"]
    size = int(json.loads(loaded.signatures["metadata"]()["json"].numpy())["image_size"])
    tiles = load_tiles(args.tiles, max(batches))
    model = {b: model_only_ms(fn, tiles, size, b, args.repeats) for b in batches}
    proc, target = start_server(args.base_path, args.workers)
    try:
        rows = []
        for b in batches:
            for c in concurrency:
                cell = server_cell(target, tiles, b, c, max(args.requests, c))
                rows.append((b, c, cell))
                print(f"batch {b:>2} x {c:>2} clients: p50 {cell['p50']:.1f} ms", file=sys.stderr)
        overhead = paired_overhead_ms(fn, target, tiles[0], size, args.pairs)
        rtt, decode = overhead_parts_ms(target, tiles[0], size, 5 * args.pairs)
        explained = explain_vs_predict_ms(target, tiles[0], args.explain) if args.explain else {}
    finally:
        proc.terminate()
        proc.wait()
    load = os.getloadavg()
    lines = [
        (
            f"Dev server on loopback, {version_dir} ({size} px, tiles from {args.tiles}); "
            f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            "(shared machine: other jobs were running)."
        ),
        "",
        "| batch | clients | p50 ms | p95 ms | img/s | model-only p50 ms (batch, in-process) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b, c, cell in rows:
        lines.append(
            f"| {b} | {c} | {cell['p50']:.1f} | {cell['p95']:.1f} | "
            f"{cell['img_s']:.1f} | {statistics.median(model[b]):.1f} |"
        )
    lines += [
        "",
        (
            f"Server overhead (gRPC + protobuf + JPEG decode + resize) for one {size}-px tile: "
            f"median {statistics.median(overhead):.1f} ms, p25-p75 {percentile(overhead, 25):.1f} to "
            f"{percentile(overhead, 75):.1f} ms over {len(overhead)} paired calls (goal <= 5 ms p50)."
        ),
    ]
    lines.append(
        f"Its parts, each without model compute: gRPC round trip through Predict p50 {rtt:.1f} ms "
        f"+ decode and resize of the tile p50 {decode:.1f} ms = {rtt + decode:.1f} ms."
    )
    for name, times in explained.items():
        lines.append(
            f"One {size}-px tile over the server, {name}: p50 {percentile(times, 50):.1f} ms, "
            f"p95 {percentile(times, 95):.1f} ms ({len(times)} calls, alternated)."
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
