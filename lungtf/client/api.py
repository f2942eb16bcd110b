"""gRPC client for a lungtf model behind TensorFlow Serving or the lungtf dev server.

``LungClient(target).predict(images)`` sends encoded images to the ``serving_default`` signature
and returns one ``Prediction`` per image. Outputs are read with ``tf.make_ndarray``, which handles
both the typed fields TF Serving sends (``float_val``...) and the ``tensor_content`` bytes other
servers send. Every call has one deadline, retries included; only transient refusals are retried
(UNAVAILABLE, and the dev server's RESOURCE_EXHAUSTED "the server is busy"; ``lungtf.client.retry``),
a bounded number of times with exponential backoff and jitter, because retrying any other status
would repeat a request the server already judged. Large batches are split under a byte budget and
under the exported model's own limits (``lungtf.constants``): at most ``MAX_BATCH_IMAGES`` images
and ``MAX_BATCH_PIXELS`` declared pixels a request, the pixels read from each image's header.

The command line is ``lungtf.client.cli`` (``python -m lungtf.client``).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from lungtf.client.retry import LungClientError, call_with_retries
from lungtf.constants import CLASS_NAMES, MAX_BATCH_IMAGES, MAX_BATCH_PIXELS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_MESSAGE_BYTES = 2**31 - 1


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image.

    Attributes:
        label: the predicted class name (one of ``CLASS_NAMES``).
        class_id: its index in ``CLASS_NAMES``.
        probabilities: class name -> probability, in ``CLASS_NAMES`` order.
    """

    label: str
    class_id: int
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Explanation:
    """The ``explain`` signature's answer for one image.

    Attributes:
        prediction: the same prediction ``serving_default`` gives.
        heatmap: float32 ``[h, w]`` in [0, 1], the Grad-CAM of the predicted class (draw it with
            ``lungtf.overlay.overlay``).
    """

    prediction: Prediction
    heatmap: Any


def encode_image(image: Any) -> bytes:
    """Bytes to send for one image: a file path's contents, bytes as given, a PIL image as PNG.

    Raises:
        TypeError: for anything else.
    """
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if hasattr(image, "save") and hasattr(image, "convert"):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(
        f"an image must be a file path, encoded bytes or a PIL image; got {type(image).__name__}"
    )


def declared_pixels(image: bytes) -> int:
    """Width x height from a JPEG or PNG header (PIL reads the header only, nothing is decoded),
    as the exported model counts it against ``MAX_BATCH_PIXELS``; 0 for anything else, which
    the server refuses on its own. A header PIL refuses as a decompression bomb counts as more
    than a whole batch, so that image goes alone (and the server refuses it)."""
    try:
        with Image.open(io.BytesIO(image), formats=("JPEG", "PNG")) as img:
            width, height = img.size
    except Image.DecompressionBombError:  # PIL's own limit, far above MAX_IMAGE_PIXELS
        return MAX_BATCH_PIXELS + 1
    except (OSError, ValueError, SyntaxError):
        return 0
    return width * height


def split_batches(
    items: list[bytes], max_bytes: int, max_items: int, max_pixels: int | None = None
) -> Iterator[list[bytes]]:
    """Consecutive batches of at most ``max_items`` whose sizes sum to at most ``max_bytes``
    and, with ``max_pixels``, whose ``declared_pixels`` sum to at most ``max_pixels`` (an item
    above a budget goes alone)."""
    batch: list[bytes] = []
    size = pixels = 0
    for item in items:
        area = declared_pixels(item) if max_pixels is not None else 0
        if batch and (
            size + len(item) > max_bytes
            or len(batch) == max_items
            or (max_pixels is not None and pixels + area > max_pixels)
        ):
            yield batch
            batch, size, pixels = [], 0, 0
        batch.append(item)
        size += len(item)
        pixels += area
    if batch:
        yield batch


