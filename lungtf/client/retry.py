"""One client call within a deadline: which refusals are retried, and how long to wait between.

A call is retried only when the server refused it before doing any work and a later attempt may
succeed: UNAVAILABLE (server starting, connection dropped; also stock TF Serving's answer when
its batching queue is full, "The batch scheduling queue ... is full") and the dev server's
RESOURCE_EXHAUSTED refusals that begin with ``BUSY_MESSAGE`` ("the server is busy": too many
calls wait to be read, no reading slot came in time, or the in-flight byte budget is full; see
``lungtf.serving.admission``), and gRPC Python's own ``CONCURRENT_LIMIT`` refusal, which the dev
server's concurrent-call limit (4 x ``--workers``) gives before its handler runs. Every other RESOURCE_EXHAUSTED would be refused again and is
raised at once: a message above the server's size limit (gRPC's "Received message larger than
max", TF Serving's too), a health check above 64 KiB, a message that did not arrive in time,
a model out of memory. Attempts wait an exponential backoff with jitter, capped, and all
attempts and waits fit in the call's one deadline.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from lungtf.constants import BUSY_MESSAGE

log = logging.getLogger("lungtf.client")

CONCURRENT_LIMIT = "Concurrent RPC limit exceeded!"
"""gRPC Python's RESOURCE_EXHAUSTED details for a call beyond ``maximum_concurrent_rpcs``."""


class LungClientError(Exception):
    """A call the server answered with a non-OK status (or that timed out).

    Attributes:
        code: the ``grpc.StatusCode``.
        message: the server's details string (after retries, with how many attempts were made).
        attempts: how many times the call was sent.
    """

    def __init__(self, code: grpc.StatusCode, message: str, attempts: int = 1) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.attempts = attempts


def retryable(code: grpc.StatusCode, details: str) -> bool:
    """Whether a refusal is transient: UNAVAILABLE, or RESOURCE_EXHAUSTED for load ("the server
    is busy", gRPC's concurrent-call limit), not for a message too large."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        details.startswith(BUSY_MESSAGE) or details == CONCURRENT_LIMIT
    )


def backoff_delay(attempt: int, backoff: float, max_backoff: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0 first): ``backoff`` x 2^attempt,
    at most ``max_backoff``, of which the second half is random (clients refused together do
    not all come back together)."""
    full = min(max_backoff, backoff * 2**attempt)
    return full / 2 + random.uniform(0, full / 2)


def call_with_retries(
    method: Callable[..., Any],
    request: Any,
    timeout: float,
    retries: int,
    backoff: float,
    max_backoff: float,
) -> Any:
    """``method(request)`` within ``timeout`` seconds in all, retried up to ``retries`` times
    while ``retryable``, waiting ``backoff_delay`` between attempts (each retry logged).

    Raises:
        LungClientError: at once for a refusal that is not ``retryable``; for a retryable one
            when ``retries`` are used up or the next wait would pass the deadline, saying so.
    """
    start = time.monotonic()
    deadline = start + timeout
    attempt = 0
    while True:
        try:
            return method(request, timeout=max(deadline - time.monotonic(), 0.001))
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        if not retryable(code, details):
            raise LungClientError(code, details, attempt + 1) from None
        delay = backoff_delay(attempt, backoff, max_backoff)
        if attempt >= retries or time.monotonic() + delay >= deadline:
            why = (
                f"all {retries} retries used" if attempt >= retries
                else f"a retry after {delay:.2f} s would pass the {timeout:g} s deadline"
            )
            raise LungClientError(code, (
                f"{details} (gave up after {attempt + 1} attempt(s) in "
                f"{time.monotonic() - start:.1f} s: {why})"
            ), attempt + 1) from None  # fmt: skip
        log.warning(
            "%s: %s; retry %d of %d in %.2f s", code.name, details, attempt + 1, retries, delay
        )
        time.sleep(delay)
        attempt += 1
