"""Bounded work for all requests together: read and serve them within a budget of bytes.

``lungtf.serving.limits`` bounds one request; ``Admission`` (a gRPC server interceptor) bounds
them together. A request's message is read only when one of a few reading slots is free (until
then it waits with the client), only for ``Limits.max_read_seconds`` (a call that has not sent
its message by then loses its slot and is answered RESOURCE_EXHAUSTED), and it is parsed and
served only if its size fits in a server-wide budget of in-flight request bytes
(``Limits.max_inflight_bytes``, 128 MiB: two messages of the maximum size); otherwise it is
answered RESOURCE_EXHAUSTED at once, unparsed. A call waiting for its slot, or for its message,
holds a thread doing nothing: at most ``WAITING_PER_WORKER`` x ``--workers`` calls may wait so,
on threads besides the ``--workers`` that parse and serve (``Admission.threads``), and a call
beyond that is answered RESOURCE_EXHAUSTED at once, so clients that never send their messages
cannot take the workers. The health checks (``SMALL_METHODS``) run on threads of their own
(``HEALTH_WORKERS``) and are read in a slot of their own, briefly, so they never queue behind
predictions. Bytes that are not a valid request message are INVALID_ARGUMENT (gRPC's own parsing
would answer INTERNAL and log a traceback).

No TensorFlow import here.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from lungtf.constants import BUSY_MESSAGE
from lungtf.heap import trim_heap
from lungtf.serving.limits import Limits, MiB

ADMISSION_WAIT_SECONDS = 30.0
"""How long a call waits for a reading slot before RESOURCE_EXHAUSTED (less if its deadline is
nearer: then DEADLINE_EXCEEDED, as the client sees it). Its message stays with the client
meanwhile: waiting costs a thread, not memory, and calls are read in the order they asked."""

SMALL_METHODS = frozenset({
    "/tensorflow.serving.ModelService/GetModelStatus",
    "/tensorflow.serving.PredictionService/GetModelMetadata",
})
"""Methods whose request is a few dozen bytes (a model spec): read in their own slot."""

SMALL_MESSAGE_BYTES = 64 * 1024
"""Most bytes of a ``SMALL_METHODS`` request (more is RESOURCE_EXHAUSTED, unparsed)."""

SMALL_READ_SECONDS = 2.0
"""How long a ``SMALL_METHODS`` request may take to arrive once its slot is taken."""

WAITING_PER_WORKER = 3
"""Calls that may hold or wait for a reading slot, per ``--workers``, each on a thread of its own
(4 x ``--workers`` threads in all: gRPC's own concurrent-call limit in ``server.serve``, where
calls beyond the workers used to wait in gRPC's queue, behind silent ones too)."""

HEALTH_WORKERS = 4
"""Threads of their own for ``SMALL_METHODS`` (besides ``--workers``), so health checks never
wait for a worker that predictions hold; at most 3 of them wait for unread messages."""


class InflightBytes:
    """A server-wide budget of request bytes being served (a counting semaphore by size)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._room = threading.Condition()

    def acquire(self, size: int, wait: float) -> bool:
        """Reserve ``size`` bytes, waiting up to ``wait`` seconds for room; False if none came."""
        deadline = time.monotonic() + wait
        with self._room:
            while self.used + size > self.limit:
                left = deadline - time.monotonic()
                if left <= 0 or size > self.limit:
                    return False
                self._room.wait(left)
            self.used += size
            return True

    def release(self, size: int) -> None:
        with self._room:
            self.used -= size
            self._room.notify_all()


class LineFull(Exception):
    """``ReadingSlots.acquire`` found as many calls unread as its ``line`` allows."""


class ReadingSlots:
    """``count`` slots handed out first come, first served (a fair counting semaphore): a small
    request that arrives behind large ones waits for their reads, not for luck. At most ``line``
    calls hold or wait for a slot (each holds a worker thread until its message is read)."""

    def __init__(self, count: int, line: int | None = None) -> None:
        self.count = count
        self.line = line
        self._free = count
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()

    def acquire(self, wait: float) -> bool:
        """Take a slot, waiting up to ``wait`` seconds for one; False if none came.

        Raises:
            LineFull: ``line`` calls already hold or wait for a slot (nothing was waited for).
        """
        with self._lock:
            if self.line is not None and self.count - self._free + len(self._waiting) >= self.line:
                raise LineFull
            if self._free and not self._waiting:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiting.append(turn)
        if turn.wait(wait):
            return True
        with self._lock:
            if turn.is_set():  # handed over just as the wait ended
                return True
            self._waiting.remove(turn)
            return False

    def release(self) -> None:
        """Free a slot, or hand it straight to the call that has waited longest."""
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._free += 1


def cancel_call(context: Any, code: grpc.StatusCode, details: str) -> None:
    """End a server call from any thread: its handler's pending read returns at once.

    ``ServicerContext.cancel`` (public) ends it as CANCELLED; the call object under it (gRPC
    Python's ``_server._Context``) can cancel with a status the client can act on, used when
    present.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)
    except (AttributeError, TypeError):
        context.cancel()


def read_within(requests: Any, seconds: float, expire: Callable[[], None]) -> tuple[Any, bool]:
    """``(next message or None, expired)``: ``expire`` runs (on a timer thread) if no message
    has come in ``seconds``; it must end the call so that the read returns."""
    lock = threading.Lock()
    state = {"done": False, "expired": False}

    def on_time() -> None:
        with lock:
            if state["done"]:
                return
            state["expired"] = True
        expire()

    timer = threading.Timer(seconds, on_time)
    timer.daemon = True
    timer.start()
    try:
        raw = next(requests, None)
    except grpc.RpcError:  # the client went away, or the call was ended by ``expire``
        raw = None
    finally:
        timer.cancel()
        with lock:
            state["done"] = True
    return (None, True) if state["expired"] else (raw, False)


TRIM_AFTER_BYTES = MiB
"""After a request of at least this size, ``trim_heap`` (the size of glibc's mmap threshold that
``lungtf.serving.server`` fixes: smaller pieces of such a request live in the heaps)."""


def reading_slots(limits: Limits) -> int:
    """How many calls may read their message at once: half as many as the in-flight budget
    holds messages of the maximum size (1 with the defaults), at least one."""
    return max(1, limits.max_inflight_bytes // (2 * limits.max_message_bytes))


class Admission(grpc.ServerInterceptor):
    """Read a request's message only when a reading slot is free; serve it only if its bytes fit.

    gRPC's unary handlers get their request read (and parsed) before they run, so every busy
    worker would hold a message of up to the maximum size, waiting or not. Here every unary
    method is served as a client-streaming one without deserializer (the same on the wire), so
    the worker decides when the message is read: it first takes one of ``reading_slots`` in
    the order the calls asked, waiting up to ``ADMISSION_WAIT_SECONDS`` (less if the client's
    deadline is nearer; the message stays with the client meanwhile, ``server.grpc_options``),
    reads the raw bytes, frees the slot and reserves ``len(raw)`` bytes of the in-flight budget.
    A request that finds no slot in time is answered RESOURCE_EXHAUSTED unread (DEADLINE_EXCEEDED
    when its deadline ended the wait, so the client sees the same code either way); one whose bytes
    do not fit in the budget at once, unparsed (its bytes are dropped, not held while it waits).
    An admitted request is parsed, its
    raw bytes dropped, and served; its bytes are released when it returns, and after a large one
    the heaps are trimmed (``trim_heap``). Bytes that do not parse are INVALID_ARGUMENT.

    Request memory is so bounded by the budget, not by ``--workers``: at most
    ``max_inflight_bytes`` of requests being served (each held about three times at its peak:
    parsed message, the array of its items and the tensor) plus ``reading_slots`` messages of up
    to ``max_message_bytes`` being read (each about three times too while gRPC assembles it).
    A call holds its reading slot until its message has arrived, at most ``max_read_seconds``
    (``--max-read-seconds``): then the slot is freed and the call is ended (``cancel_call``:
    RESOURCE_EXHAUSTED, which also ends the worker's read), so a client that trickles its message,
    or never sends it, delays the calls queued behind it by that much, not until its deadline.
    ``SMALL_METHODS`` (the health checks) are read in one slot of their own for at most
    ``SMALL_READ_SECONDS`` and refused above ``SMALL_MESSAGE_BYTES`` (after the read: gRPC has no
    per-method message limit), so they never queue behind large reads and add at most one message
    being read at a time.

    Waiting for a slot or a message holds a thread: gRPC runs calls on ``threads`` (``workers``
    x (1 + ``WAITING_PER_WORKER``)), at most ``WAITING_PER_WORKER`` x ``workers`` calls may hold
    or wait for a reading slot (the line of ``ReadingSlots``) and at most ``workers`` are parsed
    and served at once (a read call waits for its turn with its bytes counted in the budget), so
    calls that never send their message hold at most the line's threads, never the ``workers``
    ones: a new call gets a thread once a served call ends, not after the silent ones, and if it
    finds the line full it is answered RESOURCE_EXHAUSTED at once, unread. ``SMALL_METHODS`` run on
    ``HEALTH_WORKERS`` threads of their own (gRPC's ``experimental_thread_pool``), with a line of
    ``HEALTH_WORKERS`` - 1, so health checks never wait for a worker that predictions hold.
    """

    def __init__(
        self, limits: Limits, workers: int = 8, wait: float = ADMISSION_WAIT_SECONDS
    ) -> None:
        self.budget = InflightBytes(limits.max_inflight_bytes)
        self.reading = ReadingSlots(reading_slots(limits), line=WAITING_PER_WORKER * workers)
        self.serving = threading.BoundedSemaphore(workers)
        self.threads = workers + WAITING_PER_WORKER * workers
        self.small = ReadingSlots(1, line=HEALTH_WORKERS - 1)
        self.health_pool = futures.ThreadPoolExecutor(
            HEALTH_WORKERS, thread_name_prefix="lungtf-health"
        )
        self.read_seconds = float(limits.max_read_seconds)
        self.wait = wait

    def _read(self, requests: Any, context: Any, small: bool) -> bytes | None:
        """One call's raw message once a reading slot is free and if it arrives in time;
        RESOURCE_EXHAUSTED if no slot came or the message did not arrive."""
        slots = self.small if small else self.reading
        remaining = context.time_remaining()
        wait = self.wait if remaining is None else max(0.0, min(self.wait, remaining))
        try:
            taken = slots.acquire(wait)
        except LineFull:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{BUSY_MESSAGE}: {slots.line} call(s) wait for their request messages to be "
                "read, as many as " + ("it takes health checks at once" if small else
                                       f"{WAITING_PER_WORKER} x --workers allows") + "; retry later",
            )
        if not taken and wait < self.wait:  # the client's deadline, not the server, ended it
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the deadline passed while the call waited for its turn to be read",
            )
        if not taken:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{BUSY_MESSAGE}: {slots.count} call(s) reading their requests, as many as "
                + ("it reads health checks at once" if small else "--max-inflight-bytes / "
                   "(2 x --max-message-bytes) allows") + "; retry later",
            )
        seconds = SMALL_READ_SECONDS if small else self.read_seconds
        late = (
            f"the request message did not arrive within {seconds:g} s of its turn to be read"
            + ("" if small else " (--max-read-seconds)") + "; send it at once after the call starts"
        )

        def expire() -> None:  # on the timer thread: the next call may read now
            slots.release()
            cancel_call(context, grpc.StatusCode.RESOURCE_EXHAUSTED, late)

        raw, expired = read_within(requests, seconds, expire)
        if expired:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, late)  # already ended: no effect
        slots.release()
        return raw

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, serve = handler.request_deserializer, handler.unary_unary

        small = details.method in SMALL_METHODS
        turn = contextlib.nullcontext() if small else self.serving

        def admitted(requests: Any, context: Any) -> Any:
            raw = self._read(requests, context, small)
            if raw is None:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{details.method} takes exactly one request message; none arrived",
                )
            size = len(raw)
            if small and size > SMALL_MESSAGE_BYTES:
                raw = None
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the {size}-byte message is too large for {details.method}: at most "
                    f"{SMALL_MESSAGE_BYTES} bytes",
                )
            if not self.budget.acquire(size, 0.0):
                raw = None  # dropped now, not when the abort's traceback goes
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{BUSY_MESSAGE}: {self.budget.used} bytes of requests in flight, "
                    f"this one {size}, at most {self.budget.limit} together "
                    "(--max-inflight-bytes); retry later",
                )
            try:
                with turn:  # at most ``workers`` parse and serve at once; health checks aside
                    try:
                        request = parse(raw)
                    except DecodeError:
                        raw = None
                        context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"the {size}-byte message is not a valid {details.method} request",
                        )
                    raw = None  # the parsed request holds the contents from here on
                    return serve(request, context)
            finally:
                self.budget.release(size)
                if size >= TRIM_AFTER_BYTES:
                    trim_heap()

        if small:
            admitted.experimental_thread_pool = self.health_pool  # gRPC runs the call there
        return grpc.stream_unary_rpc_method_handler(
            admitted, request_deserializer=None, response_serializer=handler.response_serializer
        )
