"""Hostile requests against the dev server, mixed with good ones: bounded memory, right answers.

Starts ``python -m lungtf.serving serve`` on a free loopback port over an exported model (an
untrained ``build_model`` export unless ``--base-path`` is given), then from ``--clients``
threads sends, for ``--seconds``, a mix of good Predict requests (1-8 real tiles; a
``--good-share`` of the calls) and hostile ones, each client cycling through the hostile kinds
in its own order:

- ``bomb_png``: a good tile and a 389 KB PNG declaring 20000 x 20000 pixels (1.2 GB as RGB);
- ``jpeg_header_bomb``: a small JPEG whose header was patched to declare 60000 x 60000 pixels;
- ``pixel_budget``: five 4096 x 4096 PNGs (each at the per-image cap, together above the batch
  pixel budget);
- ``overflow_header``: the same five behind a PNG header declaring 0xFFFFFFFF x 0xFFFFFFFF
  (its int64 product wraps negative, which once lowered the batch total below the budget);
- ``inflated_strings``: one tile declared as shape [64] (63 values missing);
- ``declared_10000``: one tile declared as a batch of 10,000 images;
- ``batch_10000``: 10,000 real (tiny) images in one request;
- ``inflated_pixels``: ``predict_pixels`` declaring [64, S, S, 3] floats and sending none;
- ``oversize_image``: one 17 MiB image; ``oversize_message``: a 70 MiB request;
- ``not_an_image``, ``gif``: bytes the signature does not decode;
- ``unknown_version``: a version that does not exist (NOT_FOUND, naming only what was asked);
- ``unknown_dtype``: a tile whose tensor declares dtype 9999, a number ``DataType`` lacks;
- ``abandoned``: 64 good tiles with a 20 ms deadline, so the client gives up mid-work;
- ``burst``: besides the mix, ``--burst`` (16) requests of ``--burst-mib`` (60 MiB: four
  15 MiB items that are not images) sent at once one second in, so the in-flight byte budget
  (``--max-inflight-bytes``) decides how many the server reads and parses together.

It prints per kind the status counts and latency, the server's RSS over time (sampled from
``/proc`` every 0.25 s), and exits 1 when a hostile request is answered OK, UNKNOWN or INTERNAL
(or any status outside its kind's expected ones), a good request fails, the server dies, or its
RSS reaches ``--max-rss-gib`` (2 GiB).

    python bench/hostile.py [--seconds 60] [--clients 8] [--backbone regnet --image-size 224]
        [--base-path models/lungtf] [--tiles DIR] [--burst 16 --burst-mib 60]
"""

from __future__ import annotations

import argparse
import collections
import io
import itertools
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's lungtf (the server runs it too), not an installed one

import grpc
import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from lungtf import export
from lungtf.constants import CLASS_NAMES
from lungtf.data.hostile import png_bomb, png_header

SHARED = REPO.parent / "shared" / "data" / "lc25000-lung-224"
MiB = 2**20
REFUSED = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
EXPECTED = collections.defaultdict(lambda: REFUSED, {
    "good": {"OK"},
    "unknown_version": {"NOT_FOUND"},
    "abandoned": {"DEADLINE_EXCEEDED", "CANCELLED"},
})  # fmt: skip
"""Statuses each kind may get; anything else (OK, UNKNOWN, INTERNAL for a hostile kind) fails."""


def jpeg_declaring(tile: bytes, side: int) -> bytes:
    """``tile`` (a baseline JPEG) with its SOF0 header patched to declare ``side`` x ``side``."""
    at = tile.index(b"\xff\xc0")
    return tile[: at + 5] + struct.pack(">HH", side, side) + tile[at + 9 :]


def load_tiles(folder: Path, count: int) -> list[bytes]:
    """Real JPEG tiles round-robin over the classes, or generated ones when ``folder`` is absent."""
    per_class = [sorted((folder / c).glob("*.jp*g"))[:count] for c in CLASS_NAMES]
    files = [f for group in zip(*per_class) for f in group]
    if files:
        return [files[i % len(files)].read_bytes() for i in range(count)]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def strings(items: list[bytes], declared: list[int] | None = None) -> Any:
    proto = tf.make_tensor_proto(items, dtype=tf.string)
    if declared is not None:
        proto.tensor_shape.Clear()
        for size in declared:
            proto.tensor_shape.dim.add(size=size)
    return proto


def with_dtype(proto: Any, dtype: int) -> Any:
    proto.dtype = dtype
    return proto


