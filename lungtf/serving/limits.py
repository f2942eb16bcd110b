"""Bounded work per request: size limits checked before anything is allocated.

A ``TensorProto`` declares its shape separately from the values it carries, and
``tf.make_ndarray`` (like TensorFlow's own parsing) fills a declared shape from fewer values:
22 bytes declaring ``float [64, 224, 224, 3]`` become a 37 MiB array, one 11 KB JPEG declared
``[20000]`` becomes 20,000 images to decode. ``check_tensor`` therefore reads only the proto's
shape and value counts and refuses, before anything is allocated, a tensor whose sent values do
not match its declared element count, a batch above ``Limits.max_batch_images`` and a string
item above ``Limits.max_image_bytes``. The gRPC message limit (``Limits.max_message_bytes``)
bounds everything else: gRPC itself answers RESOURCE_EXHAUSTED above it.

That bounds one request; ``Admission`` bounds them together. A request's message is read only
when one of a few reading slots is free (until then it waits with the client), and it is parsed
and served only if its size fits in a server-wide budget of in-flight request bytes
(``Limits.max_inflight_bytes``, 128 MiB: two messages of the maximum size); otherwise it is
answered RESOURCE_EXHAUSTED at once, unparsed. Bytes that are not a valid request message are
INVALID_ARGUMENT (gRPC's own parsing would answer INTERNAL and log a traceback).

No TensorFlow import here: ``python -m lungtf.serving validate`` reads the defaults quickly.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from lungtf.constants import MAX_BATCH_IMAGES

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the dev server (``python -m lungtf.serving serve`` flags).

    Attributes:
        max_message_bytes: gRPC message limit in both directions (``--max-message-bytes``,
            64 MiB; TF Serving's own default is 2 GiB).
        max_batch_images: most items in the first (batch) dimension of an input
            (``--max-batch-images``, 64 = ``lungtf.constants.MAX_BATCH_IMAGES``).
        max_image_bytes: most bytes of one string item, i.e. one encoded image
            (``--max-image-bytes``, 16 MiB).
        max_inflight_bytes: most request bytes the whole server serves at once
            (``--max-inflight-bytes``, 128 MiB; at least ``max_message_bytes``); it also sets how
            many messages are read at once (``reading_slots``), see ``Admission``.
    """

    max_message_bytes: int = 64 * MiB
    max_batch_images: int = MAX_BATCH_IMAGES
    max_image_bytes: int = 16 * MiB
    max_inflight_bytes: int = 128 * MiB

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"limits must be integers >= 1; got {bad}")
        if self.max_inflight_bytes < self.max_message_bytes:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least "
                f"max_message_bytes ({self.max_message_bytes}), or a message of the maximum "
                "size could never be served"
            )


class ServingError(Exception):
    """A request the server answers with a non-OK status.

    Attributes:
        code: the ``grpc.StatusCode``.
        message: what was wrong, what was received and what is allowed.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


@functools.cache
def value_fields() -> dict[int, tuple[str, int]]:
    """``{dtype enum: (TensorProto field holding its values, bytes per element)}`` for every
    dtype the dev server accepts."""
    from tensorflow.core.framework import types_pb2 as t

    return {
        t.DT_FLOAT: ("float_val", 4), t.DT_DOUBLE: ("double_val", 8),
        t.DT_HALF: ("half_val", 2), t.DT_BFLOAT16: ("half_val", 2),
        t.DT_INT8: ("int_val", 1), t.DT_INT16: ("int_val", 2), t.DT_INT32: ("int_val", 4),
        t.DT_UINT8: ("int_val", 1), t.DT_UINT16: ("int_val", 2), t.DT_INT64: ("int64_val", 8),
        t.DT_UINT32: ("uint32_val", 4), t.DT_UINT64: ("uint64_val", 8),
        t.DT_BOOL: ("bool_val", 1), t.DT_STRING: ("string_val", 0),
        t.DT_COMPLEX64: ("scomplex_val", 8), t.DT_COMPLEX128: ("dcomplex_val", 16),
    }  # fmt: skip


def dtype_name(enum: int) -> str:
    """TF Serving's spelling of a ``DataType`` (``DT_FLOAT`` -> ``float``) for messages.

    A request's dtype is an open enum: any int32 arrives (9999, -1), and
    ``DataType.Name`` raises on one it does not define, so such a number is named, not raised on.
    """
    from tensorflow.core.framework import types_pb2

    try:
        return types_pb2.DataType.Name(enum).removeprefix("DT_").lower()
    except ValueError:
        return f"unknown dtype enum {enum}"


def sent_values(alias: str, proto: Any) -> int:
    """How many elements a ``TensorProto`` actually carries (not what its shape declares).

    Raises:
        ServingError: INVALID_ARGUMENT for a dtype the dev server does not read, string values
            in ``tensor_content``, or ``tensor_content`` that is not a whole number of elements.
    """
    name = dtype_name(proto.dtype)
    if proto.dtype not in value_fields():
        raise _invalid(f"input {alias!r} has dtype {name}, which the dev server does not accept")
    field, itemsize = value_fields()[proto.dtype]
    if proto.tensor_content:
        if not itemsize:
            raise _invalid(f"input {alias!r}: string tensors carry their items in string_val")
        if len(proto.tensor_content) % itemsize:
            raise _invalid(
                f"input {alias!r}: tensor_content of {len(proto.tensor_content)} bytes is not a "
                f"whole number of {name} elements ({itemsize} bytes each)"
            )
        return len(proto.tensor_content) // itemsize
    count = len(getattr(proto, field))
    return count // 2 if field in ("scomplex_val", "dcomplex_val") else count


def _shape_text(dims: list[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in dims) + "]"


def check_tensor(alias: str, proto: Any, info: Any, limits: Limits) -> None:
    """Refuse a request tensor before it is turned into an array (see the module docstring).

    Args:
        alias: the input's name in the signature.
        proto: the request's ``TensorProto`` (dtype already checked against the signature).
        info: the signature's ``TensorInfo`` for ``alias``.
        limits: the server's limits.

    Raises:
        ServingError: INVALID_ARGUMENT naming what was received and what is allowed.
    """
    if proto.tensor_shape.unknown_rank:
        raise _invalid(f"input {alias!r} has no shape (unknown rank); send its dimensions")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise _invalid(f"input {alias!r} declares shape {dims}; every dimension must be >= 0")
    if not info.tensor_shape.unknown_rank:
        expected = [d.size for d in info.tensor_shape.dim]
        fits = len(dims) == len(expected) and all(e < 0 or e == d for e, d in zip(expected, dims))
        if not fits:
            raise _invalid(
                f"input {alias!r} has shape {dims}; the signature expects {_shape_text(expected)}"
            )
        if expected and dims[0] == 0:
            raise _invalid(
                f"input {alias!r} is an empty batch (shape {dims}); send at least one item"
            )
        if expected and expected[0] < 0 and dims[0] > limits.max_batch_images:
            raise _invalid(
                f"input {alias!r} is a batch of {dims[0]} items; at most "
                f"{limits.max_batch_images} per request (--max-batch-images): split it"
            )
    declared, sent = math.prod(dims), sent_values(alias, proto)
    if sent != declared:
        raise _invalid(
            f"input {alias!r} declares shape {dims} ({declared} values) but sends {sent}; send "
            "every value (the server does not fill a tensor up to its declared shape)"
        )
    if value_fields()[proto.dtype][0] == "string_val" and sent:
        index, size = max(enumerate(map(len, proto.string_val)), key=lambda item: item[1])
        if size > limits.max_image_bytes:
            raise _invalid(
                f"item {index} of input {alias!r} is {size} bytes; at most "
                f"{limits.max_image_bytes} per item (--max-image-bytes)"
            )


ADMISSION_WAIT_SECONDS = 30.0
"""How long a call waits for a reading slot (less if its deadline is nearer) before
RESOURCE_EXHAUSTED. Its message stays with the client meanwhile: waiting costs a worker thread,
not memory, and calls are read in the order they asked."""


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


class ReadingSlots:
    """``count`` slots handed out first come, first served (a fair counting semaphore): a small
    request that arrives behind large ones waits for their reads, not for luck."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._free = count
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()

    def acquire(self, wait: float) -> bool:
        """Take a slot, waiting up to ``wait`` seconds for one; False if none came."""
        with self._lock:
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


