"""``python -m lungtf.serving validate CONFIG`` | ``serve ...`` | ``ssl-config ...``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lungtf.serving.admission import ADMISSION_WAIT_SECONDS
from lungtf.serving.config import ConfigError, ModelEntry, check_entries, load_config
from lungtf.serving.limits import Limits


def build_parser() -> argparse.ArgumentParser:
    """The ``validate`` and ``serve`` sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m lungtf.serving")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="check a ModelServerConfig text file")
    check.add_argument("config", help="e.g. serving/models.config")
    check.add_argument(
        "--no-check-paths", action="store_true", help="check the structure only, not the disk"
    )
    run = sub.add_parser("serve", help="serve SavedModels over TF Serving's gRPC API")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="ModelServerConfig text file (serving/models.config)")
    source.add_argument("--model-base-path", help="one model's base path (integer versions)")
    run.add_argument("--model-name", default="lungtf", help="name for --model-base-path")
    run.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    run.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one")
    run.add_argument(
        "--ssl-config", metavar="FILE",
        help="serve TLS only, from TF Serving's SSLConfig text file (its --ssl_config_file; "
        "serving/ssl_config.example); plaintext without it",
    )
    run.add_argument("--poll-seconds", type=float, default=1.0, help="base path poll interval")
    run.add_argument(
        "--workers", type=int, default=8,
        help="requests parsed and served at once; up to 3 x as many more wait for their message "
        "to be read, on threads of their own, others get RESOURCE_EXHAUSTED at once (health "
        "checks have threads of their own too)",
    )
    defaults = Limits()
    run.add_argument(
        "--max-message-bytes", type=int, default=defaults.max_message_bytes,
        help=f"gRPC message limit, both directions (default {defaults.max_message_bytes}: 64 MiB; "
        "RESOURCE_EXHAUSTED above it)",
    )
    run.add_argument(
        "--max-batch-images", type=int, default=defaults.max_batch_images,
        help=f"most images (batch items) per request (default {defaults.max_batch_images}; "
        "INVALID_ARGUMENT above it)",
    )
    run.add_argument(
        "--max-image-bytes", type=int, default=defaults.max_image_bytes,
        help=f"most bytes of one encoded image (default {defaults.max_image_bytes}: 16 MiB)",
    )
    run.add_argument(
        "--max-inflight-bytes", type=int, default=defaults.max_inflight_bytes,
        help="most request bytes served at once (a request that does not fit gets "
        "RESOURCE_EXHAUSTED); it / (2 x --max-message-bytes) calls, at least 1, read their "
        f"message at once, the others wait up to {ADMISSION_WAIT_SECONDS:g} s for their turn "
        f"(default {defaults.max_inflight_bytes}: 128 MiB)",
    )
    run.add_argument(
        "--max-read-seconds", type=int, default=defaults.max_read_seconds,
        help="most seconds a call may take to send its request message once its turn to be read "
        "has come; then it gets RESOURCE_EXHAUSTED and the next call is read "
        f"(default {defaults.max_read_seconds}: a 64 MiB message at 6.4 MB/s)",
    )
    ssl = sub.add_parser(
        "ssl-config", help="print TF Serving's SSLConfig text (--ssl_config_file) from PEM files"
    )
    ssl.add_argument("--key", required=True, help="server private key (PEM)")
    ssl.add_argument("--cert", required=True, help="server certificate (PEM)")
    ssl.add_argument("--ca", help="CA that signs client certificates (PEM; for --client-verify)")
    ssl.add_argument(
        "--client-verify", action="store_true", help="refuse clients without a certificate"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; returns the exit code (2 on a bad config)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "ssl-config":
        from lungtf.serving.tls import format_ssl_config

        try:
            print(format_ssl_config(args.key, args.cert, args.ca, args.client_verify), end="")
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "validate":
        try:
            entries = load_config(args.config, check_paths=not args.no_check_paths)
        except ConfigError as err:
            print(f"invalid: {err}", file=sys.stderr)
            return 2
        for e in entries:
            print(f"ok: {e.name} <- {e.base_path} ({e.policy}, labels {e.labels or 'none'})")
        return 0
    if args.config:
        try:
            entries = load_config(args.config, check_paths=False)
        except ConfigError as err:
            print(f"invalid: {err}", file=sys.stderr)
            return 2
        for problem in check_entries(entries):
            logging.getLogger("lungtf.serving").warning("%s (polling until it appears)", problem)
    else:
        entries = [ModelEntry(args.model_name, Path(args.model_base_path))]
    try:
        limits = Limits(
            args.max_message_bytes, args.max_batch_images, args.max_image_bytes,
            args.max_inflight_bytes, args.max_read_seconds,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    credentials = None
    if args.ssl_config:
        from lungtf.serving.tls import read_ssl_config, server_credentials

        try:
            credentials = server_credentials(read_ssl_config(args.ssl_config))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from lungtf.serving.server import serve

    return serve(
        entries, args.host, args.port, args.poll_seconds, args.workers, limits=limits,
        credentials=credentials,
    )


if __name__ == "__main__":
    sys.exit(main())
