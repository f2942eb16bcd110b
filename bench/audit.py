"""Benchmark the leak audit's independent keypoint method on the shared real LC25000 tiles.

A deliberately leaky split (``make_split(random=True)``, the study's protocol) puts copies of one
source tile in train and test. Against the true source-tile groups of ``groups.csv`` this prints,
per seed: how many test tiles have a true twin in train, the share of them the keypoint method
(``keypoints.cross_matches``, which never sees a group) finds (recall), and the share of its
reported pairs whose train tile is from another source (false pairs); then the same on a grouped
split, where every reported pair is false.

``keypoints.COPY_INLIERS`` (10) was chosen on 30 source groups per class drawn with
``numpy.random.default_rng(1)`` (``tuned_groups``); they are left out here unless ``--include-tuned``
is given, so the figures come from the other 70 source groups per class.

    .venv/bin/python bench/audit.py [--data DIR] [--seeds 0,1] [--include-tuned]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

from lungtf.data import keypoints
from lungtf.data.ingest import Record
from lungtf.data.split import make_split

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lc25000-lung-224"


def tuned_groups(rows: list[dict]) -> set[str]:
    """The source groups the audit's inlier threshold was chosen on (30 per class, seed 1)."""
    rng = np.random.default_rng(1)
    chosen = set()
    for label in ("lung_aca", "lung_n", "lung_scc"):
        groups = sorted({row["group"] for row in rows if row["label"] == label})
        chosen |= set(rng.choice(groups, 30, replace=False).tolist())
    return chosen


def score(records: list[Record], sift: keypoints.SiftCache, index: dict[str, int]) -> dict:
    """Recall on test tiles with a true twin in train, and false pairs, of ``cross_matches``."""
    found = {}
    for label in sorted({r.label for r in records}):
        test = [index[r.path] for r in records if r.label == label and r.split == "test"]
        train = [index[r.path] for r in records if r.label == label and r.split == "train"]
        found.update({q: d for q, d, _ in keypoints.cross_matches(sift, test, train)})
    group = {index[r.path]: r.group for r in records}
    train_groups = {r.group for r in records if r.split == "train"}
    twins = [index[r.path] for r in records if r.split == "test" and r.group in train_groups]
    false = sum(group[q] != group[d] for q, d in found.items())
    return {"test": sum(r.split == "test" for r in records), "twins": len(twins),
            "recall": sum(t in found for t in twins) / len(twins) if twins else float("nan"),
            "pairs": len(found), "false": false}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("LUNGTF_SHARED_DATA", DEFAULT_DATA))
    parser.add_argument("--seeds", default="0,1", help="split seeds, comma-separated")
    parser.add_argument("--include-tuned", action="store_true",
                        help="also score the 90 source groups the threshold was chosen on")
    args = parser.parse_args()
    root = Path(args.data)
    with open(root / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    keep = {row["group"] for row in rows}
    if not args.include_tuned:
        keep -= tuned_groups(rows)
    records = [Record(str(root / row["path"]), row["label"], row["group"])
               for row in rows if row["group"] in keep]
    index = {r.path: i for i, r in enumerate(records)}
    start, cpu = time.perf_counter(), time.process_time()
    sift = keypoints.SiftCache([r.path for r in records], os.cpu_count() or 1)
    sift.get(range(len(records)))
    print(f"{len(records)} tiles from {len(keep)} source groups; SIFT "
          f"{time.perf_counter() - start:.0f} s wall")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, random in (("random (leaky)", True), ("grouped", False)):
            split = make_split(records, seed=seed, random=random)
            t = time.perf_counter()
            r = score(split, sift, index)
            print(f"seed {seed} {name:<15} test {r['test']:>5}  with a true twin in train "
                  f"{r['twins']:>5}  found {r['recall']:.2%}  reported pairs {r['pairs']:>5}  "
                  f"false {r['false']} ({r['false'] / max(r['pairs'], 1):.2%})  "
                  f"{time.perf_counter() - t:.0f} s")
    print(f"total {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU, "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
