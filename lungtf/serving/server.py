"""The TF-Serving-compatible gRPC dev server: PredictionService and ModelService over SavedModels.

It registers the service definitions from ``tensorflow-serving-api`` so any TF Serving client
(``lungtf.client``, the demo, ``saved_model_cli``-style tools) talks to it unchanged. Handlers live
in ``lungtf.serving.handlers``; this module only adapts them to gRPC, warms versions up, polls the
base paths and shuts down gracefully on SIGTERM / SIGINT.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    model_service_pb2_grpc,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from lungtf.export import WARMUP_FILE
from lungtf.heap import glibc
from lungtf.serving import handlers
from lungtf.serving.admission import Admission
from lungtf.serving.calls import Call
from lungtf.serving.config import ModelEntry
from lungtf.serving.limits import Limits, ServingError
from lungtf.serving.models import ModelManager, Servable

log = logging.getLogger("lungtf.serving")

def grpc_options(limits: Limits) -> list[tuple[str, int]]:
    """gRPC server options: the message limit in both directions (gRPC answers
    RESOURCE_EXHAUSTED above it, before the handler sees the request), and HTTP/2 flow control
    without window growth (no BDP probe, 64 KiB per stream), so calls queued behind busy workers
    leave their messages with the client instead of in the server's transport buffers."""
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 65536),
    ]


def return_large_frees_to_memory() -> None:
    """Have glibc map every allocation of 1 MiB or more on its own and unmap it when freed.

    By default glibc raises its mmap threshold after such a free (up to 32 MiB), so the next
    request-sized buffers come from per-thread heaps that keep them after they are freed: the
    server's memory then grows to the sum of each worker's largest request, not to what is in
    use. Without glibc (``mallopt`` missing) this does nothing.
    """
    libc = glibc()
    if libc is not None:
        libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD: fixed, so never raised again


def replay_warmup(servable: Servable) -> int:
    """Replay ``assets.extra/tf_serving_warmup_requests`` through ``handlers.predict``, as TF
    Serving does at load; a failing record rejects the version.

    Returns:
        The number of requests replayed (0 when the version has no warmup file).
    """
    path = servable.path / "assets.extra" / WARMUP_FILE
    if not path.is_file():
        return 0
    table = {servable.name: {servable.version: servable}}
    count = 0
    for record in tf.data.TFRecordDataset(str(path)):
        entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = entry.predict_log.request
        request.model_spec.name = servable.name
        request.model_spec.ClearField("version_choice")
        handlers.predict(table, request)
        count += 1
    return count


def _answer(handler: Any, request: Any, context: Any) -> Any:
    """Run a handler and turn errors into gRPC statuses: never UNKNOWN, never a dead thread."""
    try:
        return handler(request)
    except ServingError as err:
        code, message = err.code, err.message
    except Exception:  # an unexpected bug still answers with a status, not a crash
        log.exception("request failed")  # the details stay here, not in the client's answer
        code, message = grpc.StatusCode.INTERNAL, handlers.INTERNAL_MESSAGE
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        log.info("request stopped: %s", message)
    context.abort(code, message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService over a ``ModelManager``."""

    def __init__(self, manager: ModelManager, limits: Limits) -> None:
        self.manager = manager
        self.limits = limits
        self.labels = {name: e.labels for name, e in manager.entries.items()}

    def Predict(self, request: Any, context: Any) -> Any:
        call = Call(context)
        return _answer(
            lambda r: handlers.predict(self.manager.table(), r, self.labels, self.limits, call),
            request,
            context,
        )

    def GetModelMetadata(self, request: Any, context: Any) -> Any:
        return _answer(
            lambda r: handlers.model_metadata(self.manager.table(), r, self.labels),
            request,
            context,
        )

    def _not_predict(self, method: str, request: Any, context: Any) -> Any:
        """Classify/Regress: TF Serving's answer for a model that has only predict signatures."""
        return _answer(
            lambda r: handlers.not_predict(self.manager.table(), r.model_spec, method, self.labels),
            request, context,
        )

    def Classify(self, request: Any, context: Any) -> Any:
        return self._not_predict("classify", request, context)

    def Regress(self, request: Any, context: Any) -> Any:
        return self._not_predict("regress", request, context)

    def MultiInference(self, request: Any, context: Any) -> Any:
        def run(r: Any) -> None:
            if not r.tasks:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, "MultiInferenceRequest has no tasks"
                )
            for task in r.tasks:
                method = task.method_name.rsplit("/", 1)[-1]
                if method not in ("classify", "regress"):
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"Unsupported signature method_name: {task.method_name!r}; "
                        "MultiInference takes tensorflow/serving/classify or regress tasks",
                    )
                handlers.not_predict(self.manager.table(), task.model_spec, method, self.labels)

        return _answer(run, request, context)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: ``GetModelStatus`` (config reload is not offered)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def GetModelStatus(self, request: Any, context: Any) -> Any:
        return _answer(lambda r: handlers.model_status(self.manager.table(), r), request, context)

    def HandleReloadConfigRequest(self, request: Any, context: Any) -> Any:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "the dev server reads models.config at start; restart it to change models",
        )


def serve(
    entries: list[ModelEntry],
    host: str = "127.0.0.1",
    port: int = 8500,
    poll_seconds: float = 1.0,
    workers: int = 8,
    grace_seconds: float = 10.0,
    limits: Limits | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Load the models, serve gRPC until SIGTERM/SIGINT, then stop gracefully.

    ``limits`` bound what one request may ask (message size, images per request, bytes per
    image) and the request bytes all calls hold together (``Admission``); ``Limits()`` defaults
    when ``None``. With ``credentials`` (``lungtf.serving.tls.server_credentials``) the port
    speaks TLS only; plaintext otherwise.

    Prints ``listening on HOST:PORT`` (with the real port when ``port`` is 0) once requests are
    accepted, so a parent process can read where to connect.

    Returns:
        The process exit code (0 after a graceful stop).
    """
    limits = limits or Limits()
    return_large_frees_to_memory()
    manager = ModelManager(entries, on_load=replay_warmup)
    manager.poll(initial=True)
    admission = Admission(limits, workers)  # reads and serves requests within the budget
    server = grpc.server(  # threads for ``workers`` calls served and the calls waiting to be read
        futures.ThreadPoolExecutor(max_workers=admission.threads, thread_name_prefix="lungtf-rpc"),
        options=grpc_options(limits),
        maximum_concurrent_rpcs=4 * workers,
        interceptors=[admission],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, limits), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    try:
        address = f"{host}:{port}"
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        print(f"error: cannot bind {host}:{port}: {err}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    manager.start_polling(poll_seconds)
    log.info("gRPC on %s:%s, %s", host, bound, "TLS" if credentials else "plaintext (no TLS)")
    print(f"listening on {host}:{bound}", flush=True)
    while not stop.wait(0.5):
        pass
    log.info("stopping: finishing in-flight requests (grace %.0f s)", grace_seconds)
    server.stop(grace_seconds).wait()
    manager.stop_polling()
    return 0
