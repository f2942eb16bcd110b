"""Request handling of the dev server, free of gRPC so tests and warmup replay can call it.

Each handler takes a request proto and the manager's table and returns the response proto or
raises ``ServingError`` with the status code TF Serving gives in the same case:

- no model name -> INVALID_ARGUMENT; unknown model or version -> NOT_FOUND; unknown version label
  -> INVALID_ARGUMENT; unknown signature -> FAILED_PRECONDITION;
- missing or extra inputs, a wrong dtype or shape, an empty batch, undecodable image bytes, an
  unknown output filter -> INVALID_ARGUMENT, each message saying what was received;
- Classify / Regress / MultiInference on the predict-only lungtf signatures -> INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import Any

import grpc
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from lungtf.serving.models import Servable

DEFAULT_SIGNATURE = "serving_default"
CODES = {code.value[0]: code for code in grpc.StatusCode}


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


Table = dict[str, dict[int, Servable]]


def resolve(table: Table, spec: Any, labels: dict[str, dict[str, int]] | None = None) -> Servable:
    """The servable a ``ModelSpec`` asks for (newest loaded version when none is given)."""
    if not spec.name:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"model_spec.name is empty; served models: {sorted(table)}",
        )
    versions = table.get(spec.name)
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        known = (labels or {}).get(spec.name, {})
        if spec.version_label not in known:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Unrecognized servable version label: {spec.version_label!r}; "
                f"labels of {spec.name!r}: {sorted(known)}",
            )
        wanted, request = known[spec.version_label], f"Specific({spec.name}, {spec.version_label})"
    elif choice == "version":
        wanted, request = spec.version.value, f"Specific({spec.name}, {spec.version.value})"
    else:
        wanted, request = (max(versions) if versions else None), f"Latest({spec.name})"
    if not versions or wanted not in versions:
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Servable not found for request: {request}; loaded: "
            + ", ".join(f"{n} {sorted(v)}" for n, v in sorted(table.items())),
        )
    return versions[wanted]


def signature(servable: Servable, name: str) -> tuple[str, Any]:
    """``(key, SignatureDef)`` for ``name`` (empty means ``serving_default``)."""
    key = name or DEFAULT_SIGNATURE
    if key not in servable.signature_defs:
        raise ServingError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f'Serving signature key "{key}" not found; signatures: {sorted(servable.signature_defs)}',
        )
    return key, servable.signature_defs[key]


def _dtype_name(enum: int) -> str:
    """TF Serving's spelling: ``DT_FLOAT`` -> ``float``."""
    return types_pb2.DataType.Name(enum).removeprefix("DT_").lower()


def _check_shape(alias: str, array: Any, info: Any) -> None:
    if info.tensor_shape.unknown_rank:
        return
    dims = [d.size for d in info.tensor_shape.dim]
    expected = "[" + ", ".join("?" if d < 0 else str(d) for d in dims) + "]"
    fits = len(dims) == array.ndim and all(d < 0 or d == n for d, n in zip(dims, array.shape))
    if not fits:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {alias!r} has shape {list(array.shape)}; the signature expects {expected}",
        )
    if dims and array.shape[0] == 0:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {alias!r} is an empty batch (shape {list(array.shape)}); send at least one item",
        )


def convert_inputs(inputs: Any, sig_key: str, sig: Any) -> dict[str, Any]:
    """Check request inputs against the SignatureDef and turn them into tensors."""
    sent, expected = set(inputs), set(sig.inputs)
    if sent != expected:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input size does not match signature {sig_key!r}: received {sorted(sent)}, expected "
            f"{sorted(expected)}. Sent extra: {sorted(sent - expected)}. "
            f"Missing but required: {sorted(expected - sent)}.",
        )
    tensors = {}
    for alias, proto in inputs.items():
        info = sig.inputs[alias]
        if proto.dtype != info.dtype:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expects arg[{alias!r}] to be {_dtype_name(info.dtype)} but "
                f"{_dtype_name(proto.dtype)} is provided",
            )
        try:
            array = tf.make_ndarray(proto)
        except (ValueError, TypeError) as err:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"input {alias!r} is not a valid tensor: {err}"
            ) from None
        _check_shape(alias, array, info)
        tensors[alias] = tf.constant(array, dtype=tf.dtypes.as_dtype(info.dtype))
    return tensors


