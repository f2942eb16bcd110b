"""Does SimSiam pretraining help? Pretrained + two-phase fine-tune vs from scratch, equal CPU time.

On one grouped split of the shared LC25000 tiles (true source-tile groups from ``groups.csv``,
70/20/10 by group, stratified by class, ``--seed``):

1. ``python -m lungtf.pretrain`` on the **training split only** (validation and test source tiles
   are never read);
2. arm *pretrained*: ``python -m lungtf.train --preset cpu --weights regnet=<pretrained file>``:
   ``--head-epochs`` with the backbone frozen, then ``--finetune-epochs`` with all layers at
   ``--finetune-lr-factor`` x the preset's LR (1.0: the same peak LR as the scratch arm, so the
   arms differ in their starting weights and the frozen-head warm-up);
3. arm *scratch*: ``--preset cpu`` from random weights for ``--scratch-epochs``; ``auto`` gives it
   the CPU time of pretraining + fine-tuning, at the fine-tune arm's CPU seconds per training
   epoch (evaluation and export, the same in both arms, left out; its frozen-head epochs are
   cheaper, so scratch gets slightly fewer epochs than an exact match: the measured CPU times of
   both arms are printed);
4. both chosen models on the same test tiles: accuracy, aca<->scc errors, the paired difference
   with a 95 % interval from a bootstrap over test source tiles (both arms resampled together),
   McNemar's test, wall and CPU time.

The real measurement (defaults: 30 pretraining epochs, 2 + 20 fine-tune epochs at 64 px crops of
128 px tiles on the ~4,200 training tiles) is long and has not been timed yet; run it on a quiet
machine. A check of the script at tiny size (minutes; its figures mean nothing)::

    python bench/pretrain.py --groups-per-class 10 --tiles-per-group 2 --image-size 64 \\
        --crop-size 32 --batch-size 8 --pretrain-epochs 1 --head-epochs 1 --finetune-epochs 1

The real one::

    python bench/pretrain.py [--data ../shared/data/lc25000-lung-224] [--out runs/bench-pretrain]

One split and one seed per arm: with ~30 test source tiles, an interval that includes 0 means no
effect was shown. A cross-validated answer needs one pretraining per fold, on that fold's
training split only (``--splits <results>/folds/fold<i>.csv --split train``, the folds
``bench/cv.py`` writes); ``bench/cv.py`` takes one flags string for every fold, so it cannot pass
a per-fold ``--weights`` file yet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lc25000-lung-224"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, *args):
    """``(result, wall seconds, CPU seconds)`` of ``fn(*args)``."""
    start, cpu = time.perf_counter(), cpu_seconds()
    result = fn(*args)
    return result, time.perf_counter() - start, cpu_seconds() - cpu


def make_splits(data: Path, out: Path, seed: int, groups_per_class: int, tiles_per_group: int):
    """A grouped 70/20/10 split of ``data`` with its true groups, optionally subsampled."""
    from lungtf.data.ingest import load_records
    from lungtf.data.split import make_split, write_manifest
    from lungtf.train.prepare import read_groups

    table = read_groups(data / "groups.csv")
    records = [replace(r, group=table[str(Path(r.path).resolve())]) for r in load_records(data)]
    if groups_per_class or tiles_per_group:
        by_group = defaultdict(list)
        for r in records:
            by_group[(r.label, r.group)].append(r)
        kept, per_class = [], defaultdict(int)
        for (label, _), rows in sorted(by_group.items()):
            if groups_per_class and per_class[label] >= groups_per_class:
                continue
            per_class[label] += 1
            kept += rows[:tiles_per_group] if tiles_per_group else rows
        records = kept
    split = make_split(records, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(split, out / "splits.csv", "grouped")
    return split


def train_arm(name: str, args, splits_csv: Path, flags: list[str]) -> Path:
    """Run ``lungtf.train`` with the cpu preset on ``splits_csv``; returns the run directory."""
    from lungtf.train import main as train_main

    code = train_main([
        "--preset", "cpu", "--splits", str(splits_csv), "--image-size", str(args.image_size),
        "--crop-size", str(args.crop_size), "--batch-size", str(args.batch_size),
        "--output", str(args.out / "runs"), "--name", name, "--new", "--verbose", "2",
        *flags, *args.extra,
    ])  # fmt: skip
    if code != 0:
        raise SystemExit(f"lungtf.train ({name}) exited with {code}")
    return max((args.out / "runs").glob(f"*-{name}"))


def test_predictions(run_dir: Path, test: list):
    """Class ids predicted by the run's chosen model on the test tiles, and the labels."""
    import keras

    import lungtf.models  # noqa: F401  (registers the custom layers for load_model)
    from lungtf.train.compare import predict_records

    meta = json.loads((run_dir / "best" / "lungtf.json").read_text(encoding="utf-8"))
    model = keras.models.load_model(run_dir / "best" / "model.keras", compile=False)
    probs, labels = predict_records(model, test, meta["image_size"], 64)
    if len(labels) != len(test):
        raise SystemExit(f"{len(test) - len(labels)} test files could not be read")
    return probs.argmax(axis=1), labels


