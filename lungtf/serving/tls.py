"""TLS for the dev server from TF Serving's own SSL config file (``--ssl_config_file``).

The file is a text-format ``tensorflow.serving.SSLConfig`` (``tensorflow_serving/config/
ssl_config.proto``)::

    server_key: "-----BEGIN PRIVATE KEY-----\\n...\\n-----END PRIVATE KEY-----\\n"
    server_cert: "-----BEGIN CERTIFICATE-----\\n...\\n-----END CERTIFICATE-----\\n"
    custom_ca: "-----BEGIN CERTIFICATE-----\\n...\\n-----END CERTIFICATE-----\\n"
    client_verify: true

The three strings hold the PEM text itself, not file paths (TF Serving passes them to gRPC as
they are); ``python -m lungtf.serving ssl-config --key K --cert C [--ca CA] [--client-verify]``
writes one from PEM files (``format_ssl_config``). ``custom_ca`` is the authority client certificates must be signed by; with
``client_verify`` a client without such a certificate is refused during the handshake, without
it no client certificate is asked for. The same file serves ``tensorflow_model_server
--ssl_config_file`` and ``python -m lungtf.serving serve --ssl-config``.

``tensorflow-serving-api`` does not ship ``ssl_config_pb2``, so the message is declared here, field
for field as in TF Serving, in a private descriptor pool (no clash if a package registers it).
No TensorFlow import.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

PEM_FIELDS = ("server_key", "server_cert", "custom_ca")


@functools.cache
def ssl_config_class() -> type:
    """The ``tensorflow.serving.SSLConfig`` message class: TF Serving's generated module when
    installed, else the same four fields declared here."""
    try:
        from tensorflow_serving.config import ssl_config_pb2  # type: ignore[attr-defined]

        return ssl_config_pb2.SSLConfig
    except ImportError:
        pass
    proto = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/config/ssl_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
    )
    message = proto.message_type.add(name="SSLConfig")
    F = descriptor_pb2.FieldDescriptorProto
    for number, name in enumerate(PEM_FIELDS, start=1):
        message.field.add(name=name, number=number, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    message.field.add(name="client_verify", number=4, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.SSLConfig")
    )


def read_ssl_config(path: str | Path) -> Any:
    """Parse and check an SSL config file.

    Returns:
        The ``SSLConfig`` message.

    Raises:
        ValueError: naming the file and what is wrong: not a text ``SSLConfig``, a missing server
            key or certificate, a field that holds a path instead of PEM text, or
            ``client_verify`` without a ``custom_ca`` to verify clients against.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read SSL config {path}: {err}") from None
    try:
        config = text_format.Parse(text, ssl_config_class()())
    except text_format.ParseError as err:
        raise ValueError(
            f"{path} is not a text-format tensorflow.serving.SSLConfig ({err}); allowed fields: "
            "server_key, server_cert, custom_ca (PEM text), client_verify (bool)"
        ) from None
    check_ssl_config(config, path)
    return config


def check_ssl_config(config: Any, path: str | Path) -> None:
    """``read_ssl_config``'s checks on a parsed message (``path`` names it in errors)."""
    for field in PEM_FIELDS:
        value = getattr(config, field)
        if field != "custom_ca" and not value:
            raise ValueError(
                f"{path}: {field} is empty; TLS needs the server's key and certificate"
            )
        if value and "-----BEGIN " not in value:
            raise ValueError(
                f"{path}: {field} is {value[:60]!r}, not PEM text; TF Serving's SSLConfig holds the "
                'PEM contents themselves ("-----BEGIN ..."), not a file path'
            )
    if config.client_verify and not config.custom_ca:
        raise ValueError(
            f"{path}: client_verify is true but custom_ca is empty; give the CA that signs the "
            "client certificates"
        )


def format_ssl_config(
    key: str | Path, cert: str | Path, ca: str | Path | None = None, client_verify: bool = False
) -> str:
    """The text of an SSL config holding the PEM files' contents (checked by
    ``read_ssl_config``'s rules before it is returned).

    Raises:
        OSError: when a file cannot be read.
        ValueError: as ``read_ssl_config``.
    """
    config = ssl_config_class()(
        server_key=Path(key).read_text(encoding="ascii"),
        server_cert=Path(cert).read_text(encoding="ascii"),
        custom_ca=Path(ca).read_text(encoding="ascii") if ca else "",
        client_verify=client_verify,
    )
    check_ssl_config(config, "the generated config")
    return text_format.MessageToString(config)


def server_credentials(config: Any) -> grpc.ServerCredentials:
    """gRPC server credentials as TF Serving builds them from an ``SSLConfig``: the server's key
    pair, ``custom_ca`` as the roots for client certificates, and client certificates required
    (and verified) exactly when ``client_verify`` is set."""
    return grpc.ssl_server_credentials(
        [(config.server_key.encode(), config.server_cert.encode())],
        root_certificates=config.custom_ca.encode() or None,
        require_client_auth=config.client_verify,
    )
