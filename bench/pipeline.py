"""Throughput of the training input pipeline on the real LC25000 tiles, in images per second.

Measures, back to back in one run, ``lungtf.data.pipeline.make_dataset(training=True)`` with
decode + squish-resize alone and with the default augmentation (``lungtf.config.DEFAULT_AUGMENT``:
random horizontal and vertical flips, and a rotation of up to 10 degrees for 75% of the tiles, as
fastai's ``aug_transforms``), at 224 px and batch 64 by default: 8-bit batches, as training gets
them (the model casts to float32 on the device). The first ``--warmup`` batches
(graph tracing, XLA compilation, thread start-up, file cache) are not timed. Besides wall-clock
img/s it prints the process CPU time per image, a figure less distorted when other jobs share
the cores (the load average is printed too): on N free cores, throughput would be about
N / (CPU time per image) — a cautious figure, since contention inflates CPU time as well.

    python bench/pipeline.py [--data ../shared/data/lc25000-lung-224] [--images 3000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lungtf.config import DEFAULT_AUGMENT
from lungtf.data.augment import build_augmenter
from lungtf.data.ingest import load_records
from lungtf.data.pipeline import make_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lc25000-lung-224"


def measure(ds, warmup: int, images: int) -> tuple[float, float, int]:
    """Iterate ``ds`` (repeated), skip ``warmup`` batches, then time at least ``images`` images.

    Returns:
        ``(wall-clock images per second, CPU milliseconds per image, images timed)``.
    """
    it = iter(ds.repeat())
    for _ in range(warmup):
        next(it)
    seen, start, cpu = 0, time.perf_counter(), time.process_time()
    while seen < images:
        x, _ = next(it)
        seen += int(x.shape[0])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seen / wall, 1000 * cpu / seen, seen


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
    cores = os.cpu_count() or 1
    print(f"{len(records)} tiles from {args.data}; image_size={args.image_size}, "
          f"batch_size={args.batch_size}; {cores} CPU cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    configs = {
        "decode+resize": None,
        "decode+resize+augment " + ",".join(DEFAULT_AUGMENT): build_augmenter(
            DEFAULT_AUGMENT, seed=args.seed),
    }
    for name, augmenter in configs.items():
        ds = make_dataset(records, args.image_size, args.batch_size, training=True,
                          augmenter=augmenter, seed=args.seed)
        rate, cpu_ms, seen = measure(ds, args.warmup, args.images)
        print(f"{name:<58} {rate:7.0f} img/s wall  {cpu_ms:5.2f} ms CPU/img "
              f"(~{cores * 1000 / cpu_ms:.0f} img/s if {cores} cores were free)  [{seen} images]")


if __name__ == "__main__":
    main()
