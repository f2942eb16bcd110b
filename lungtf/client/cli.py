"""``python -m lungtf.client``: predictions, status and Grad-CAM overlays from the command line.

    python -m lungtf.client predict --target HOST:PORT FILES_OR_FOLDERS [--out preds.csv]
    python -m lungtf.client status --target HOST:PORT
    python -m lungtf.client explain --target HOST:PORT FILES_OR_FOLDERS --out DIR
        [--tls-ca ca.pem] [--tls-cert client.pem --tls-key client.key]

With ``--tls-ca`` (the CA that signed the server's certificate; gRPC's default roots with
``--tls``) the channel speaks TLS; ``--tls-cert``/``--tls-key`` add a client certificate for a
server that verifies clients (TF Serving's ``client_verify``). Plaintext otherwise.
``--timeout`` bounds each call, its retries included; ``--retries N`` is how many times a call
the server refused for the moment (``lungtf.client.retry.retryable``) is sent again, 0 for none.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lungtf.client.api import (
    IMAGE_SUFFIXES,
    RETRIES,
    Explanation,
    LungClient,
    LungClientError,
    Prediction,
    add_tls_arguments,
    credentials_from_args,
)
from lungtf.constants import CLASS_NAMES, MAX_BATCH_IMAGES


def find_images(inputs: list[str]) -> list[Path]:
    """Files as given and images (.jpg/.jpeg/.png) found recursively in folders, sorted.

    Raises:
        FileNotFoundError: for a path that does not exist.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return found


def progress_bar(total: int, stream: Any = None, width: int = 30) -> Callable[[int], None]:
    """A text progress bar on ``stream`` (default: the current stderr), redrawn in place."""
    stream = stream or sys.stderr
    start = time.perf_counter()

    def show(done: int) -> None:
        filled = width * done // max(total, 1)
        rate = done / max(time.perf_counter() - start, 1e-9)
        end = "\n" if done >= total else ""
        bar = "#" * filled + "." * (width - filled)
        stream.write(f"\r[{bar}] {done}/{total} images, {rate:.1f} img/s{end}")
        stream.flush()

    return show


def write_csv(paths: list[Path], preds: list[Prediction], stream: Any) -> None:
    """``path,label,class_id,<one probability column per class>`` rows."""
    writer = csv.writer(stream)
    writer.writerow(["path", "label", "class_id", *CLASS_NAMES])
    for path, p in zip(paths, preds):
        probs = (f"{p.probabilities[c]:.6f}" for c in CLASS_NAMES)
        writer.writerow([path, p.label, p.class_id, *probs])


def write_overlays(paths: list[Path], explained: list[Explanation], out: Path) -> None:
    """One ``lungtf.overlay`` PNG per image into ``out`` (``<stem>.png``; ``<stem>-<n>.png``
    when inputs share a stem), and ``path,overlay,label,probability`` CSV lines on stdout."""
    from lungtf.overlay import overlay

    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    writer = csv.writer(sys.stdout)
    writer.writerow(["path", "overlay", "label", "probability"])
    for path, item in zip(paths, explained):
        name, n = f"{path.stem}.png", 1
        while name in taken:
            n += 1
            name = f"{path.stem}-{n}.png"
        taken.add(name)
        pred = item.prediction
        prob = pred.probabilities[pred.label]
        overlay(path, item.heatmap, f"{pred.label} {prob:.2f}").save(out / name)
        writer.writerow([path, out / name, pred.label, f"{prob:.6f}"])


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m lungtf.client")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("predict", "status", "explain"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--target", default="127.0.0.1:8500", help="gRPC HOST:PORT")
        cmd.add_argument("--model-name", default="lungtf")
        cmd.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
        cmd.add_argument("--retries", type=int, default=RETRIES, metavar="N",
                         help=f"extra attempts of a call the server refused for the moment "
                         f"(unavailable, busy), with backoff, within --timeout; 0: none "
                         f"(default {RETRIES})")
        add_tls_arguments(cmd)
    pred = sub.choices["predict"]
    pred.add_argument("inputs", nargs="+", help="image files or folders")
    pred.add_argument("--out", help="write a CSV here instead of stdout")
    pred.add_argument("--batch-size", type=int, default=MAX_BATCH_IMAGES,
                      help=f"images per request, 1..{MAX_BATCH_IMAGES} (default; the model's "
                      "limit); requests are also split by bytes and declared pixels")
    expl = sub.choices["explain"]
    expl.add_argument("inputs", nargs="+", help="image files or folders")
    expl.add_argument("--out", required=True, help="folder for one overlay PNG per image")
    args = parser.parse_args(argv)
    if args.command == "explain":
        args.batch_size = MAX_BATCH_IMAGES
    if args.command == "predict" and not 1 <= args.batch_size <= MAX_BATCH_IMAGES:
        parser.error(f"--batch-size must be in 1..{MAX_BATCH_IMAGES} (the most images the "
                     f"exported model takes in one request); got {args.batch_size}")
    if args.retries < 0:
        parser.error(f"--retries must be >= 0 (0: no retry); got {args.retries}")
    try:
        credentials = credentials_from_args(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    client = LungClient(
        args.target, timeout=args.timeout, model_name=args.model_name, credentials=credentials,
        retries=args.retries,
    )
    try:
        if args.command == "status":
            print(json.dumps(client.status(), indent=2))
            return 0
        client.max_batch_images = args.batch_size
        paths = find_images(args.inputs)
        if args.command == "explain":
            write_overlays(paths, client.explain(paths, progress_bar(len(paths))), Path(args.out))
            return 0
        preds = client.predict(paths, progress=progress_bar(len(paths)))
    except (LungClientError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as fh:
            write_csv(paths, preds, fh)
    else:
        write_csv(paths, preds, sys.stdout)
    return 0