def parse_predictions(response: Any, count: int) -> list[Prediction]:
    """``Prediction``s from a ``PredictResponse`` of ``count`` images.

    ``tf.make_ndarray`` reads both TF Serving's typed fields (``float_val``, ``int64_val``) and
    ``tensor_content``.

    Raises:
        LungClientError: (DATA_LOSS) when the response does not hold ``count`` predictions.
    """
    probs = tf.make_ndarray(response.outputs["probabilities"])
    ids = tf.make_ndarray(response.outputs["class_id"])
    if probs.shape != (count, len(CLASS_NAMES)) or ids.shape != (count,):
        raise LungClientError(
            grpc.StatusCode.DATA_LOSS,
            f"expected probabilities [{count}, {len(CLASS_NAMES)}] and class_id [{count}]; "
            f"received {list(probs.shape)} and {list(ids.shape)}",
        )
    return [
        Prediction(CLASS_NAMES[int(i)], int(i), dict(zip(CLASS_NAMES, map(float, p))))
        for i, p in zip(ids, probs)
    ]


def channel_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: ``ca`` the server must be signed by (gRPC's
    default roots when ``None``), and a client certificate ``cert`` with its ``key`` (mutual TLS).

    Raises:
        ValueError: when only one of ``cert`` and ``key`` is given.
        OSError: when a file cannot be read.
    """
    if (cert is None) != (key is None):
        raise ValueError(
            f"a client certificate needs both cert and key; got cert={cert} and key={key}"
        )
    ca_pem, key_pem, cert_pem = (None if p is None else Path(p).read_bytes() for p in (ca, key, cert))
    return grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tls``, ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` (client CLI and demo)."""
    parser.add_argument(
        "--tls", action="store_true",
        help="TLS with gRPC's default root certificates (implied by --tls-ca/--tls-cert)",
    )
    parser.add_argument("--tls-ca", metavar="PEM", help="CA certificate the server must be signed by")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")


