"""Loaded SavedModel versions and the manager that keeps them in step with the base paths.

Like TF Serving's file-system source, ``ModelManager.poll`` lists each base path, keeps only
integer folder names, applies the version policy and loads what is new before it drops what is no
longer wanted. The table of loaded versions is replaced as a whole (never edited in place), so a
request that already holds a ``Servable`` finishes on it even while its version is unloaded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungtf.export import numeric_versions
from lungtf.serving.config import ModelEntry

log = logging.getLogger("lungtf.serving")


@dataclass(frozen=True)
class Servable:
    """One loaded version of one model.

    Attributes:
        name: the model name.
        version: the integer version.
        path: the version folder.
        loaded: the object from ``tf.saved_model.load`` (keeps variables alive).
        signature_defs: ``SignatureDef`` protos by key, read from ``saved_model.pb`` exactly as
            TF Serving reports them in ``GetModelMetadata``.
    """

    name: str
    version: int
    path: Path
    loaded: Any
    signature_defs: dict[str, Any]

    def function(self, key: str) -> Any:
        """The concrete function behind signature ``key``."""
        return self.loaded.signatures[key]


def read_signature_defs(version_dir: Path) -> dict[str, Any]:
    """SignatureDefs of the ``serve`` MetaGraph in ``saved_model.pb`` (internal ``__`` keys left out)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    graph = next(
        (g for g in saved.meta_graphs if "serve" in g.meta_info_def.tags), saved.meta_graphs[0]
    )
    return {k: v for k, v in graph.signature_def.items() if not k.startswith("__")}


def load_servable(name: str, version: int, path: Path) -> Servable:
    """Load one version folder with ``tf.saved_model.load``."""
    import tensorflow as tf

    return Servable(name, version, path, tf.saved_model.load(str(path)), read_signature_defs(path))


def folder_fingerprint(path: Path) -> tuple[int, int, int]:
    """(file count, total bytes, newest mtime in ns): unchanged between polls = fully written."""
    files = [p.stat() for p in path.rglob("*") if p.is_file()]
    return len(files), sum(s.st_size for s in files), max((s.st_mtime_ns for s in files), default=0)


class ModelManager:
    """Serves the versions each ``ModelEntry``'s policy asks for; see the module docstring.

    Args:
        entries: the configured models.
        on_load: called with each freshly loaded ``Servable`` before it is published (the server
            replays the warmup requests there); an exception rejects the version.
    """

    def __init__(self, entries: list[ModelEntry], on_load: Any = None) -> None:
        self.entries = {e.name: e for e in entries}
        self.on_load = on_load
        self._table: dict[str, dict[int, Servable]] = {e.name: {} for e in entries}
        self._seen: dict[Path, tuple[int, int, int]] = {}
        self._failed: dict[Path, tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def table(self) -> dict[str, dict[int, Servable]]:
        """The current ``{name: {version: Servable}}``; callers must not modify it."""
        return self._table

    def _ready(self, path: Path, initial: bool) -> bool:
        """A version folder may be loaded: it has saved_model.pb and stopped changing."""
        if not (path / "saved_model.pb").is_file():
            return False
        fingerprint = folder_fingerprint(path)
        previous, self._seen[path] = self._seen.get(path), fingerprint
        if self._failed.get(path) == fingerprint:
            return False
        return initial or previous == fingerprint

    def poll(self, initial: bool = False) -> None:
        """Load new wanted versions, then drop unwanted ones, for every model.

        Args:
            initial: at start-up folders present are taken as complete; later, a new folder is
                loaded only once it is unchanged across two polls (half-copied folders wait).
        """
        with self._lock:
            table = {name: dict(versions) for name, versions in self._table.items()}
            for name, entry in self.entries.items():
                current = table[name]
                on_disk = numeric_versions(entry.base_path)
                ready = [
                    v
                    for v in on_disk
                    if v in current or self._ready(entry.base_path / str(v), initial)
                ]
                for version in entry.wanted(ready):
                    if version not in current:
                        servable = self._load(name, version, entry.base_path / str(version))
                        if servable is not None:
                            current[version] = servable
                keep = set(entry.wanted([v for v in ready if v in current]))
                for version in sorted(set(current) - keep):
                    log.info("unloading %s version %d", name, version)
                    del current[version]
            self._table = table

    def _load(self, name: str, version: int, path: Path) -> Servable | None:
        try:
            servable = load_servable(name, version, path)
            if self.on_load is not None:
                self.on_load(servable)
        except Exception as err:  # noqa: BLE001  (a bad folder must not stop the others)
            self._failed[path] = folder_fingerprint(path)
            log.error("could not load %s version %d from %s: %s", name, version, path, err)
            return None
        log.info("loaded %s version %d from %s", name, version, path)
        return servable

    def start_polling(self, seconds: float) -> None:
        """Poll every ``seconds`` on a daemon thread until ``stop_polling``."""

        def loop() -> None:
            while not self._stop.wait(seconds):
                try:
                    self.poll()
                except Exception:  # keep polling: a transient FS error must not end updates
                    log.exception("polling the model base paths failed")

        self._thread = threading.Thread(target=loop, name="lungtf-poll", daemon=True)
        self._thread.start()

    def stop_polling(self) -> None:
        """Stop the polling thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
