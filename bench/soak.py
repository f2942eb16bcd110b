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


class Soak:
    """One run: the client threads, the version director and the RSS sampler, and what they saw.

    Args:
        args: the command line.
        proc, target: the server process and its ``HOST:PORT``.
        base, old: the served base path and its one version at the start.
        tiles: encoded tiles for good calls.
        kinds: the schedule (``schedule``).
    """

    def __init__(
        self, args: argparse.Namespace, proc: Any, target: str, base: Path, old: int,
        tiles: list[bytes], kinds: list[str],
    ) -> None:  # fmt: skip
        self.args, self.proc, self.base, self.old = args, proc, base, old
        self.tiles, self.kinds = tiles, kinds
        self.bad_requests = malformed_requests(tiles, Limits())
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.details: dict[tuple[str, str], str] = {}
        self.latency: list[float] = []
        self.answered_by: collections.Counter = collections.Counter()
        self.samples: list[tuple[float, int, int]] = []  # (seconds, calls done, RSS bytes)
        self.events: list[str] = []
        self.failures: list[str] = []
        self.lock, self.stop, self.removed = threading.Lock(), threading.Event(), threading.Event()
        self.next_call, self.done = iter(range(len(kinds))), 0
        self.drop_at, self.remove_at = int(0.4 * len(kinds)), int(0.7 * len(kinds))
        self.reached = self.paused = 0.0  # when remove_at calls were done; how long calls waited
        self.idle = 0  # server RSS after the warm-up call
        self.start = time.monotonic()

    def run(self) -> float:
        """Warm the model up, then send every call; returns the seconds the calls took."""
        self.stub.Predict(request(image_bytes=strings(self.tiles[:1])), timeout=600)
        self.idle = rss_bytes(self.proc.pid)
        self.start = time.monotonic()
        helpers = [threading.Thread(target=self.sampler), threading.Thread(target=self.director)]
        clients = [
            threading.Thread(target=self.client, args=(self.args.seed + i,))
            for i in range(self.args.threads)
        ]
        for t in helpers + clients:
            t.start()
        for t in clients:
            t.join()
        wall = time.monotonic() - self.start
        self.stop.set()
        for t in helpers:
            t.join()
        self.channel.close()
        return wall

    def wait_for(self, condition: Any, what: str) -> bool:
        """Poll ``GetModelStatus`` until ``condition(states)``; a failure after the timeout."""
        began = time.monotonic()
        while time.monotonic() - began < self.args.swap_timeout:
            if condition(version_states(self.models)):
                took = time.monotonic() - began
                self.events.append(f"{what} after {took:.1f} s (at call {self.done})")
                return True
            time.sleep(0.1)
        self.failures.append(f"{what}: not within {self.args.swap_timeout:.0f} s")
        return False

    def director(self) -> None:
        """Drop in version ``old + 1`` at 40 % of the calls and, once it is AVAILABLE, delete
        version ``old`` at 70 %; calls from 70 % on wait until the deletion is done."""
        old, new = self.old, self.old + 1
        try:
            while self.done < self.drop_at:
                time.sleep(0.02)
            hidden = self.base / f".incoming-{new}"
            shutil.copytree(self.base / str(old), hidden)
            hidden.rename(self.base / str(new))
            self.events.append(f"version {new} dropped in at call {self.done}")
            if not self.wait_for(lambda s: s.get(new) == "AVAILABLE", f"version {new} AVAILABLE"):
                return
            while self.done < self.remove_at:
                time.sleep(0.02)
            shutil.rmtree(self.base / str(old))
            self.paused = time.monotonic() - self.reached
            self.events.append(f"version {old} deleted at call {self.done}")
            if self.paused > 0.5:
                self.events.append(
                    f"calls from {self.remove_at} on waited {self.paused:.1f} s for the swap"
                )
        finally:
            self.removed.set()
        self.wait_for(lambda s: s.get(old, "END") == "END", f"version {old} unloaded")

    def sampler(self) -> None:
        while not self.stop.wait(0.25):
            self.samples.append(
                (time.monotonic() - self.start, self.done, rss_bytes(self.proc.pid))
            )

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with self.lock:
                index = next(self.next_call, None)
            if index is None:
                return
            if index >= self.remove_at:
                self.removed.wait()
            kind = self.kinds[index]
            batch = rng.sample(self.tiles, rng.randint(1, 4)) if kind == "good" else []
            req = request(image_bytes=strings(batch)) if batch else self.bad_requests[kind]
            began = time.monotonic()
            code, detail, version = "OK", "", None
            try:
                answer = self.stub.Predict(req, timeout=60)
                if batch:
                    parse_predictions(answer, len(batch))
                    version = answer.model_spec.version.value
            except grpc.RpcError as err:
                code, detail = err.code().name, err.details() or ""
            except LungClientError as err:
                code, detail = f"bad answer ({err.code.name})", err.message
            took = time.monotonic() - began
            with self.lock:
                self.done += 1
                if self.done == self.remove_at:
                    self.reached = time.monotonic()
                self.counts[kind][code] += 1
                self.details.setdefault((kind, code), detail)
                if batch and code == "OK":
                    self.latency.append(took)
                    self.answered_by[version] += 1

    def report(self, model: str, wall: float, final_rss: int) -> None:
        """Print the set-up, the status table, latency, throughput, version events and RSS."""
        args, load = self.args, os.getloadavg()
        print(
            f"dev server, {args.workers} workers; model: {model}; {args.requests} calls from "
            f"{args.threads} threads, {args.malformed:.0%} malformed; tiles from "
            f"{args.tiles if args.tiles.is_dir() else 'generated'}; {os.cpu_count()} CPUs, load "
            f"average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end"
        )
        print("\n| kind | answers | expected | first message |\n|---|---|---|---|")
        for kind, expected in EXPECTED.items():
            answers = ", ".join(f"{c} {n}" for c, n in sorted(self.counts[kind].items()))
            first = next((d for (k, _), d in self.details.items() if k == kind and d), "")
            print(f"| {kind} | {answers or 'none sent'} | {' / '.join(expected)} | {first[:90]} |")
        if self.latency:
            p50, p99 = np.percentile(self.latency, [50, 99])
            print(f"\ngood calls: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (1-4 tiles)")
        busy = wall - self.paused
        print(f"{args.requests / busy:.1f} calls/s ({args.requests} calls in {busy:.1f} s)")
        print("good calls answered by version: " + ", ".join(
            f"{v}: {n}" for v, n in sorted(self.answered_by.items())))  # fmt: skip
        for event in self.events:
            print(f"event: {event}")
        growth, mean = rss_trend(self.samples, len(self.kinds))
        peak = max((r for _, _, r in self.samples), default=0)
        print(
            f"\nserver RSS: {self.idle / MiB:.0f} MiB after warm-up, {final_rss / MiB:.0f} MiB "
            f"at the end, peak {peak / MiB:.0f} MiB"
        )
        picked = self.samples[:: max(1, len(self.samples) // 16)]
        picked += self.samples[-1:] if picked and picked[-1] is not self.samples[-1] else []
        print("RSS over the run (s, calls done, MiB): " + ", ".join(
            f"{t:.0f} s {n} {r / MiB:.0f}" for t, n, r in picked))  # fmt: skip
        settled = growth <= max(16.0, 0.02 * mean)
        print(
            f"last quarter of the calls: RSS {growth:+.0f} MiB on a straight-line fit (mean "
            f"{mean:.0f} MiB): {'levels off' if settled else 'still growing'} (growth "
            "threshold: 16 MiB or 2 %)"
        )


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
    with tempfile.TemporaryDirectory(prefix="lungtf-soak-") as tmp:
        root = Path(tmp)
        base, old, model = prepare_models(args, root)
        (root / "models.config").write_text(CONFIG.format(base=base))
        tiles = load_tiles(args.tiles, 128)
        kinds = schedule(args.requests, args.malformed, args.seed)
        proc, target = start_server(root / "models.config", args.workers)
        try:
            soak = Soak(args, proc, target, base, old, tiles, kinds)
            wall = soak.run()
            alive, final_rss = proc.poll() is None, rss_bytes(proc.pid)
        finally:
            proc.terminate()
            proc.wait()
    soak.report(model, wall, final_rss)
    failures = soak.failures
    for kind, expected in EXPECTED.items():
        for code, n in sorted(soak.counts[kind].items()):
            if code not in expected:
                failures.append(f"{kind}: {n} x {code} {soak.details[(kind, code)][:200]!r}")
    if not alive:
        failures.append("the server died")
    for failure in failures:
        print(f"FAIL {failure}")
    print("PASS" if not failures else f"FAIL: {len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
