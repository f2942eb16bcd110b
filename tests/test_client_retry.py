"""lungtf.client.retry against a real dev server with one worker (3 calls may wait to be read):
"the server is busy" refusals are retried with backoff until the server has room, within the
retry budget; a message too large is refused once, never retried."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import write_tile
from test_serving import launch, wait_ready

from lungtf.client import LungClient, LungClientError
from lungtf.client.retry import backoff_delay, retryable

MiB = 2**20


@pytest.fixture(scope="module")
def one_worker(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``tiny_run``'s SavedModel served with ``--workers 1`` (a line of 3 calls waiting to be
    read), 1 MiB messages and 20 s to send a message (the silent calls hold until cancelled)."""
    root = tmp_path_factory.mktemp("one_worker")
    args = ["--model-base-path", str(tiny_run / "best" / "saved_model"), "--workers", "1",
            "--max-message-bytes", str(MiB), "--max-read-seconds", "20"]  # fmt: skip
    proc = launch(args, root / "log")
    target = wait_ready(proc, root / "log")
    channel = grpc.insecure_channel(target)
    images = [write_tile(root / f"{c}.jpeg", seed=c, size=64, cls=c).read_bytes() for c in range(3)]
    yield {"target": target, "channel": channel, "images": images, "log": root / "log"}
    channel.close()
    proc.terminate()
    proc.wait(timeout=60)


def test_which_refusals_are_transient_and_the_backoff_bounds() -> None:
    code = grpc.StatusCode
    assert retryable(code.UNAVAILABLE, "failed to connect to all addresses")
    assert retryable(code.RESOURCE_EXHAUSTED, "the server is busy: 3 call(s) wait ...")
    assert not retryable(code.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 8)")
    assert not retryable(code.RESOURCE_EXHAUSTED, "the 70000-byte message is too large for ...")
    assert not retryable(code.INVALID_ARGUMENT, "the server is busy")
    for attempt, full in [(0, 0.2), (1, 0.4), (2, 0.8), (6, 5.0)]:  # capped at max_backoff
        delays = [backoff_delay(attempt, 0.2, 5.0) for _ in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full and len(set(delays)) > 1


def test_busy_refusals_are_retried_until_the_server_has_room(
    one_worker: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """Four Predict calls that never send their message against one worker: three fill the line
    (3 x --workers), the fourth is refused "the server is busy". A client with 2 retries then
    gives up after 3 attempts and says so; one with 8 retries, whose refusals end when the
    silent calls are cancelled 1 s later, gets its predictions. Fails on 8280626 (only
    UNAVAILABLE was retried: the first "busy" refusal was raised)."""
    target, images = one_worker["target"], one_worker["images"]
    stream = one_worker["channel"].stream_unary("/tensorflow.serving.PredictionService/Predict")
    gone = threading.Event()

    def silent() -> Iterator[bytes]:
        gone.wait(30)
        yield from ()

    held = [stream.future(silent(), timeout=30) for _ in range(4)]
    try:
        deadline = time.monotonic() + 10
        while not any(call.done() for call in held):  # the line is full once one is refused
            assert time.monotonic() < deadline, "no call was refused: the line never filled"
            time.sleep(0.05)
        (refused,) = [call.exception() for call in held if call.done()]
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
        assert refused.details().startswith("the server is busy"), refused.details()

        with pytest.raises(LungClientError) as err:
            LungClient(target, timeout=10, retries=2, backoff=0.1).predict(images)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.message.startswith("the server is busy"), err.value.message
        assert "gave up after 3 attempt(s)" in err.value.message, err.value.message
        assert "all 2 retries used" in err.value.message and err.value.attempts == 3

        caplog.clear()
        threading.Timer(1.0, lambda: [call.cancel() for call in held]).start()
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="lungtf.client"):
            preds = LungClient(target, timeout=30, retries=8, backoff=0.2).predict(images)
        waited = time.monotonic() - began
    finally:
        gone.set()
        for call in held:
            call.cancel()
    assert len(preds) == 3 and waited >= 1.0
    retried = [r.getMessage() for r in caplog.records if r.name == "lungtf.client"]
    assert retried, "the client was never refused"
    assert all("the server is busy" in m or "Concurrent RPC" in m for m in retried), retried
    assert "retry 1 of 8" in retried[0]
    assert "Traceback" not in one_worker["log"].read_text()


def test_a_message_too_large_is_refused_once(
    one_worker: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """RESOURCE_EXHAUSTED for size, by gRPC (a Predict above --max-message-bytes) or by the
    server (a health check above 64 KiB), is raised after one attempt, without a wait."""
    client = LungClient(one_worker["target"], timeout=30, retries=3, backoff=2.0)
    big = b"\xff\xd8\xff" + bytes(MiB + 1000)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lungtf.client"):
        with pytest.raises(LungClientError) as err:
            client.predict([big])
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert "larger than max" in err.value.message and err.value.attempts == 1
        with pytest.raises(LungClientError) as err:
            LungClient(one_worker["target"], retries=3, backoff=2.0, model_name="x" * 70_000).status()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert "too large" in err.value.message and err.value.attempts == 1
    assert time.monotonic() - began < 1.0  # a retry would have waited at least 1 s
    assert not [r for r in caplog.records if r.name == "lungtf.client"]
    client.close()
