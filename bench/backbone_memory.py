"""Host memory from backbone to backbone of one multi-backbone ``python -m lungtf.train`` run.

Runs ``lungtf.train.main`` in-process on ``--tiles`` of the shared real tiles (balanced over the
classes, their true groups in a manifest), every backbone from scratch for ``--epochs`` epochs at
``--image-size`` px, and prints the process's resident memory (``VmRSS``) when each backbone
starts, when its training returns and after ``lungtf.train.fit.release_backbone`` freed it, with
the live Keras models and the functions registered in TensorFlow's eager context at each point.
It stops before the best model is packaged (not measured here). ``--keep`` skips the release, as
the code did before issue 26, for contrast. ``--processes`` trains each backbone in a child
process (``--backbone-process true``, ``lungtf.train.isolate``) and prints this (parent)
process's RSS when each child starts and after it ended, each child's peak RSS (its own
``ru_maxrss``, from its last log line) and ``RUSAGE_CHILDREN``'s peak (the largest child so far).

    python bench/backbone_memory.py [--tiles 150] [--image-size 48] [--epochs 1] \
        [--backbones resnet34,regnet:200mf,regnet:400mf] [--keep | --processes]
    python bench/backbone_memory.py -- --precision mixed_float16   # extra flags to lungtf.train
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lc25000-lung-224"


def rss_mib() -> float:
    """Resident memory of this process in MiB (``VmRSS`` of ``/proc/self/status``)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        line = next(x for x in fh if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def pick_tiles(data: Path, tiles: int, out: Path) -> Path:
    """A ``path,label,group`` manifest of ``tiles`` tiles, whole groups, classes in turn."""
    data = data.resolve()  # canonical absolute rows: the manifest is read with confinement
    with open(data / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: (r["group"], r["path"]))
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    picked = []
    per_class = tiles // len(by_label)
    for label_rows in by_label.values():
        picked += label_rows[:per_class]
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group"])
        writer.writerows((data / r["path"], r["label"], r["group"]) for r in picked)
    return out


class _Packaging(Exception):
    """Raised where the best model would be packaged: the backbones are done."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=SHARED)
    p.add_argument("--tiles", type=int, default=150)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--backbones", default="resnet34,regnet:200mf,regnet:400mf")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--keep", action="store_true", help="do not release (the old behaviour)")
    how.add_argument("--processes", action="store_true",
                     help="each backbone in a child process (--backbone-process true)")
    p.add_argument("extra", nargs="*", help="flags passed on to lungtf.train (after --)")
    args = p.parse_args(argv)
    if not (args.data / "groups.csv").is_file():
        print(f"no groups.csv in {args.data}: needs the shared tiles", file=sys.stderr)
        return 2

    import keras
    from tensorflow.python.eager import context

    import lungtf.train.compare
    import lungtf.train.fit
    import lungtf.train.isolate
    from lungtf.train import main as train

    rows: list[tuple[str, str, float, int, int]] = []
    header = f"{'backbone':<16} {'point':<9} {'RSS MiB':>8} {'live keras Models':>18} {'functions':>9}"

    def note(entry: str, when: str) -> None:
        models = sum(isinstance(o, keras.Model) for o in gc.get_objects())
        rows.append((entry, when, rss_mib(), models, len(context.context().list_function_names())))
        print(f"{entry:<16} {when:<9} {rows[-1][2]:>8.0f} {models:>18} {rows[-1][4]:>9}", flush=True)

    real_train, real_release = lungtf.train.fit.train_backbone, lungtf.train.fit.release_backbone

    def train_backbone(entry, *a, **kw):
        note(entry, "start")
        result = real_train(entry, *a, **kw)
        note(entry, "trained")
        return result

    def release_backbone(precision):
        if not args.keep:
            real_release(precision)
        note(rows[-1][0], "kept" if args.keep else "released")

    def finalize_best(*a, **kw):
        raise _Packaging

    real_child = lungtf.train.isolate.run_child
    children: list[tuple[str, float]] = []  # entry, RUSAGE_CHILDREN peak MiB after it ended

    def run_child(cmd, env):
        entry = cmd[4]  # python -m lungtf.train.isolate RUN_DIR ENTRY ...
        note(entry, "start")
        code = real_child(cmd, env)
        note(entry, "ended")
        children.append((entry, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
        return code

    lungtf.train.fit.train_backbone = train_backbone
    lungtf.train.fit.release_backbone = release_backbone
    lungtf.train.compare.finalize_best = finalize_best
    lungtf.train.isolate.run_child = run_child
    load = os.getloadavg()[0]
    start = time.perf_counter()
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = pick_tiles(args.data, args.tiles, Path(tmp) / "tiles.csv")
        argv_train = [
            "--preset", "cpu", "--data", str(manifest), "--backbones", args.backbones,
            "--image-size", str(args.image_size), "--crop-size", "0", "--weights", "none",
            "--scratch-epochs", str(args.epochs), "--output", str(Path(tmp) / "runs"),
            "--name", "memory", "--verbose", "0",
            *(["--backbone-process", "true"] if args.processes else []), *args.extra,
        ]  # fmt: skip
        try:
            train(argv_train)
        except _Packaging:
            pass
        logs = "".join(p.read_text() for p in (Path(tmp) / "runs").glob("*/train.log"))
    peaks = dict(re.findall(r"(\S+): process \d+ ends, peak RSS (\d+) MiB", logs))
    wall = time.perf_counter() - start
    mode = ("NO release (--keep)" if args.keep else "each in a child process (--processes)"
            if args.processes else "released after each backbone")
    print(f"\nbench/backbone_memory.py: {args.tiles} shared tiles, {args.image_size} px, "
          f"backbones {args.backbones}, {args.epochs} epoch(s) each from scratch, "
          f"{mode}; "
          f"extra flags: {' '.join(args.extra) or 'none'}")
    print(header)
    for entry, when, rss, models, functions in rows:
        print(f"{entry:<16} {when:<9} {rss:>8.0f} {models:>18} {functions:>9}")
    for entry, most in children:
        print(f"child {entry}: peak RSS {peaks.get(entry, '?')} MiB (its ru_maxrss); "
              f"RUSAGE_CHILDREN peak so far {most:.0f} MiB")
    print(f"wall {wall:.0f} s; load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
