"""The C heap: glibc's ``malloc_trim`` and ``mallopt``, no-ops where the C library is not glibc
(macOS, musl, Windows). Used by the dev server (large requests) and by ``lungtf.train`` (between
backbones)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def glibc() -> Any:
    """The C library (``ctypes.CDLL``) if it is glibc (has ``malloc_trim``), else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Give the free pages of glibc's heaps back to the system (``malloc_trim(0)``, ~1 ms).

    glibc keeps freed pieces under its mmap threshold in its heaps: one 60 MiB request left the
    dev server ~70 MiB larger, a burst of 16 ~150 MiB; a finished backbone's freed graphs stay
    likewise until trimmed.
    """
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