def burst_request(mib: int) -> bytes:
    """A serialized request of about ``mib`` MiB: four equal items starting like a JPEG and then
    zeros (each under the 16 MiB item limit, so the whole request is parsed and converted)."""
    item = b"\xff\xd8\xff" + bytes(mib * MiB // 4 - 1024)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "lungtf"
    req.inputs["image_bytes"].CopyFrom(strings([item] * 4))
    return req.SerializeToString()


def build_requests(tiles: list[bytes], size: int) -> dict[str, tuple[Any, float]]:
    """``{kind: (PredictRequest, client deadline in seconds)}`` (good ones are drawn per call)."""

    def request(signature: str = "", version: int | None = None, **inputs: Any) -> Any:
        req = predict_pb2.PredictRequest()
        req.model_spec.name, req.model_spec.signature_name = "lungtf", signature
        if version is not None:
            req.model_spec.version.value = version
        for alias, proto in inputs.items():
            req.inputs[alias].CopyFrom(proto)
        return req

    pixels = tf.make_tensor_proto(np.zeros(1, np.float32))
    pixels.ClearField("tensor_content")
    pixels.tensor_shape.Clear()
    for dim in (64, size, size, 3):
        pixels.tensor_shape.dim.add(size=dim)
    small = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(small, "JPEG")
    gif = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(gif, "GIF")
    wrap = png_header(2**32 - 1, 2**32 - 1)  # width x height wraps to a negative int64
    return {
        "bomb_png": (request(image_bytes=strings([tiles[0], png_bomb(20000)])), 60),
        "jpeg_header_bomb": (request(image_bytes=strings([jpeg_declaring(tiles[0], 60000)])), 60),
        "pixel_budget": (request(image_bytes=strings([png_bomb(4096)] * 5)), 60),
        "overflow_header": (request(image_bytes=strings([png_bomb(4096)] * 5 + [wrap])), 60),
        "inflated_strings": (request(image_bytes=strings(tiles[:1], [64])), 60),
        "declared_10000": (request(image_bytes=strings(tiles[:1], [10000])), 60),
        "batch_10000": (request(image_bytes=strings([small.getvalue()] * 10000)), 60),
        "inflated_pixels": (request("predict_pixels", pixels=pixels), 60),
        "oversize_image": (request(image_bytes=strings([b"\xff\xd8\xff" + bytes(17 * MiB)])), 60),
        "oversize_message": (request(image_bytes=strings([bytes(10 * MiB)] * 7)), 60),
        "not_an_image": (request(image_bytes=strings([os.urandom(5000)])), 60),
        "gif": (request(image_bytes=strings([gif.getvalue()])), 60),
        "unknown_version": (request(version=999, image_bytes=strings(tiles[:1])), 60),
        "unknown_dtype": (request(image_bytes=with_dtype(strings(tiles[:1]), 9999)), 60),
        "abandoned": (request(image_bytes=strings(tiles[:64])), 0.02),
    }


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (``VmRSS``), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            line = next(x for x in fh if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


def start_server(source: Path, workers: int, *flags: str) -> tuple[subprocess.Popen, str]:
    """The dev server on a free loopback port, default limits unless ``flags`` change them,
    serving ``source`` (a model base path, or a ModelServerConfig file); returns it and
    ``HOST:PORT``."""
    flag = "--config" if source.is_file() else "--model-base-path"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lungtf.serving", "serve", flag, str(source),
         "--port", "0", "--workers", str(workers), *flags],
        stdout=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    for line in proc.stdout:
        if line.decode().startswith("listening on "):
            return proc, line.decode().split()[-1]
    raise RuntimeError(f"the dev server exited with code {proc.wait()} before listening")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-path", type=Path, help="existing export (integer versions inside)")
    p.add_argument("--backbone", default="regnet", help="built when --base-path is not given")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--tiles", type=Path, default=SHARED, help="class folders of JPEG tiles")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to send the mix")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--workers", type=int, default=8, help="server worker threads")
    p.add_argument("--good-share", type=float, default=0.5, help="fraction of good requests")
    p.add_argument("--max-rss-gib", type=float, default=2.0, help="fail at this server RSS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--burst", type=int, default=16, help="concurrent large requests, 1 s in")
    p.add_argument("--burst-mib", type=int, default=60, help="size of each burst request")
    p.add_argument("--max-inflight-bytes", type=int, help="the server's flag (default: its own)")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="lungtf-hostile-")
    if args.base_path is None:
        import lungtf.models
        from lungtf.config import ModelConfig

        cfg = ModelConfig(backbone=args.backbone, weights="none", image_size=args.image_size)
        args.base_path = Path(tmp.name) / "lungtf"
        export.export_model(lungtf.models.build_model(cfg), args.base_path, {"backbone": args.backbone})
    size = args.image_size
    tiles = load_tiles(args.tiles, 64)
    hostile = build_requests(tiles, size)
    budget = [] if args.max_inflight_bytes is None else ["--max-inflight-bytes", str(args.max_inflight_bytes)]
    proc, target = start_server(args.base_path, args.workers, *budget)
    options = [("grpc.max_receive_message_length", 64 * MiB)]
    channel = grpc.insecure_channel(target, options=options)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    good_req = predict_pb2.PredictRequest()
    good_req.model_spec.name = "lungtf"
    good_req.inputs["image_bytes"].CopyFrom(strings(tiles[:1]))
    stub.Predict(good_req, timeout=600)  # loaded and warm
    idle = rss_bytes(proc.pid)
    samples: list[tuple[float, int]] = []
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latency: dict[str, list[float]] = collections.defaultdict(list)
    failures: list[str] = []
    lock, stop = threading.Lock(), threading.Event()
    start = time.monotonic()

    def sample() -> None:
        while not stop.wait(0.25):
            samples.append((time.monotonic() - start, rss_bytes(proc.pid)))

    def client(seed: int) -> None:
        rng = random.Random(seed)
        kinds = sorted(hostile)
        rng.shuffle(kinds)
        turn = itertools.cycle(kinds)  # every hostile kind in turn, each client in its own order
        while not stop.is_set() and time.monotonic() - start < args.seconds:
            if rng.random() < args.good_share:
                kind, count = "good", rng.randint(1, 8)
                req = predict_pb2.PredictRequest()
                req.model_spec.name = "lungtf"
                req.inputs["image_bytes"].CopyFrom(strings(rng.sample(tiles, count)))
                deadline = 120.0
            else:
                kind = next(turn)
                req, deadline = hostile[kind]
            send(kind, stub.Predict, req, timeout=deadline)

    def send(kind: str, call: Any, *args: Any, **kwargs: Any) -> None:
        began = time.monotonic()
        try:
            call(*args, **kwargs)
            code, detail = "OK", ""
        except grpc.RpcError as err:
            code, detail = err.code().name, err.details() or ""
        with lock:
            counts[kind][code] += 1
            latency[kind].append(time.monotonic() - began)
            if code not in EXPECTED[kind]:
                failures.append(f"{kind}: {code} {detail[:200]}")

    big = burst_request(args.burst_mib) if args.burst else b""
    raw_predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")

    def burst() -> None:
        if not stop.wait(1.0):
            send("burst", raw_predict, big, timeout=120)

    threads = [threading.Thread(target=sample)]
    threads += [threading.Thread(target=burst) for _ in range(args.burst)]
    threads += [threading.Thread(target=client, args=(args.seed + i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    alive = proc.poll() is None
    channel.close()
    proc.terminate()
    proc.wait()
    tmp.cleanup()

    peak = max((r for _, r in samples), default=0)
    load = os.getloadavg()
    print(
        f"dev server over {args.base_path} ({size} px), {args.clients} clients x {args.seconds:.0f} s,"
        f" {args.workers} workers, --max-inflight-bytes {args.max_inflight_bytes or 'default'},"
        f" a burst of {args.burst} x {args.burst_mib} MiB, tiles from {args.tiles if args.tiles.is_dir() else 'generated'};"
        f" {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )
    print("\n| kind | answers | p50 s | expected |\n|---|---|---:|---|")
    for kind in ["good", *sorted(hostile), *(["burst"] if args.burst else [])]:
        answers = ", ".join(f"{c} {n}" for c, n in sorted(counts[kind].items())) or "none sent"
        p50 = f"{statistics.median(latency[kind]):.2f}" if latency[kind] else ""
        print(f"| {kind} | {answers} | {p50} | {' / '.join(sorted(EXPECTED[kind]))} |")
    print(f"\nserver RSS: {idle / MiB:.0f} MiB idle after warm-up, peak {peak / MiB:.0f} MiB")
    step = max(1, len(samples) // 12)
    print("RSS over time: " + ", ".join(
        f"{t:.0f} s {r / MiB:.0f} MiB" for t, r in samples[::step]))  # fmt: skip
    if not alive:
        failures.append("the server died")
    if peak >= args.max_rss_gib * 2**30:
        failures.append(f"server RSS peaked at {peak / 2**30:.2f} GiB (limit {args.max_rss_gib})")
    for failure in failures[:20]:
        print(f"FAIL {failure}")
    print("PASS" if not failures else f"FAIL: {len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