TRIM_AFTER_BYTES = MiB
"""After a request of at least this size, ``trim_heap`` (the size of glibc's mmap threshold that
``lungtf.serving.server`` fixes: smaller pieces of such a request live in the heaps)."""


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Give the free pages of glibc's heaps back to the system (``malloc_trim(0)``, ~1 ms).

    Reading a large message leaves many freed pieces under the mmap threshold (gRPC's transport
    slices, the chunks the Python binding copies them into) in the heaps, which glibc keeps: one
    60 MiB request left the dev server ~70 MiB larger, a burst of 16 ~150 MiB. A no-op without
    glibc.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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
    A request that finds no slot in time is answered RESOURCE_EXHAUSTED unread; one whose bytes
    do not fit in the budget at once, unparsed (its bytes are dropped, not held while it waits).
    An admitted request is parsed, its
    raw bytes dropped, and served; its bytes are released when it returns, and after a large one
    the heaps are trimmed (``trim_heap``). Bytes that do not parse are INVALID_ARGUMENT.

    Request memory is so bounded by the budget, not by ``--workers``: at most
    ``max_inflight_bytes`` of requests being served (each held about three times at its peak:
    parsed message, the array of its items and the tensor) plus ``reading_slots`` messages of up
    to ``max_message_bytes`` being read (each about three times too while gRPC assembles it).
    A call holds its reading slot until its message has arrived, so a client that trickles its
    message holds one until its deadline.
    """

    def __init__(self, limits: Limits, wait: float = ADMISSION_WAIT_SECONDS) -> None:
        self.budget = InflightBytes(limits.max_inflight_bytes)
        self.reading = ReadingSlots(reading_slots(limits))
        self.wait = wait

    def _read(self, requests: Any, context: Any) -> bytes | None:
        """One call's raw message once a reading slot is free; RESOURCE_EXHAUSTED if none came."""
        remaining = context.time_remaining()
        wait = self.wait if remaining is None else max(0.0, min(self.wait, remaining))
        if not self.reading.acquire(wait):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is busy: {self.reading.count} call(s) reading their requests, as "
                "many as --max-inflight-bytes / (2 x --max-message-bytes) allows; retry later",
            )
        try:
            return next(requests, None)
        except grpc.RpcError:  # the client went away while its message was read
            return None
        finally:
            self.reading.release()

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, serve = handler.request_deserializer, handler.unary_unary

        def admitted(requests: Any, context: Any) -> Any:
            raw = self._read(requests, context)
            if raw is None:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{details.method} takes exactly one request message; none arrived",
                )
            size = len(raw)
            if not self.budget.acquire(size, 0.0):
                raw = None  # dropped now, not when the abort's traceback goes
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is busy: {self.budget.used} bytes of requests in flight, "
                    f"this one {size}, at most {self.budget.limit} together "
                    "(--max-inflight-bytes); retry later",
                )
            try:
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

        return grpc.stream_unary_rpc_method_handler(
            admitted, request_deserializer=None, response_serializer=handler.response_serializer
        )
