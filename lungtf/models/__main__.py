"""``python -m lungtf.models``: the table of registered backbones, made from the registry.

Prints a Markdown table (backbone, variants, where ImageNet weights come from, parameters of the
headless backbone at its default variant, default input size, preprocessing). ``--update
README.md`` rewrites the table between the ``<!-- backbones:begin -->`` and ``<!-- backbones:end
-->`` markers of that file, so the README cannot drift from the code (tests/test_models.py
compares them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

BEGIN, END = "<!-- backbones:begin -->", "<!-- backbones:end -->"


def backbone_table() -> str:
    """The Markdown table of every registered backbone (builds each once, headless, size-free)."""
    from lungtf.models import get_spec, list_backbones

    header = ("backbone", "variants (default **bold**)", "ImageNet weights", "parameters",
              "default size", "preprocessing (inside the model)")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in list_backbones():
        spec = get_spec(name)
        backbone = spec.build(spec.default_variant, (None, None, 3))
        params = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
        variants = ", ".join(f"**{v}**" if v == spec.default_variant else v for v in spec.variants)
        source = spec.weights_source if spec.imagenet else "none: trained from scratch"
        lines.append(
            f"| `{name}` | {variants} | {source} | {params / 1e6:.2f} M | {spec.default_size} px "
            f"| {spec.preprocessing} |"
        )
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"markers {BEGIN} and {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Print the table, or write it into ``--update FILE``; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m lungtf.models", description=__doc__)
    parser.add_argument("--update", metavar="FILE", help="rewrite the table in FILE (README.md)")
    args = parser.parse_args(argv)
    table = backbone_table()
    if args.update:
        path = Path(args.update)
        path.write_text(replace_block(path.read_text(encoding="utf-8"), table), encoding="utf-8")
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
