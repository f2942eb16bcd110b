"""Request handling of the dev server, free of gRPC servers so tests and warmup replay can call it.

Each handler takes a request proto and the manager's table and returns the response proto or
raises ``ServingError`` with the status code TF Serving gives in the same case:

- no model name -> INVALID_ARGUMENT; unknown model or version -> NOT_FOUND; unknown version label
  -> INVALID_ARGUMENT; unknown signature -> FAILED_PRECONDITION; the messages name what was asked
  for, never the other models and versions the server holds;
- missing or extra inputs, a wrong dtype (also a number ``DataType`` does not define) or shape,
  an empty batch, undecodable image bytes, an unknown output filter -> INVALID_ARGUMENT, each
  message saying what was received, with no traceback in the log;
- a tensor whose sent values do not match its declared shape, a batch or string item above the
  server's ``Limits`` -> INVALID_ARGUMENT, checked before anything is allocated
  (``lungtf.serving.limits``); an image the exported signature refuses (not JPEG/PNG, above
  ``MAX_IMAGE_PIXELS``, a batch above ``MAX_BATCH_PIXELS``) -> INVALID_ARGUMENT;
- a client that has gone (deadline passed, call cancelled) -> DEADLINE_EXCEEDED / CANCELLED, and
  the work stops (``calls.Call``);
- any other failure inside the model (TF's UNKNOWN, INTERNAL, NOT_FOUND...) -> INTERNAL, and
  RESOURCE_EXHAUSTED, with a generic message; the details go to the server log only;
- Classify / Regress / MultiInference on the predict-only lungtf signatures -> INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from lungtf.serving.calls import Call
from lungtf.serving.limits import Limits, ServingError, check_tensor, dtype_name
from lungtf.serving.models import Servable

DEFAULT_SIGNATURE = "serving_default"
CODES = {code.value[0]: code for code in grpc.StatusCode}
INTERNAL_MESSAGE = "the model failed on this request; the server log has the details"
"""All a client learns of an internal failure: its exception text stays in the server log."""
MEMORY_MESSAGE = "the server ran out of memory for this request; send fewer or smaller images"

_NOISE = ("Graph execution error", "Detected at node", "<stack traces", "[[", "Traceback", "File ")

log = logging.getLogger("lungtf.serving")


Table = dict[str, dict[int, Servable]]


def resolve(table: Table, spec: Any, labels: dict[str, dict[str, int]] | None = None) -> Servable:
    """The servable a ``ModelSpec`` asks for (newest loaded version when none is given)."""
    if not spec.name:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT, "model_spec.name is empty; name the model to use"
        )
    versions = table.get(spec.name)
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        known = (labels or {}).get(spec.name, {})
        if spec.version_label not in known:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Unrecognized servable version label: {spec.version_label!r} "
                f"(model {spec.name!r})",
            )
        wanted, request = known[spec.version_label], f"Specific({spec.name}, {spec.version_label})"
    elif choice == "version":
        wanted, request = spec.version.value, f"Specific({spec.name}, {spec.version.value})"
    else:
        wanted, request = (max(versions) if versions else None), f"Latest({spec.name})"
    if not versions or wanted not in versions:
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Servable not found for request: {request}",
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


def convert_inputs(inputs: Any, sig_key: str, sig: Any, limits: Limits) -> dict[str, Any]:
    """Check request inputs against the SignatureDef and the limits, then make them tensors."""
    sent, expected = set(inputs), set(sig.inputs)
    if sent != expected:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input size does not match signature {sig_key!r}: received {sorted(sent)}, expected "
            f"{sorted(expected)}. Sent extra: {sorted(sent - expected)}. "
            f"Missing but required: {sorted(expected - sent)}.",
        )
    for alias, proto in inputs.items():  # every input is checked before any is allocated
        info = sig.inputs[alias]
        if proto.dtype != info.dtype:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expects arg[{alias!r}] to be {dtype_name(info.dtype)} but "
                f"{dtype_name(proto.dtype)} is provided",
            )
        check_tensor(alias, proto, info, limits)
    tensors = {}
    for alias, proto in inputs.items():
        try:
            array = tf.make_ndarray(proto)
        except (ValueError, TypeError):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {alias!r} is not a valid {dtype_name(proto.dtype)} tensor",
            ) from None
        tensors[alias] = tf.constant(array, dtype=tf.dtypes.as_dtype(sig.inputs[alias].dtype))
    return tensors


def _describe(tensors: dict[str, Any]) -> str:
    parts = []
    for alias, t in sorted(tensors.items()):
        text = f"{alias} {t.dtype.name} {t.shape.as_list()}"
        if t.dtype == tf.string and t.shape.rank == 1:  # lengths and 8 bytes, not a copy
            sizes = tf.strings.length(t).numpy()[:8].tolist()
            start = tf.strings.substr(t, 0, 8).numpy()[:1]
            text += f" of {sizes} bytes, starting {start[0]!r}" if sizes else ""
        parts.append(text)
    return "; ".join(parts)


def _op_message(err: Any) -> str:
    """The useful line of a TF op error the client caused: an ``Assert``'s own message, else the
    first line that is not TF's framing (node names, stack traces), at most 300 characters."""
    lines = [ln.strip() for ln in str(err.message).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(_NOISE)]
    text = useful[0] if useful else "the signature refused the input"
    if "assertion failed: [" in text:
        text = text.split("assertion failed: [", 1)[1].rsplit("]", 1)[0]
    return text.split("}} ")[-1][:300]