def credentials_from_args(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """The channel credentials ``add_tls_arguments`` asked for; ``None`` means plaintext."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)


RETRIES = 3
"""``LungClient``'s default ``retries`` (``python -m lungtf.client --retries``)."""


class LungClient:
    """Predictions, metadata and status from a served lungtf model.

    Args:
        target: ``HOST:PORT`` of the gRPC endpoint.
        timeout: deadline of each call in seconds, its retries and their waits included.
        max_batch_bytes: encoded bytes per Predict request; larger inputs are split.
        max_batch_images: images per Predict request, at most ``MAX_BATCH_IMAGES`` (what the
            exported signatures take). Requests are also split at ``MAX_BATCH_PIXELS``.
        model_name: ``model_spec.name``.
        version: a fixed model version; the server's newest when ``None``.
        retries: extra attempts after a transient refusal (``lungtf.client.retry.retryable``:
            UNAVAILABLE, RESOURCE_EXHAUSTED "the server is busy").
        backoff: seconds before the first retry, doubled each time up to ``max_backoff``; each
            wait is between half of that and all of it (jitter).
        max_backoff: the longest wait between two attempts, in seconds.
        credentials: TLS channel credentials (``channel_credentials``); plaintext when ``None``.
    """

    def __init__(
        self,
        target: str,
        timeout: float = 30.0,
        max_batch_bytes: int = 32 * 2**20,
        max_batch_images: int = MAX_BATCH_IMAGES,
        model_name: str = "lungtf",
        version: int | None = None,
        retries: int = RETRIES,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if max_batch_bytes < 1 or not 1 <= max_batch_images <= MAX_BATCH_IMAGES:
            raise ValueError(
                f"max_batch_bytes must be >= 1 and max_batch_images in 1..{MAX_BATCH_IMAGES} "
                f"(MAX_BATCH_IMAGES); got {max_batch_bytes} and {max_batch_images}"
            )
        self.target, self.timeout = target, timeout
        self.max_batch_bytes, self.max_batch_images = max_batch_bytes, max_batch_images
        self.model_name, self.version = model_name, version
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        return call_with_retries(
            method, request, self.timeout, self.retries, self.backoff, self.max_backoff
        )

    def _request(self, signature: str) -> Any:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature
        if self.version is not None:
            request.model_spec.version.value = self.version
        return request

    def _images_request(self, signature: str, batch: list[bytes]) -> Any:
        request = self._request(signature)
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
        return request

    def _batched(self, images: Iterable[Any], answer: Callable[[list[bytes]], list],
                 progress: Callable[[int], None] | None) -> list:
        """Encode ``images``, split them under the byte, image and pixel budgets and collect
        ``answer(batch)`` of every batch, in order."""
        encoded = [encode_image(img) for img in images]
        out: list = []
        for batch in split_batches(
            encoded, self.max_batch_bytes, self.max_batch_images, MAX_BATCH_PIXELS
        ):
            out.extend(answer(batch))
            if progress is not None:
                progress(len(out))
        return out

    def predict_bytes(self, batch: list[bytes]) -> list[Prediction]:
        """One Predict call on already encoded images (no splitting)."""
        request = self._images_request("serving_default", batch)
        return parse_predictions(self._call(self._predict.Predict, request), len(batch))

    def predict(
        self, images: Iterable[Any], progress: Callable[[int], None] | None = None
    ) -> list[Prediction]:
        """Predict paths, encoded bytes or PIL images, in order, batching under the budget.

        Args:
            images: file paths, JPEG/PNG bytes or PIL images.
            progress: called with the number of images finished after each request.

        Raises:
            LungClientError: when the server answers with an error status.
        """
        return self._batched(images, self.predict_bytes, progress)

    def explain(
        self, images: Iterable[Any], progress: Callable[[int], None] | None = None
    ) -> list[Explanation]:
        """Predictions with their Grad-CAM heatmaps from the ``explain`` signature, in order,
        batched as ``predict`` batches.

        Raises:
            LungClientError: when the server answers with an error status (FAILED_PRECONDITION
                naming the signatures when the served version has no ``explain``; check first
                with ``signatures``).
        """
        return self._batched(images, self._explain_bytes, progress)

    def _explain_bytes(self, batch: list[bytes]) -> list[Explanation]:
        """One ``explain`` call on already encoded images (no splitting)."""
        request = self._images_request("explain", batch)
        try:
            response = self._call(self._predict.Predict, request)
        except LungClientError as err:
            if err.code == grpc.StatusCode.FAILED_PRECONDITION and '"explain"' in err.message:
                raise LungClientError(err.code, (
                    f"model {self.model_name!r} (version {self.version or 'latest'}) has no "
                    "'explain' signature: it was exported before lungtf added it; export it "
                    f"again with python -m lungtf.export (server said: {err.message})"
                )) from None  # fmt: skip
            raise
        heatmaps = tf.make_ndarray(response.outputs["heatmap"])
        predictions = parse_predictions(response, len(batch))
        return [Explanation(p, h) for p, h in zip(predictions, heatmaps)]

    def metadata(self) -> dict[str, Any]:
        """The model's ``lungtf.json`` (class names, image size, metrics), from ``metadata()``."""
        response = self._call(self._predict.Predict, self._request("metadata"))
        return json.loads(tf.make_ndarray(response.outputs["json"]).item().decode("utf-8"))

    def status(self) -> dict[str, Any]:
        """``GetModelStatus``: ``{"model": name, "versions": [{"version", "state", ...}]}``."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        if self.version is not None:
            request.model_spec.version.value = self.version
        response = self._call(self._models.GetModelStatus, request)
        states = get_model_status_pb2.ModelVersionStatus.State
        return {
            "model": self.model_name,
            "versions": [
                {
                    "version": s.version,
                    "state": states.Name(s.state),
                    "error_code": s.status.error_code,
                    "error_message": s.status.error_message,
                }
                for s in response.model_version_status
            ],
        }

    def signatures(self) -> dict[str, Any]:
        """``GetModelMetadata``: ``{"version": N, "signatures": {name: {"inputs": [...],
        "outputs": [...]}}}`` of the version that answers (``version``, else the newest), so a
        caller can tell whether it serves e.g. ``explain`` before asking for it."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = self.model_name
        if self.version is not None:
            request.model_spec.version.value = self.version
        request.metadata_field.append("signature_def")
        response = self._call(self._predict.GetModelMetadata, request)
        defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(defs)
        return {
            "version": response.model_spec.version.value,
            "signatures": {
                name: {"inputs": sorted(sig.inputs), "outputs": sorted(sig.outputs)}
                for name, sig in sorted(defs.signature_def.items())
            },
        }
