"""``python -m lungtf.data {download,check,split,audit}``: the data command line.

Each submodule registers its own subcommands with ``add_commands(subparsers)``; a subcommand's
handler takes the parsed arguments and returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run one data subcommand; returns its exit code."""
    from lungtf.data import download, ingest, split

    parser = argparse.ArgumentParser(
        prog="python -m lungtf.data",
        description="Fetch, check, split (leakage-safe, grouped) and audit LC25000 lung tiles.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    download.add_commands(sub)
    ingest.add_commands(sub)
    split.add_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
