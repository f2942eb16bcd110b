"""gRPC client for a lungtf model behind TensorFlow Serving or the lungtf dev server.

Modules:
    api: ``LungClient`` (predict, explain, status) and what it returns, TLS credentials, the
        batch splitting under the exported model's limits.
    cli: ``python -m lungtf.client predict|status|explain`` and ``main(argv)``.
    retry: ``LungClientError``; which refusals are retried (``retryable``) and the backoff.
"""

from lungtf.client.api import (
    IMAGE_SUFFIXES,
    MAX_MESSAGE_BYTES,
    Explanation,
    LungClient,
    LungClientError,
    Prediction,
    add_tls_arguments,
    channel_credentials,
    credentials_from_args,
    declared_pixels,
    encode_image,
    parse_predictions,
    split_batches,
)
from lungtf.client.cli import main

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_MESSAGE_BYTES",
    "Explanation",
    "LungClient",
    "LungClientError",
    "Prediction",
    "add_tls_arguments",
    "channel_credentials",
    "credentials_from_args",
    "declared_pixels",
    "encode_image",
    "main",
    "parse_predictions",
    "split_batches",
]