def predict(
    table: Table,
    request: Any,
    labels: dict | None = None,
    limits: Limits | None = None,
    call: Call | None = None,
) -> Any:
    """Answer a ``PredictRequest`` (see the module docstring for the error contract).

    Args:
        table: the manager's ``{name: {version: Servable}}``.
        request: the ``PredictRequest``.
        labels: version labels per model.
        limits: size limits (``Limits()`` defaults when ``None``).
        call: the RPC, so work stops once its client has gone; ``None`` for warmup replay.
    """
    limits, call = limits or Limits(), call or Call()
    servable = resolve(table, request.model_spec, labels)
    sig_key, sig = signature(servable, request.model_spec.signature_name)
    unknown = sorted(set(request.output_filter) - set(sig.outputs))
    if unknown:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"output_filter {unknown} not in signature {sig_key!r}; outputs: {sorted(sig.outputs)}",
        )
    call.check("reading the inputs")
    tensors = convert_inputs(request.inputs, sig_key, sig, limits)
    call.check(f"running signature {sig_key!r}")
    try:
        outputs = call.run(servable.function(sig_key), **tensors)
    except tf.errors.CancelledError:
        call.check(f"signature {sig_key!r} finished")
        raise ServingError(grpc.StatusCode.CANCELLED, "the call was cancelled") from None
    except tf.errors.OpError as err:
        code = CODES.get(err.error_code, grpc.StatusCode.INTERNAL)
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
            raise ServingError(  # the request's fault: say what in it was refused
                code, f"signature {sig_key!r} failed on {_describe(tensors)}: {_op_message(err)}"
            ) from None
        log.error("signature %r of %s version %d failed on %s: %s", sig_key, servable.name,
                  servable.version, _describe(tensors), err.message)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise ServingError(code, MEMORY_MESSAGE) from None
        raise ServingError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE) from None
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
            grpc.StatusCode.INVALID_ARGUMENT, "model_spec.name is empty; name the model to use"
        )
    versions = sorted(table.get(spec.name, {}))
    if spec.HasField("version"):
        if spec.version.value not in versions:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Could not find version {spec.version.value} of model {spec.name!r}",
            )
        versions = [spec.version.value]
    if not versions:
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Could not find any versions of model {spec.name!r}",
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
