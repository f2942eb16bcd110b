"""Fetch LC25000 from Kaggle with kagglehub, or say at once how to place it by hand.

kagglehub 1.0 makes a single ``requests`` call per step (5 s connect timeout, no retry adapter),
but name resolution can still hang on a machine without network. So the Kaggle API endpoint is
probed first with a short TCP connect, bounded in a thread; when it is unreachable the command
fails within ``timeout`` seconds with the manual instructions instead of waiting on kagglehub.
"""

from __future__ import annotations

import argparse
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from urllib.parse import urlparse

from lungtf.constants import CLASS_NAMES
from lungtf.data.ingest import find_class_root

KAGGLE_DATASET = "andrewmvd/lung-and-colon-cancer-histopathological-images"
"""The Kaggle handle of LC25000 (lung and colon, 25,000 tiles; only the lung part is used)."""

MANUAL_STEPS = f"""\
To place LC25000 by hand:
  1. Download https://www.kaggle.com/datasets/{KAGGLE_DATASET}
     (or the original archive linked from https://github.com/tampapath/lung_colon_image_set).
  2. Unpack it so that one folder DIR holds the class folders {", ".join(CLASS_NAMES)}
     with the .jpeg tiles inside; the LC25000 root lung_colon_image_set/ also works
     (its colon_image_sets/ is left out).
  3. Point lungtf at it, any one of:
       --data DIR                  (python -m lungtf.train / python -m lungtf.data ...)
       export LUNGTF_DATA=DIR
       put it at data/ in the checkout (data/lung_aca, data/lung_n, data/lung_scc)"""


class DownloadError(RuntimeError):
    """LC25000 could not be fetched; the message says why and how to place the data by hand."""


def kaggle_endpoint() -> tuple[str, int]:
    """Host and port of the Kaggle API that kagglehub will call (honours KAGGLE_API_ENVIRONMENT)."""
    from kagglesdk.kaggle_env import get_endpoint, get_env

    url = urlparse(get_endpoint(get_env()))
    return url.hostname or "localhost", url.port or (443 if url.scheme == "https" else 80)


def probe(host: str, port: int, timeout: float) -> str | None:
    """Return why ``host:port`` cannot be reached within ``timeout`` seconds, or ``None``."""

    def connect() -> None:
        with socket.create_connection((host, port), timeout=timeout):
            pass

    pool = ThreadPoolExecutor(max_workers=1)  # getaddrinfo has no timeout of its own
    try:
        pool.submit(connect).result(timeout=timeout)
    except FutureTimeout:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as err:
        return f"cannot connect to {host}:{port}: {err}"
    finally:
        pool.shutdown(wait=False)
    return None


def download(dest: str | Path | None = None, timeout: float = 3.0) -> Path:
    """Fetch LC25000 (skipped when ``dest`` already holds it) and return its lung class folder.

    Args:
        dest: folder to unpack into; ``None`` uses kagglehub's cache (``$KAGGLEHUB_CACHE``).
        timeout: seconds allowed to reach the Kaggle API before giving up.

    Returns:
        The folder that holds ``lung_aca/``, ``lung_n/`` and ``lung_scc/``.

    Raises:
        DownloadError: no network, or kagglehub failed; the message includes ``MANUAL_STEPS``.
    """
    if dest is not None and Path(dest).is_dir():
        try:
            return find_class_root(Path(dest).resolve())
        except ValueError:
            pass  # not there yet: download into it
    host, port = kaggle_endpoint()
    why = probe(host, port, timeout)
    if why is not None:
        raise DownloadError(f"cannot download LC25000: {why}.\n{MANUAL_STEPS}")
    import kagglehub

    try:
        path = kagglehub.dataset_download(
            KAGGLE_DATASET, output_dir=str(dest) if dest is not None else None
        )
        return find_class_root(Path(path).resolve())
    except Exception as err:  # kagglehub raises requests, HTTP and its own errors
        raise DownloadError(
            f"kagglehub could not fetch {KAGGLE_DATASET}: {type(err).__name__}: {err}\n"
            f"{MANUAL_STEPS}"
        ) from err


def _download_command(args: argparse.Namespace) -> int:
    try:
        lung = download(args.dest, timeout=args.timeout)
    except DownloadError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"LC25000 lung tiles are in {lung}")
    print(f"use them with: --data {lung}   (or export LUNGTF_DATA={lung})")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``download``: fetch LC25000 with kagglehub and print where the lung tiles are."""
    p = subparsers.add_parser(
        "download", help="fetch LC25000 from Kaggle (kagglehub) and print where the lung tiles are",
        description="Fetch LC25000 with kagglehub; without network, fail at once and explain "
        "how to place the data by hand.",
    )
    p.add_argument("--dest", help="folder to unpack into (default: kagglehub's cache)")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds to reach the Kaggle API before giving up (default 3)")
    p.set_defaults(func=_download_command)
