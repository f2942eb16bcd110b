"""Benchmark automatic near-duplicate grouping on the shared real LC25000 tiles.

Prints, against the true source-tile groups of ``groups.csv``: the adjusted Rand index per class,
groups found vs true, the leak rate of an automatic 70/20/10 grouped split measured with the TRUE
groups (share of test tiles whose true group also has a tile in train), the same for a random
(leaky) split, and the wall time of the grouping.

``--tiles N`` (N larger than the folder) times the grouping at scale, e.g. ``--tiles 15000``, the
size of LC25000's lung subset: it adds generated copies made the way LC25000 made its tiles (a
random source tile, flipped or not, rotated by up to 25 degrees and cropped to the largest
centred square, resized back), each in its source's true group, written to a temporary folder.
``--copies realistic`` makes them the way the copies our grouping missed on unseen LC25000 tiles
look: zoomed in 1-2.5x about an off-centre point, rotated by any angle, corners filled by mirror
reflection or a constant, flipped either way. The shared tiles are 224 px (LC25000's are 768),
so a zoomed copy here is also upsampled and softer than LC25000's own.

``--part`` keeps the source groups the grouping's thresholds were tuned on (``tune``: position in
its class's sorted group list mod 3 == 0, ``tuning_part``) or the other two thirds (``held-out``,
the part to quote); ``--classes`` and ``--sources`` (groups per class) make smaller runs. Copies
are drawn only from the kept sources.

    .venv/bin/python bench/grouping.py [--data DIR] [--seeds 10] [--tiles 15000] [--copies realistic]
        [--part held-out] [--classes lung_n] [--sources 30] [--skip 30] [--copy-seed 1]
        [--save groups.csv]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from lungtf.constants import CLASS_NAMES
from lungtf.data import grouping
from lungtf.data.ingest import Record
from lungtf.data.split import make_split

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lc25000-lung-224"


def true_leak(split: list[Record], truth: dict[str, str]) -> float:
    """Share of test records whose true group also has a record in train (NaN: no test records,
    e.g. when the found groups are so large that none fits the test share)."""
    train = {truth[r.path] for r in split if r.split == "train"}
    test = [r for r in split if r.split == "test"]
    return sum(truth[r.path] in train for r in test) / len(test) if test else float("nan")


def tuning_part(rows: list[dict]) -> set[str]:
    """Source groups the grouping's thresholds are tuned on: every third of each class's sorted
    groups (position mod 3 == 0); figures are quoted on the others (``--part held-out``)."""
    chosen = set()
    for label in sorted({row["label"] for row in rows}):
        chosen |= set(sorted({row["group"] for row in rows if row["label"] == label})[::3])
    return chosen


def select(rows: list[dict], part: str, classes: list[str] | None, sources: int,
           skip: int = 0) -> list[dict]:
    """Rows of ``part`` (``all``, ``tune`` or ``held-out``) of ``classes``: ``sources`` source
    groups per class (0: all) after the first ``skip`` (in sorted order)."""
    tune = tuning_part(rows)
    keep = {g for g in {row["group"] for row in rows}
            if part == "all" or (g in tune) == (part == "tune")}
    rows = [row for row in rows if row["group"] in keep
            and (not classes or row["label"] in classes)]
    if sources or skip:
        first = set()
        for label in {row["label"] for row in rows}:
            groups = sorted({row["group"] for row in rows if row["label"] == label})
            first |= set(groups[skip:skip + sources] if sources else groups[skip:])
        rows = [row for row in rows if row["group"] in first]
    return rows


def realistic_copy(image: np.ndarray, rng: np.random.Generator,
                   made: dict | None = None) -> np.ndarray:
    """A zoomed-in (1-2.5x, off-centre), rotated (any angle), border-filled, flipped copy.

    ``made``, if given, is filled with how: ``zoom``, ``angle``, ``border``, ``flips``."""
    import cv2

    side = image.shape[0]
    zoom, angle = rng.uniform(1.0, 2.5), rng.uniform(0, 360)
    reach = 0.5 * side * (1 - 1 / zoom)
    cx, cy = side / 2 + rng.uniform(-reach, reach), side / 2 + rng.uniform(-reach, reach)
    warp = cv2.getRotationMatrix2D((cx, cy), angle, zoom)
    warp[:, 2] += (side / 2 - cx, side / 2 - cy)
    kind = int(rng.integers(3))
    border = (cv2.BORDER_REFLECT, cv2.BORDER_REFLECT_101, cv2.BORDER_CONSTANT)[kind]
    out = cv2.warpAffine(image, warp, (side, side), flags=cv2.INTER_CUBIC, borderMode=border,
                         borderValue=(255, 255, 255))
    flips = ""
    if rng.random() < 0.5:
        out, flips = out[:, ::-1], "h"
    if rng.random() < 0.5:
        out, flips = out[::-1], flips + "v"
    if made is not None:
        made.update(zoom=round(zoom, 3), angle=round(angle, 1),
                    border=("reflect", "reflect101", "constant")[kind], flips=flips)
    return np.ascontiguousarray(out)


def add_copies(rows: list[dict], root: Path, out: Path, total: int, seed: int = 0,
               realistic: bool = False) -> list[dict]:
    """Write ``total - len(rows)`` LC25000-style copies of random tiles to ``out``; their rows.

    Each copy: a random source tile, mirrored with probability 0.5, rotated by U(-25, 25) degrees
    and cropped to the largest centred square without corners, resized back (so it is also zoomed
    by up to 1.33x about the centre), saved as JPEG. Its group is the source's true group.
    """
    rng = np.random.default_rng(seed)
    added = []
    for i in range(max(0, total - len(rows))):
        row = rows[rng.integers(len(rows))]
        with Image.open(root / row["path"]) as src:
            image = src.convert("RGB")
        if realistic:
            made: dict = {}
            image = Image.fromarray(realistic_copy(np.asarray(image), rng, made))
            path = out / row["label"] / f"copy{i:05d}.jpeg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=90)
            added.append({"path": str(path), "label": row["label"], "group": row["group"],
                          "source": row["path"], **made})
            continue
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        angle = rng.uniform(-25, 25)
        side = image.size[0]
        inner = side / (abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle))))
        box = ((side - inner) / 2, (side - inner) / 2, (side + inner) / 2, (side + inner) / 2)
        image = image.rotate(angle, Image.BICUBIC).crop(box).resize((side, side), Image.BICUBIC)
        path = out / row["label"] / f"copy{i:05d}.jpeg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        added.append({"path": str(path), "label": row["label"], "group": row["group"]})
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("LUNGTF_SHARED_DATA", DEFAULT_DATA),
                        help="folder with groups.csv and the class folders")
    parser.add_argument("--seeds", type=int, default=10, help="split seeds to average the leak over")
    parser.add_argument("--tiles", type=int, default=0,
                        help="grow the set to this many tiles with generated copies (timing at scale)")
    parser.add_argument("--copies", choices=("lc25000", "realistic"), default="lc25000",
                        help="how --tiles makes its copies (see above)")
    parser.add_argument("--part", choices=("all", "tune", "held-out"), default="all",
                        help="source groups to use: tuned on, held out (quote these), or all")
    parser.add_argument("--classes", default="", help="comma-separated classes (default: all)")
    parser.add_argument("--sources", type=int, default=0,
                        help="first N source groups per class of the part (0: all)")
    parser.add_argument("--copy-seed", type=int, default=0,
                        help="seed of the generated copies (another seed: a fresh set of copies)")
    parser.add_argument("--save", default="",
                        help="write path,label,true group,found group and how each copy was made "
                             "to this CSV")
    parser.add_argument("--copies-dir", default="",
                        help="write the generated copies here and keep them (default: a temporary "
                             "folder removed at the end)")
    parser.add_argument("--skip", type=int, default=0,
                        help="leave out the first N source groups per class of the part first")
    args = parser.parse_args()
    root = Path(args.data)
    with open(root / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows = select(rows, args.part, [c for c in args.classes.split(",") if c], args.sources, args.skip)
    print(f"part {args.part}: {len(rows)} real tiles from {len({r['group'] for r in rows})} "
          f"source groups")
    if args.tiles > len(rows):  # the folder lives as long as `scratch`, to the end of main
        scratch = tempfile.TemporaryDirectory(prefix="lungtf-grouping-")
        folder = Path(args.copies_dir or scratch.name)
        copies = add_copies(rows, root, folder, args.tiles, seed=args.copy_seed,
                            realistic=args.copies == "realistic")
        print(f"{len(rows)} real tiles + {len(copies)} generated {args.copies} copies "
              f"(seed {args.copy_seed}) in {folder}")
        rows += copies
    paths = [str(root / row["path"]) for row in rows]
    labels = [row["label"] for row in rows]
    truth = {p: row["group"] for p, row in zip(paths, rows)}

    start, cpu = time.perf_counter(), time.process_time()
    stages: dict[str, int] = {}
    timings: dict[str, float] = {}
    found = grouping.detect_groups(paths, labels, stages=stages, timings=timings)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu

    print(f"{len(paths)} tiles, {os.cpu_count()} CPUs, grouping wall time {seconds:.1f} s "
          f"({len(paths) / seconds:.0f} tiles/s), CPU time {cpu:.1f} s, load average "
          f"{os.getloadavg()[0]:.1f} (other processes slow the wall time)")
    print("stages: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    print("stage wall seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"{'class':<10} {'ARI':>6} {'found':>6} {'true':>5} {'true split':>11} {'found merged':>13}")
    true_of, found_of = np.array([truth[p] for p in paths]), np.array(found)
    for label in [c for c in CLASS_NAMES if c in set(labels)]:
        m = np.array(labels) == label
        t, f = true_of[m], found_of[m]
        split_true = sum(len(set(f[t == g])) > 1 for g in set(t))
        merged = sum(len(set(t[f == g])) > 1 for g in set(f))
        print(f"{label:<10} {adjusted_rand_score(t, f):>6.3f} {len(set(f)):>6} {len(set(t)):>5} "
              f"{split_true:>11} {merged:>13}")

    detected = [Record(p, lab, g) for p, lab, g in zip(paths, labels, found)]
    auto = [true_leak(make_split(detected, seed=s), truth) for s in range(args.seeds)]
    leaky = [true_leak(make_split(detected, seed=s, random=True), truth) for s in range(args.seeds)]
    exact = [true_leak(make_split([replace(r, group=truth[r.path]) for r in detected], seed=s),
                       truth) for s in range(args.seeds)]
    empty = int(np.isnan(auto).sum())
    print(f"leak rate (true groups), 70/20/10 over seeds 0..{args.seeds - 1}: "
          f"automatic grouped split mean {np.nanmean(auto):.2%} max {np.nanmax(auto):.2%}"
          + (f" ({empty} seeds with an empty test split left out)" if empty else "")
          + f"; random split mean {np.mean(leaky):.2%}; true-group split mean {np.mean(exact):.2%}")
    print("automatic grouped split leak per seed: "
          + " ".join(f"{leak:.2%}" for leak in auto))
    if args.save:
        fields = ["path", "label", "group", "found", "source", "zoom", "angle", "border", "flips"]
        with open(args.save, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fields, extrasaction="ignore")
            writer.writeheader()
            for path, row, group in zip(paths, rows, found):
                writer.writerow({**row, "path": path, "found": group})
        print(f"per-tile groups written to {args.save}")


if __name__ == "__main__":
    main()