def _describe(tensors: dict[str, Any]) -> str:
    parts = []
    for alias, t in sorted(tensors.items()):
        text = f"{alias} {t.dtype.name} {t.shape.as_list()}"
        if t.dtype == tf.string and t.shape.rank == 1:
            sizes = [len(b) for b in t.numpy()[:8]]
            text += f" of {sizes} bytes, starting {t.numpy()[0][:8]!r}" if sizes else ""
        parts.append(text)
    return "; ".join(parts)


def _op_message(err: Any) -> str:
    lines = [ln.strip() for ln in str(err.message).splitlines()]
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[", "")
    useful = [ln for ln in lines if not ln.startswith(noise)]
    return useful[0] if useful else lines[0]


def predict(table: Table, request: Any, labels: dict | None = None) -> Any:
    """Answer a ``PredictRequest`` (see the module docstring for the error contract)."""
    servable = resolve(table, request.model_spec, labels)
    sig_key, sig = signature(servable, request.model_spec.signature_name)
    unknown = sorted(set(request.output_filter) - set(sig.outputs))
    if unknown:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"output_filter {unknown} not in signature {sig_key!r}; outputs: {sorted(sig.outputs)}",
        )
    tensors = convert_inputs(request.inputs, sig_key, sig)
    try:
        outputs = servable.function(sig_key)(**tensors)
    except tf.errors.OpError as err:
        code = CODES.get(err.error_code, grpc.StatusCode.INTERNAL)
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK):
            code = grpc.StatusCode.INTERNAL
        raise ServingError(
            code, f"signature {sig_key!r} failed on {_describe(tensors)}: {_op_message(err)}"
        ) from None
    response = predict_pb2.PredictResponse()
    response.model_spec.name, response.model_spec.signature_name = servable.name, sig_key
    response.model_spec.version.value = servable.version
    for alias in request.output_filter or sig.outputs:
        response.outputs[alias].CopyFrom(tf.make_tensor_proto(outputs[alias].numpy()))
    return response


def model_metadata(table: Table, request: Any, labels: dict | None = None) -> Any:
    """Answer a ``GetModelMetadataRequest``; only ``signature_def`` exists, as in TF Serving."""
    servable = resolve(table, request.model_spec, labels)
    fields = list(request.metadata_field)
    if not fields or any(f != "signature_def" for f in fields):
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"metadata_field must be ['signature_def']; received {fields}",
        )
    defs = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in servable.signature_defs.items():
        defs.signature_def[key].CopyFrom(sig)
    packed = any_pb2.Any()
    packed.Pack(defs)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.metadata["signature_def"].CopyFrom(packed)
    return response


def model_status(table: Table, request: Any) -> Any:
    """Answer a ``GetModelStatusRequest``: every loaded version (or the one asked for)."""
    spec = request.model_spec
    if not spec.name:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"model_spec.name is empty; served models: {sorted(table)}",
        )
    versions = sorted(table.get(spec.name, {}))
    if spec.HasField("version"):
        if spec.version.value not in versions:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Could not find version {spec.version.value} of model {spec.name!r}; "
                f"loaded: {versions}",
            )
        versions = [spec.version.value]
    if not versions:
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Could not find any versions of model {spec.name!r}; served models: {sorted(table)}",
        )
    response = get_model_status_pb2.GetModelStatusResponse()
    for version in versions:
        status = response.model_version_status.add()
        status.version = version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return response


def not_predict(table: Table, spec: Any, method: str, labels: dict | None = None) -> None:
    """Classify/Regress/MultiInference: the model and signature must exist, then the method fails."""
    servable = resolve(table, spec, labels)
    sig_key, sig = signature(servable, spec.signature_name)
    raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"Expected {method} signature method_name to be tensorflow/serving/{method}. "
        f"Was: {sig.method_name} (signature {sig_key!r}; lungtf serves Predict only)",
    )