def paired_interval(labels, pred_a, pred_b, groups, n=2000, seed=42) -> tuple[float, float]:
    """95 % interval of accuracy(A) - accuracy(B), resampling test source tiles (both arms
    together, so the pairing is kept)."""
    import numpy as np

    _, ids = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    counts = np.zeros((ids.max() + 1, 3))
    np.add.at(counts, ids, np.stack([pred_a == labels, pred_b == labels,
                                     np.ones_like(labels)], axis=1).astype(float))
    draws = counts[np.random.default_rng(seed).integers(0, len(counts), (n, len(counts)))].sum(1)
    diff = (draws[:, 0] - draws[:, 1]) / draws[:, 2]
    return float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))


def carcinoma_errors(labels, pred) -> str:
    """``aca->scc / scc->aca`` error counts."""
    from lungtf.constants import class_index

    aca, scc = class_index("lung_aca"), class_index("lung_scc")
    return f"{int(((labels == aca) & (pred == scc)).sum())} / {int(((labels == scc) & (pred == aca)).sum())}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SHARED, help="tiles with a groups.csv")
    p.add_argument("--out", type=Path, default=Path("runs/bench-pretrain"))
    p.add_argument("--seed", type=int, default=42, help="split seed")
    p.add_argument("--groups-per-class", type=int, default=0, help="subsample (0: all)")
    p.add_argument("--tiles-per-group", type=int, default=0, help="subsample (0: all)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--crop-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="pretraining batch")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--head-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=20)
    p.add_argument("--finetune-lr-factor", type=float, default=1.0)
    p.add_argument("--scratch-epochs", default="auto", help="'auto' (equal CPU time) or a number")
    p.add_argument("extra", nargs="*", help="flags passed on to both lungtf.train arms (after --)")
    args = p.parse_args(argv)
    if not (args.data / "groups.csv").is_file():
        raise SystemExit(f"no groups.csv in {args.data}: the benchmark needs the true groups")

    from lungtf.evaluate.metrics import mcnemar
    from lungtf.pretrain import main as pretrain_main

    load_before = os.getloadavg()
    split = make_splits(args.data, args.out, args.seed, args.groups_per_class,
                        args.tiles_per_group)
    splits_csv = args.out / "splits.csv"
    test = [r for r in split if r.split == "test"]
    code, pre_wall, pre_cpu = timed(pretrain_main, [
        "--splits", str(splits_csv), "--split", "train", "--backbones", "regnet:200mf",
        "--image-size", str(args.image_size), "--crop-size", str(args.crop_size),
        "--epochs", str(args.pretrain_epochs), "--batch-size", str(args.batch_size),
        "--out", str(args.out / "pretrained"), "--seed", str(args.seed),
    ])  # fmt: skip
    if code != 0:
        raise SystemExit(f"lungtf.pretrain exited with {code}")
    weights = args.out / "pretrained" / "regnet-200mf.weights.h5"
    config = args.out / "finetune.yaml"
    config.write_text(f"train:\n  finetune_lr_factor: {args.finetune_lr_factor}\n")
    ft_dir, ft_wall, ft_cpu = timed(train_arm, "pretrained", args, splits_csv, [
        "--weights", f"regnet={weights}", "--config", str(config),
        "--head-epochs", str(args.head_epochs), "--epochs", str(args.finetune_epochs),
    ])  # fmt: skip
    # Training's share of the arm (evaluation and export cost the same in both arms).
    trained = json.loads((ft_dir / "regnet-200mf" / "result.json").read_text())["wall_time_s"]
    ft_train_cpu = ft_cpu * min(1.0, trained / ft_wall)
    per_epoch = ft_train_cpu / (args.head_epochs + args.finetune_epochs)
    scratch_epochs = (max(1, round((pre_cpu + ft_train_cpu) / per_epoch))
                      if args.scratch_epochs == "auto" else int(args.scratch_epochs))
    sc_dir, sc_wall, sc_cpu = timed(train_arm, "scratch", args, splits_csv, [
        "--weights", "none", "--scratch-epochs", str(scratch_epochs),
    ])  # fmt: skip

    pred_ft, labels = test_predictions(ft_dir, test)
    pred_sc, _ = test_predictions(sc_dir, test)
    groups = [r.group for r in test]
    low, high = paired_interval(labels, pred_ft, pred_sc, groups)
    acc_ft, acc_sc = float((pred_ft == labels).mean()), float((pred_sc == labels).mean())
    test_mc = mcnemar(labels, pred_ft, pred_sc)
    pre_log = json.loads((args.out / "pretrained" / "regnet-200mf.json").read_text())
    counts = {s: (sum(r.split == s for r in split), len({r.group for r in split if r.split == s}))
              for s in ("train", "val", "test")}
    result = {
        "split": counts, "seed": args.seed, "test_tiles": len(test),
        "pretrain": {"epochs": args.pretrain_epochs, "wall_s": round(pre_wall),
                     "cpu_s": round(pre_cpu), "last": pre_log["history"][-1]},
        "pretrained": {"epochs": f"{args.head_epochs}+{args.finetune_epochs}",
                       "wall_s": round(ft_wall), "cpu_s": round(ft_cpu), "accuracy": acc_ft,
                       "aca_scc": carcinoma_errors(labels, pred_ft), "run": str(ft_dir)},
        "scratch": {"epochs": scratch_epochs, "wall_s": round(sc_wall), "cpu_s": round(sc_cpu),
                    "accuracy": acc_sc, "aca_scc": carcinoma_errors(labels, pred_sc),
                    "run": str(sc_dir)},
        "difference": acc_ft - acc_sc, "interval95": [low, high], "mcnemar": test_mc,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"split (grouped, true groups, seed {args.seed}): " + ", ".join(
        f"{s} {n} tiles / {g} sources" for s, (n, g) in counts.items()))
    print(f"pretraining     {args.pretrain_epochs} epochs on the train split only: "
          f"{pre_wall / 60:.1f} min wall, {pre_cpu / 60:.1f} CPU-min; last loss "
          f"{pre_log['history'][-1]['loss']:.3f}, z_std {pre_log['history'][-1]['z_std']:.3f} "
          f"(collapse 0, spread {pre_log['z_std_spread']})")
    for name, acc, wall, cpu, pred, ep in (
        ("pretrained", acc_ft, ft_wall, ft_cpu, pred_ft, f"{args.head_epochs}+{args.finetune_epochs}"),
        ("scratch", acc_sc, sc_wall, sc_cpu, pred_sc, str(scratch_epochs)),
    ):
        total = cpu + (pre_cpu if name == "pretrained" else 0)
        print(f"{name:15s} {ep:>6s} epochs: test accuracy {acc:.4f}, aca->scc / scc->aca "
              f"{carcinoma_errors(labels, pred)}, {wall / 60:.1f} min wall, total "
              f"{total / 60:.1f} CPU-min")
    print(f"difference      {acc_ft - acc_sc:+.4f} (pretrained - scratch) on {len(test)} test tiles "
          f"of {counts['test'][1]} sources; 95% interval {low:+.3f}..{high:+.3f} (paired "
          f"bootstrap over test sources); McNemar p = {test_mc['p_value']:.3g}")
    print(f"load average    {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"result: {args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
