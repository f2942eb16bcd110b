"""Run directories: claimed by one training process at a time, and written atomically.

Lock: a run directory holds ``.lock``; the process training into it keeps an exclusive
``flock`` on that file for as long as it runs (the kernel drops it when the process ends, even
on SIGKILL, so a killed run can be resumed at once). Resume skips directories another live
process holds, and a new directory is made with an exclusive ``mkdir``, so two runs started in
the same second never share one (the second gets ``<stamp>-2-<name>``).

Atomic writes: every file of a run directory is written to a temporary file beside it
(``.tmp-<random>-<name>``, same folder, so the same file system) and ``os.replace``d over the
old one, so a reader, or a resume after SIGKILL, sees the old file or the new one, never half a
file. ``remove_temporaries`` deletes the leftovers of a killed writer once the lock is held.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"


class RunDirBusy(RuntimeError):
    """The run directory is held by another live training process."""


class RunLock:
    """An exclusive lock on a run directory (see the module docstring), held until ``release``
    or the end of the process."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir, self._fd = run_dir, fd

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Lock ``run_dir`` (which must exist) without waiting.

        Raises:
            RunDirBusy: another process holds it; the message names its pid.
        """
        run_dir = Path(run_dir)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"run directory {run_dir} is in use by another training process (pid {holder}); "
                "wait for it to end, or start a fresh run (--new)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(run_dir, fd)

    @classmethod
    def try_acquire(cls, run_dir: str | Path) -> RunLock | None:
        """``acquire``, or ``None`` when another process holds the directory."""
        try:
            return cls.acquire(run_dir)
        except RunDirBusy:
            return None

    def release(self) -> None:
        """Give the directory up (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def claim_new(root: Path, name: str, now: datetime | None = None) -> tuple[Path, RunLock]:
    """Make and lock a fresh run directory ``<root>/<UTC stamp>-<name>``.

    ``mkdir`` without ``exist_ok`` is the claim: when another run made the same name in the same
    second, the next free ``<stamp>-<n>-<name>`` (n = 2, 3, ...) is taken instead.
    """
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (f"{stamp}-{name}" if n == 1 else f"{stamp}-{n}-{name}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path, RunLock.acquire(path)  # no config.yaml yet: nobody else tries to resume it
    raise RuntimeError(f"could not make a run directory for {name!r} in {root}")


def remove_temporaries(run_dir: Path) -> int:
    """Delete the ``.tmp-*`` files a killed writer left in ``run_dir`` (hold its lock first).

    Returns:
        How many were removed.
    """
    leftovers = [p for p in run_dir.rglob(f"{TEMP_PREFIX}*") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces ``path`` when the block ends normally.

    The temporary name ends with ``path``'s own name, so writers that check suffixes (Keras
    wants ``.keras`` and ``.weights.h5``) accept it. On an exception ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=f"-{path.name}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: str | Path, fieldnames: list[str], rows: list[dict]) -> None:
    """Write ``rows`` as a CSV with a header to ``path`` atomically (missing fields empty)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
