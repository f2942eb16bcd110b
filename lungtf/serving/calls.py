"""One RPC as the handlers see it: stop work once the client has gone.

``Call.check`` raises CANCELLED or DEADLINE_EXCEEDED once the client no longer waits, so requests
that sat in the queue past their deadline are dropped before any work; ``Call.run`` executes a
SavedModel signature under a TensorFlow ``CancellationManager`` that the gRPC termination
callback cancels (deadline passed, client cancelled, connection dropped), so a running signature
stops at its next loop step (``map_fn`` over the images is a loop) instead of pinning a worker.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
from tensorflow.python.eager import cancellation

from lungtf.serving.limits import ServingError

_thread = threading.local()
_process_wide = cancellation.context  # TensorFlow's own (a private module: pinned TF 2.21)


def _current_manager() -> Any:
    """The cancellation manager of the signature this thread runs, else TensorFlow's own.

    TensorFlow reads one process-wide "current cancellation manager" when it starts a function;
    with several worker threads that global would let one client's cancellation stop another
    client's request, so each worker thread names its own.
    """
    return getattr(_thread, "manager", None) or _process_wide()


cancellation.context = _current_manager  # read by tf's eager context at every function call


class Call:
    """One RPC as the handlers see it (``context`` is the gRPC servicer context, or ``None``
    for calls that have no client, such as warmup replay)."""

    def __init__(self, context: Any = None) -> None:
        self.context = context
        self.manager = cancellation.CancellationManager()
        if context is not None and not context.add_callback(self.manager.start_cancel):
            self.manager.start_cancel()  # the RPC had already ended

    def check(self, stage: str) -> None:
        """Raise when the client no longer waits for the answer.

        Args:
            stage: what would come next, for the log and the status message.

        Raises:
            ServingError: DEADLINE_EXCEEDED once the deadline has passed, CANCELLED once the
                client cancelled (or the connection dropped).
        """
        if self.context is None:
            return
        remaining = self.context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise ServingError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"the deadline passed before {stage}"
            )
        if not self.context.is_active() or self.manager.is_cancelled:
            raise ServingError(grpc.StatusCode.CANCELLED, f"the call ended before {stage}")

    def run(self, function: Any, **inputs: Any) -> Any:
        """``function(**inputs)`` under this call's cancellation manager (TF raises
        ``CancelledError`` at the next loop step once the RPC ends)."""
        _thread.manager = self.manager
        try:
            return function(**inputs)
        finally:
            _thread.manager = None
