"""Throughput of the training input pipeline on the real LC25000 tiles, in images per second.

Measures, back to back in one run, ``lungtf.data.pipeline.make_dataset(training=True)`` with
decode + squish-resize alone and with the default augmentation (``lungtf.config.DEFAULT_AUGMENT``:
flips + rotation <= 10 degrees), at 224 px and batch 64 by default. The first ``--warmup`` batches
(graph tracing, thread start-up, file cache) are not timed.

    python bench/pipeline.py [--data ../shared/data/lc25000-lung-224] [--images 3000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lungtf.config import DEFAULT_AUGMENT
from lungtf.data.ingest import load_records
from lungtf.data.pipeline import build_augmenter, make_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lc25000-lung-224"


def images_per_second(ds, warmup: int, images: int) -> tuple[float, int]:
    """Iterate ``ds`` (repeated), skip ``warmup`` batches, then time at least ``images`` images."""
    it = iter(ds.repeat())
    for _ in range(warmup):
        next(it)
    seen, start = 0, time.perf_counter()
    while seen < images:
        x, _ = next(it)
        seen += int(x.shape[0])
    return seen / (time.perf_counter() - start), seen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("LUNGTF_DATA", str(SHARED)))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=3000, help="timed images per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches per configuration")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)

    records = load_records(args.data)
    print(f"{len(records)} tiles from {args.data}; image_size={args.image_size}, "
          f"batch_size={args.batch_size}, {os.cpu_count()} CPU cores visible")
    configs = {
        "decode+resize": None,
        "decode+resize+augment " + ",".join(DEFAULT_AUGMENT): build_augmenter(
            DEFAULT_AUGMENT, seed=args.seed),
    }
    for name, augmenter in configs.items():
        ds = make_dataset(records, args.image_size, args.batch_size, training=True,
                          augmenter=augmenter, seed=args.seed)
        rate, seen = images_per_second(ds, args.warmup, args.images)
        print(f"{name:<58} {rate:8.0f} img/s  ({seen} images timed)")


if __name__ == "__main__":
    main()
