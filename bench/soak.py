"""Soak the dev server: many Predict calls, a share of them malformed, a version swap mid-run.

Starts ``python -m lungtf.serving serve`` on a free loopback port (``bench.hostile.start_server``)
over a temporary base path with a ``latest 2`` version policy, holding either the newest version
of ``--base-path`` (copied; the given folder is never touched) or, without it, an untrained
``build_model`` export (``--backbone``/``--variant``/``--image-size``). Then ``--threads`` client
threads send ``--requests`` Predict calls in a shuffled order; a ``--malformed`` share of them
(20 %) is malformed, in equal numbers of each kind:

- ``undecodable``: random bytes; ``truncated``: the first half of a JPEG tile; ``empty``: b"";
- ``wrong_input_name``, ``wrong_dtype`` (float values for ``image_bytes``), ``wrong_shape``
  (``image_bytes`` of shape [1, 1]);
- ``unknown_model``, ``unknown_version``, ``unknown_signature``;
- ``oversized_message`` (a request 1 MiB above the server's 64 MiB message limit) and
  ``too_many_images`` (65 tiles, one above the per-request batch limit).

Good calls carry 1-4 real tiles (``--tiles``; generated ones when absent), no version (the newest
answers). When 40 % of the calls are done a copy of the served version is dropped in as the next
version (written to a hidden folder, then renamed, as ``lungtf.export`` does); at 70 % the old
version's folder is deleted. The server's RSS is sampled from ``/proc`` every 0.25 s.

It prints per kind the status counts, good-call p50/p99 latency, calls/s, which versions
answered, RSS over the run and whether it levels off (the growth of a straight-line fit over the
last quarter of the calls, after the swap and the removal). It exits 1 on any failed good call,
any malformed call answered outside its expected status (OK, UNKNOWN and INTERNAL included), a
version that is not loaded or unloaded within ``--swap-timeout`` seconds, or a dead server.

    python bench/soak.py [--base-path models/lungtf] [--requests 10000] [--threads 16]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's lungtf and bench (the server runs it too)

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from bench.hostile import SHARED, load_tiles, rss_bytes, start_server, strings
from lungtf import export
from lungtf.client import LungClientError, parse_predictions
from lungtf.serving.limits import Limits

MiB = 2**20
EXPECTED = {
    "good": {"OK"},
    "undecodable": {"INVALID_ARGUMENT"},
    "truncated": {"INVALID_ARGUMENT"},
    "empty": {"INVALID_ARGUMENT"},
    "wrong_input_name": {"INVALID_ARGUMENT"},
    "wrong_dtype": {"INVALID_ARGUMENT"},
    "wrong_shape": {"INVALID_ARGUMENT"},
    "unknown_model": {"NOT_FOUND"},
    "unknown_version": {"NOT_FOUND"},
    "unknown_signature": {"FAILED_PRECONDITION"},
    "oversized_message": {"RESOURCE_EXHAUSTED"},
    "too_many_images": {"INVALID_ARGUMENT"},
}
"""The one status each kind may get (TF Serving's codes); anything else fails the run."""
MALFORMED = [k for k in EXPECTED if k != "good"]
CONFIG = """model_config_list {{
  config {{
    name: "lungtf"
    base_path: "{base}"
    model_platform: "tensorflow"
    model_version_policy {{ latest {{ num_versions: 2 }} }}
  }}
}}
"""


def request(
    signature: str = "", name: str = "lungtf", version: int | None = None, **inputs: Any
) -> Any:
    """A ``PredictRequest`` with the given inputs (``TensorProto`` values)."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name, req.model_spec.signature_name = name, signature
    if version is not None:
        req.model_spec.version.value = version
    for alias, proto in inputs.items():
        req.inputs[alias].CopyFrom(proto)
    return req


def malformed_requests(tiles: list[bytes], limits: Limits) -> dict[str, Any]:
    """``{kind: PredictRequest}`` for every malformed kind (built once, sent many times)."""
    tile = strings(tiles[:1])
    over = limits.max_message_bytes + MiB
    return {
        "undecodable": request(image_bytes=strings([random.Random(0).randbytes(5000)])),
        "truncated": request(image_bytes=strings([tiles[0][: len(tiles[0]) // 2]])),
        "empty": request(image_bytes=strings([b""])),
        "wrong_input_name": request(images=tile),
        "wrong_dtype": request(image_bytes=tf.make_tensor_proto([1.0, 2.0], dtype=tf.float32)),
        "wrong_shape": request(image_bytes=strings(tiles[:1], [1, 1])),
        "unknown_model": request(name="colon", image_bytes=tile),
        "unknown_version": request(version=999, image_bytes=tile),
        "unknown_signature": request("no_such_signature", image_bytes=tile),
        "oversized_message": request(image_bytes=strings([bytes(over)])),
        "too_many_images": request(
            image_bytes=strings([tiles[i % len(tiles)] for i in range(limits.max_batch_images + 1)])
        ),
    }


def schedule(total: int, share: float, seed: int) -> list[str]:
    """``total`` kinds in a shuffled order: ``share`` of them malformed, each kind equally often."""
    bad = round(total * share)
    kinds = ["good"] * (total - bad) + [MALFORMED[i % len(MALFORMED)] for i in range(bad)]
    random.Random(seed).shuffle(kinds)
    return kinds


def prepare_models(args: argparse.Namespace, root: Path) -> tuple[Path, int, str]:
    """The temporary base path with one version, that version and a description of the model."""
    base = root / "lungtf"
    if args.base_path is None:
        import lungtf.models
        from lungtf.config import ModelConfig

        cfg = ModelConfig(
            backbone=args.backbone, variant=args.variant, weights="none", image_size=args.image_size
        )
        path = export.export_model(
            lungtf.models.build_model(cfg), base, {"backbone": args.backbone}
        )
        name = f"{args.backbone} {args.variant or '(default variant)'}"
        return base, int(path.name), f"untrained {name} at {args.image_size} px, exported here"
    versions = export.numeric_versions(args.base_path)
    if not versions:
        raise SystemExit(f"error: no integer version folders in {args.base_path}")
    shutil.copytree(args.base_path / str(versions[-1]), base / str(versions[-1]))
    return base, versions[-1], f"{args.base_path} version {versions[-1]} (a copy)"


def version_states(stub: Any) -> dict[int, str]:
    """``{version: state}`` from ``GetModelStatus`` (empty when the model has none)."""
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "lungtf"
    try:
        answer = stub.GetModelStatus(req, timeout=10)
    except grpc.RpcError:
        return {}
    names = get_model_status_pb2.ModelVersionStatus.State
    return {s.version: names.Name(s.state) for s in answer.model_version_status}


def rss_trend(samples: list[tuple[float, int, int]], total: int) -> tuple[float, float]:
    """``(growth MiB, mean MiB)`` of a least-squares line through the RSS samples of the last
    quarter of the calls, growth taken over that quarter."""
    tail = [(done, rss / MiB) for _, done, rss in samples if done >= 0.75 * total and rss]
    if len(tail) < 3 or tail[-1][0] == tail[0][0]:
        return 0.0, statistics.fmean(r for _, r in tail) if tail else 0.0
    slope = statistics.linear_regression([d for d, _ in tail], [r for _, r in tail]).slope
    return slope * 0.25 * total, statistics.fmean(r for _, r in tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-path", type=Path, help="existing export; its newest version is copied")
    p.add_argument("--backbone", default="regnet", help="built when --base-path is not given")
    p.add_argument("--variant", default="200mf", help="backbone variant (regnet: 200mf ... 32gf)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--tiles", type=Path, default=SHARED, help="class folders of JPEG tiles")
    p.add_argument("--requests", type=int, default=10_000, help="Predict calls in all")
    p.add_argument("--threads", type=int, default=16, help="concurrent client threads")
    p.add_argument("--workers", type=int, default=8, help="server worker threads")
    p.add_argument("--malformed", type=float, default=0.2, help="share of malformed calls")
    p.add_argument("--swap-timeout", type=float, default=120.0, help="seconds to load/unload")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="lungtf-soak-")
    root = Path(tmp.name)
    base, old, model = prepare_models(args, root)
    (root / "models.config").write_text(CONFIG.format(base=base))
    tiles = load_tiles(args.tiles, 128)
    limits = Limits()
    bad_requests = malformed_requests(tiles, limits)
    kinds = schedule(args.requests, args.malformed, args.seed)
    proc, target = start_server(root / "models.config", args.workers)
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    stub.Predict(request(image_bytes=strings(tiles[:1])), timeout=600)  # loaded and warm
    idle = rss_bytes(proc.pid)

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    details: dict[tuple[str, str], str] = {}
    latency: list[float] = []
    answered_by: collections.Counter = collections.Counter()
    samples: list[tuple[float, int, int]] = []  # (seconds, calls done, RSS bytes)
    events: list[str] = []
    failures: list[str] = []
    lock, stop = threading.Lock(), threading.Event()
    next_call, done = iter(range(len(kinds))), [0]
    start = time.monotonic()

    drop_at, remove_at = int(0.4 * len(kinds)), int(0.7 * len(kinds))
    removed = threading.Event()  # calls from remove_at on wait for it (short runs: the swap)
    reached = [0.0]  # when remove_at calls were done

    def wait_for(condition: Any, what: str) -> bool:
        began = time.monotonic()
        while time.monotonic() - began < args.swap_timeout:
            if condition(version_states(models)):
                events.append(f"{what} after {time.monotonic() - began:.1f} s (at call {done[0]})")
                return True
            time.sleep(0.1)
        failures.append(f"{what}: not within {args.swap_timeout:.0f} s")
        return False

    def director() -> None:
        """Drop in version ``old + 1`` at 40 % of the calls and, once it is AVAILABLE, delete
        version ``old`` at 70 %; calls from 70 % on wait until the deletion is done."""
        try:
            while done[0] < drop_at:
                time.sleep(0.02)
            hidden = base / f".incoming-{old + 1}"
            shutil.copytree(base / str(old), hidden)
            hidden.rename(base / str(old + 1))
            events.append(f"version {old + 1} dropped in at call {done[0]}")
            if not wait_for(
                lambda s: s.get(old + 1) == "AVAILABLE", f"version {old + 1} AVAILABLE"
            ):
                return
            while done[0] < remove_at:
                time.sleep(0.02)
            shutil.rmtree(base / str(old))
            paused = time.monotonic() - reached[0]
            events.append(f"version {old} deleted at call {done[0]}")
            if paused > 0.5:
                events.append(f"calls from {remove_at} on waited {paused:.1f} s for the swap")
        finally:
            removed.set()
        wait_for(lambda s: s.get(old, "END") == "END", f"version {old} unloaded")

    def sampler() -> None:
        while not stop.wait(0.25):
            samples.append((time.monotonic() - start, done[0], rss_bytes(proc.pid)))

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with lock:
                index = next(next_call, None)
            if index is None:
                return
            if index >= remove_at:
                removed.wait()
            kind = kinds[index]
            if kind == "good":
                batch = rng.sample(tiles, rng.randint(1, 4))
                req = request(image_bytes=strings(batch))
            else:
                req = bad_requests[kind]
            began = time.monotonic()
            code, detail, version = "OK", "", None
            try:
                answer = stub.Predict(req, timeout=60)
                if kind == "good":
                    parse_predictions(answer, len(batch))
                    version = answer.model_spec.version.value
            except grpc.RpcError as err:
                code, detail = err.code().name, err.details() or ""
            except LungClientError as err:
                code, detail = f"bad answer ({err.code.name})", err.message
            took = time.monotonic() - began
            with lock:
                done[0] += 1
                if done[0] == remove_at:
                    reached[0] = time.monotonic()
                counts[kind][code] += 1
                details.setdefault((kind, code), detail)
                if kind == "good" and code == "OK":
                    latency.append(took)
                    answered_by[version] += 1

    helpers = [threading.Thread(target=sampler), threading.Thread(target=director)]
    clients = [threading.Thread(target=client, args=(args.seed + i,)) for i in range(args.threads)]
    for t in helpers + clients:
        t.start()
    for t in clients:
        t.join()
    wall = time.monotonic() - start
    stop.set()
    for t in helpers:
        t.join()
    alive = proc.poll() is None
    final = rss_bytes(proc.pid)
    channel.close()
    proc.terminate()
    proc.wait()
    tmp.cleanup()
    report(args, model, target, counts, details, latency, answered_by, events, wall)
    growth, mean = rss_trend(samples, len(kinds))
    peak = max((r for _, _, r in samples), default=0)
    print(
        f"\nserver RSS: {idle / MiB:.0f} MiB after warm-up, {final / MiB:.0f} MiB at the end, "
        f"peak {peak / MiB:.0f} MiB"
    )
    picked = samples[:: max(1, len(samples) // 16)]
    picked += samples[-1:] if picked and picked[-1] is not samples[-1] else []
    print("RSS over the run (s, calls done, MiB): " + ", ".join(
        f"{t:.0f} s {n} {r / MiB:.0f}" for t, n, r in picked))  # fmt: skip
    settled = growth <= max(16.0, 0.02 * mean)
    print(
        f"last quarter of the calls: RSS {growth:+.0f} MiB on a straight-line fit (mean "
        f"{mean:.0f} MiB): {'levels off' if settled else 'still growing'} (growth threshold: "
        "16 MiB or 2 %)"
    )
    for kind, expected in EXPECTED.items():
        for code, n in sorted(counts[kind].items()):
            if code not in expected:
                failures.append(f"{kind}: {n} x {code} {details[(kind, code)][:200]!r}")
    if not alive:
        failures.append("the server died")
    for failure in failures:
        print(f"FAIL {failure}")
    print("PASS" if not failures else f"FAIL: {len(failures)} problem(s)")
    return 1 if failures else 0


def report(
    args: argparse.Namespace,
    model: str,
    target: str,
    counts: dict[str, collections.Counter],
    details: dict[tuple[str, str], str],
    latency: list[float],
    answered_by: collections.Counter,
    events: list[str],
    wall: float,
) -> None:
    """Print the run's set-up, the status table, latency, throughput and the version events."""
    load = os.getloadavg()
    print(
        f"dev server at {target}, {args.workers} workers; model: {model}; {args.requests} calls "
        f"from {args.threads} threads, {args.malformed:.0%} malformed; tiles from "
        f"{args.tiles if args.tiles.is_dir() else 'generated'}; {os.cpu_count()} CPUs, load "
        f"average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )
    print("\n| kind | answers | expected | first message |\n|---|---|---|---|")
    for kind, expected in EXPECTED.items():
        answers = ", ".join(f"{c} {n}" for c, n in sorted(counts[kind].items())) or "none sent"
        first = next((d for (k, _), d in details.items() if k == kind and d), "")
        print(f"| {kind} | {answers} | {' / '.join(sorted(expected))} | {first[:90]} |")
    if latency:
        p50, p99 = np.percentile(latency, [50, 99])
        print(f"\ngood calls: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (1-4 tiles each)")
    print(f"{args.requests / wall:.1f} calls/s ({args.requests} calls in {wall:.1f} s)")
    print("good calls answered by version: " + ", ".join(
        f"{v}: {n}" for v, n in sorted(answered_by.items())))  # fmt: skip
    for event in events:
        print(f"event: {event}")


if __name__ == "__main__":
    sys.exit(main())
