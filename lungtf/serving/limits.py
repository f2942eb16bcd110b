"""Bounded work per request: size limits checked before anything is allocated.

A ``TensorProto`` declares its shape separately from the values it carries, and
``tf.make_ndarray`` (like TensorFlow's own parsing) fills a declared shape from fewer values:
22 bytes declaring ``float [64, 224, 224, 3]`` become a 37 MiB array, one 11 KB JPEG declared
``[20000]`` becomes 20,000 images to decode. ``check_tensor`` therefore reads only the proto's
shape and value counts and refuses, before anything is allocated, a tensor whose sent values do
not match its declared element count, a batch above ``Limits.max_batch_images`` and a string
item above ``Limits.max_image_bytes``. The gRPC message limit (``Limits.max_message_bytes``)
bounds everything else: gRPC itself answers RESOURCE_EXHAUSTED above it.

That bounds one request; ``lungtf.serving.admission.Admission`` bounds them together (reading
slots, a read time limit and a budget of in-flight request bytes).

No TensorFlow import here: ``python -m lungtf.serving validate`` reads the defaults quickly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import grpc

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
            many messages are read at once (``reading_slots``), see ``admission.Admission``.
        max_read_seconds: most seconds a call may take to send its message once its turn to be
            read has come (``--max-read-seconds``, 10: 64 MiB at 6.4 MB/s); then it is answered
            RESOURCE_EXHAUSTED and the next call is read.
    """

    max_message_bytes: int = 64 * MiB
    max_batch_images: int = MAX_BATCH_IMAGES
    max_image_bytes: int = 16 * MiB
    max_inflight_bytes: int = 128 * MiB
    max_read_seconds: int = 10

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
