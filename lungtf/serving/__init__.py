"""TF-Serving-compatible serving for development, tests and CI.

Production runs the real ``tensorflow/serving`` image (``docker/``, ``serving/``); this package
speaks the same gRPC API from ``tensorflow-serving-api`` over the same SavedModels, so clients
cannot tell the two apart.

Modules:
    config: read and check a ``ModelServerConfig`` text file (``serving/models.config``).
    models: load SavedModel versions and keep them in step with the base paths (polling).
    handlers: Predict / GetModelMetadata / GetModelStatus logic and TF Serving's error codes.
    limits: request size limits, checked before any request tensor is allocated.
    calls: stop the work of a call whose client has gone (deadline, cancellation).
    server: the gRPC server (``serve``) and warmup replay.
    tls: TLS from TF Serving's SSL config file (``serve --ssl-config``).

Command line: ``python -m lungtf.serving validate CONFIG``, ``serve`` and ``ssl-config``.
"""
