"""Grouped K-fold cross-validation of lungtf.train recipes, paired, resumable, in pieces.

Every source tile of the data (the true groups of ``groups.csv``) is tested exactly once over
``--folds`` folds (``lungtf.data.split.kfold``: stratified by class; in each fold a share of the
training SOURCE tiles is held out as the validation split that picks the checkpoint). A recipe is
a string of ``python -m lungtf.train`` flags; each (recipe, fold, seed) trains the recipe on the
fold's training sources (``--splits`` manifest, ``--seed``; Keras's random seed is set to the
seed too), evaluates the best model on the fold's test sources and writes one JSON into
``--results``: ``<results>/<recipe hash>/fold<i>-seed<s>.json`` (accuracy, per-source-tile
correct counts, aca<->scc errors, confusion matrix, wall and CPU time, the flags and the
resolved configuration). An existing JSON is never trained again, so runs gather: ``--fold i``
runs one fold, a run without it fills in whatever is missing, and a killed unit resumes from its
backups (``<results>/<hash>/fold<i>-seed<s>/``, locked while it trains).

``--vs FLAGS`` trains a second recipe on the same folds and seeds and reports the PAIRED
difference (second minus first) in accuracy and in aca<->scc errors with a 95% bootstrap interval
over test source tiles (both arms resampled together); ``--seeds 0,1,2`` repeats every fold with
other seeds and reports the spread over seeds. The report: a per-fold table, pooled accuracy with
a source-tile bootstrap interval, source tiles and tiles, wall and CPU time.

    python bench/cv.py --recipe "--preset cpu" --fold 0          # one fold of 5, then stop
    python bench/cv.py --recipe "--preset cpu" --vs "--preset cpu --ema 0.99" --seeds 0,1
    python bench/cv.py --recipe "--preset cpu" --vs "..." --report-only   # gathered so far

``{fold}`` in a recipe is replaced by the fold's index, so each fold can use its own file without
leaking: e.g. SimSiam weights pretrained on that fold's training sources only (the fold manifests
are ``<results>/folds/fold<i>.csv``; run ``bench/cv.py --report-only`` once to write them)::

    python -m lungtf.pretrain --splits cv-results/folds/fold0.csv --split train --out pre/fold0
    python bench/cv.py --recipe "--preset cpu" \
        --vs "--preset cpu --weights regnet=pre/fold{fold}/regnet-200mf.weights.h5" --fold 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lungtf
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lungtf.constants import CLASS_NAMES, PROTOCOL_GROUPED, class_index

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lc25000-lung-224"
RESERVED = ("data", "splits", "groups", "seed", "output", "name", "resume", "new")
"""lungtf.train flags a recipe may not set: cv.py sets them per fold and seed."""
FOLD = "{fold}"
"""Placeholder in a recipe's flags for the fold's index (see ``for_fold``)."""
ACA, SCC = class_index("lung_aca"), class_index("lung_scc")
log = logging.getLogger("lungtf.cv")


ADDED_DEFAULTS = (("train", "pretrain_epochs"), ("model", "input_norm"))
"""Configuration keys added after results were gathered: left out of a recipe's id while they
keep their default, so the recipes that do not set them keep their ids (and results)."""


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def recipe_id(flags: str) -> tuple[list[str], str]:
    """The recipe's tokens and its id: 10 hex digits of the SHA-256 of the configuration the flags
    resolve to (preset file, ``--config`` file and flags, as ``lungtf.train`` resolves them),
    without the run's name, output folder and preset label.

    So two spellings of one recipe share their results, and a recipe whose preset or config file
    changed gets a new id instead of reusing results trained under the old contents.

    Raises:
        ValueError: the flags set one of ``RESERVED`` or do not parse.
    """
    from dataclasses import replace

    from lungtf.config import resolve_run_config, to_dict
    from lungtf.train.cli import _overrides, build_parser
    from lungtf.train.runtime import choose_preset

    tokens = shlex.split(flags)
    try:
        args = build_parser().parse_args(tokens)
    except SystemExit:
        raise ValueError(f"recipe {flags!r} is not a valid set of lungtf.train flags") from None
    taken = [f"--{k}" for k in RESERVED if getattr(args, k) not in (None, False)]
    if taken:
        raise ValueError(f"recipe {flags!r} sets {', '.join(taken)}; cv.py sets those itself")
    cfg = resolve_run_config(choose_preset(args.preset), args.config, _overrides(args))
    plain = to_dict(replace(cfg, name="", output="", preset=None))
    for section, key in ADDED_DEFAULTS:  # at its default: the id it had before the key existed
        if plain[section][key] == getattr(getattr(type(cfg)(), section), key):
            del plain[section][key]
    digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()
    return tokens, digest[:10]


def for_fold(tokens: list[str], fold: int) -> list[str]:
    """The recipe's tokens with ``{fold}`` replaced by the fold's index (the recipe's id keeps the
    placeholder, so one recipe names one file per fold, e.g. weights pretrained on that fold's
    training sources only)."""
    return [t.replace(FOLD, str(fold)) for t in tokens]


def load_grouped(data: Path, groups: Path) -> list:
    """Every readable tile of ``data`` with its true source group from ``groups``."""
    from dataclasses import replace

    from lungtf.data.ingest import check_images, load_records
    from lungtf.train.prepare import read_groups

    table = read_groups(groups)
    records, bad = check_images(load_records(data))
    for b in bad:
        log.info("skipped unreadable %s: %s", b.path, b.reason)
    missing = [r.path for r in records if str(Path(r.path).resolve()) not in table]
    if missing:
        raise SystemExit(f"{len(missing)} tiles are not in {groups} (e.g. {missing[0]}): CV needs "
                         f"the true group of every tile")
    return [replace(r, group=table[str(Path(r.path).resolve())]) for r in records]


def setup_folds(results: Path, records: list, k: int, fold_seed: int, val_fraction: float,
                data: Path) -> list[Path]:
    """Write (once) ``folds/fold<i>.csv`` manifests and ``folds.json``; every recipe of a results
    folder uses the same folds, so arms pair. A results folder made with other data or fold
    settings is refused."""
    from lungtf.data.split import kfold, write_manifest
    from lungtf.train.rundir import atomic_path, write_text

    settings = {"data": str(data), "k": k, "fold_seed": fold_seed, "val_fraction": val_fraction,
                "tiles": len(records), "sources": len({r.group for r in records})}
    stored = results / "folds.json"
    if stored.is_file() and json.loads(stored.read_text()) != settings:
        raise SystemExit(f"{results} holds results of other folds ({stored}: "
                         f"{stored.read_text().strip()}); want {settings}: use another --results")
    paths = [results / "folds" / f"fold{i}.csv" for i in range(k)]
    if not stored.is_file() or not all(p.is_file() for p in paths):
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, fold in zip(paths, kfold(records, k, fold_seed, val_fraction)):
            with atomic_path(path) as tmp:
                write_manifest(fold, tmp, PROTOCOL_GROUPED)
        write_text(stored, json.dumps(settings, indent=2))
    return paths


def score(records: list, predicted: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, confusion matrix, aca<->scc errors and per-source-tile counts of a test split."""
    confusion = np.zeros((len(CLASS_NAMES),) * 2, dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_source: dict[str, dict] = {}
    for record, guess, truth in zip(records, predicted, labels):
        row = per_source.setdefault(record.group, {"label": record.label, "n": 0, "correct": 0,
                                                   "aca_scc": 0})
        row["n"] += 1
        row["correct"] += int(guess == truth)
        row["aca_scc"] += int({int(guess), int(truth)} == {ACA, SCC})
    return {
        "accuracy": float((predicted == labels).mean()),
        "n_tiles": len(labels),
        "n_sources": len(per_source),
        "aca_to_scc": int(confusion[ACA, SCC]),
        "scc_to_aca": int(confusion[SCC, ACA]),
        "aca_scc_errors": int(confusion[ACA, SCC] + confusion[SCC, ACA]),
        "confusion": {"rows": "true", "columns": "predicted", "classes": list(CLASS_NAMES),
                      "matrix": confusion.tolist()},
        "per_source": dict(sorted(per_source.items())),
    }


def run_unit(tokens: list[str], manifest: Path, work: Path, seed: int, verbose: int) -> dict | None:
    """Train one recipe on one fold with one seed in ``work`` (resumable); test the best model.

    Returns the result (without the run identification), or ``None`` when another process holds
    ``work``.
    """
    import keras

    import lungtf.models  # noqa: F401  (registers the custom layers for load_model)
    from lungtf.config import (
        dump_yaml,
        resolve_run_config,
        same_config,
        to_dict,
    )
    from lungtf.train.cli import _overrides, build_parser
    from lungtf.train.compare import pick_best, predict_records
    from lungtf.train.fit import entry_dir, release_backbone, train_backbone
    from lungtf.train.prepare import prepare_splits
    from lungtf.train.pretraining import PRETRAIN_DIR
    from lungtf.train.rundir import RunLock, atomic_path, remove_temporaries
    from lungtf.train.runtime import choose_preset, runtime

    args = build_parser().parse_args([*tokens, "--splits", str(manifest), "--seed", str(seed)])
    cfg = resolve_run_config(choose_preset(args.preset), args.config, _overrides(args))
    cfg.validate()
    work.mkdir(parents=True, exist_ok=True)
    lock = RunLock.try_acquire(work)
    if lock is None:
        log.info("%s is in use by another process; skipped", work)
        return None
    try:
        config = work / "config.yaml"
        resumed = config.is_file() and same_config(config, cfg)
        if config.is_file() and not resumed:  # the code's defaults changed: start again
            for old in work.iterdir():
                if old.name != ".lock":
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        remove_temporaries(work)
        with atomic_path(config) as tmp:
            dump_yaml(cfg, tmp)
        keras.utils.set_random_seed(seed)
        wall, cpu = time.perf_counter(), cpu_seconds()
        with runtime(cfg.train) as rt:
            splits, _ = prepare_splits(cfg.data, work)
            results = []
            for e in cfg.backbones:
                results.append(train_backbone(e, cfg, rt, splits, entry_dir(work, e), verbose))
                release_backbone(rt.precision)  # as lungtf.train: memory stays flat over units
        best = pick_best(results)
        model = keras.models.load_model(entry_dir(work, best["entry"]) / "best.keras",
                                        compile=False)
        probs, labels = predict_records(model, splits["test"], cfg.data.image_size,
                                        cfg.data.batch_size)
        out = {
            "backbone": best["entry"], "val_accuracy": best["val_accuracy"],
            **score(splits["test"], probs.argmax(axis=1), labels),
            "train_tiles": len(splits["train"]), "val_tiles": len(splits["val"]),
            "val_sources": len({r.group for r in splits["val"]}),
            "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1),
            "train_wall_s": round(sum(r["wall_time_s"] for r in results), 1),
            "resumed": resumed, "config": to_dict(cfg),
        }
        for entry in cfg.backbones:  # the backups are only needed to resume
            shutil.rmtree(entry_dir(work, entry) / "backup", ignore_errors=True)
            for backup in (entry_dir(work, entry) / PRETRAIN_DIR).glob("*/backup"):
                shutil.rmtree(backup, ignore_errors=True)  # --pretrain-epochs' SimSiam state
        return out
    finally:
        lock.release()
        release_backbone(keras.config.dtype_policy().name)


def source_counts(runs: list[dict], key: str = "correct") -> dict[str, tuple[int, int]]:
    """``{source: (sum of key, sum of n)}`` over result JSONs (over folds and seeds)."""
    out: dict[str, list[int]] = {}
    for run in runs:
        for group, row in run["per_source"].items():
            pair = out.setdefault(group, [0, 0])
            pair[0] += row[key]
            pair[1] += row["n"]
    return {g: (a, n) for g, (a, n) in out.items()}


def bootstrap(values: np.ndarray, n: np.ndarray | None, resamples: int = 2000, seed: int = 0,
              level: float = 0.95) -> tuple[float, float, float]:
    """``(point, low, high)`` of ``sum(values) / sum(n)`` (or ``sum(values)`` when ``n`` is
    ``None``), with a percentile interval from resampling source tiles with replacement."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (resamples, len(values)))
    stats = values[idx].sum(axis=1)
    point = values.sum()
    if n is not None:
        n = np.asarray(n, dtype=float)
        stats, point = stats / n[idx].sum(axis=1), point / n.sum()
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(point), float(low), float(high)


def paired_bootstrap(first: dict, second: dict, per_tile: bool = True, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Paired difference ``second - first`` over the source tiles both arms were tested on:
    ``{source: (count, n)}`` each; per tile (accuracy difference) or as a count difference.
    Each resample draws source tiles with replacement and takes both arms' counts of them."""
    sources = sorted(set(first) & set(second))
    diff = np.array([second[s][0] - first[s][0] for s in sources])
    n = np.array([first[s][1] for s in sources]) if per_tile else None
    return bootstrap(diff, n, resamples, seed)


def load_results(folder: Path, k: int, seeds: list[int]) -> dict[tuple[int, int], dict]:
    """``{(fold, seed): result}`` of the JSONs in a recipe's folder."""
    out = {}
    for fold in range(k):
        for seed in seeds:
            path = folder / f"fold{fold}-seed{seed}.json"
            if path.is_file():
                out[fold, seed] = json.loads(path.read_text())
    return out


def report(arms: list[tuple[str, str, dict]], k: int, seeds: list[int], resamples: int) -> str:
    """The per-fold table, pooled accuracy with its interval, the spread over seeds, time, and
    (two arms) the paired differences."""
    lines = []
    for name, flags, runs in arms:
        header = ("| fold | seed | tiles | sources | accuracy | aca<->scc | missed cancers "
                  "| best val | wall min | CPU min |")
        lines += [f"## {name}: {flags} ({len(runs)} of {k * len(seeds)} fold runs done)", "",
                  header, "|" + " --- |" * 10]
        for (fold, seed), r in sorted(runs.items()):
            missed = sum(r["confusion"]["matrix"][i][class_index("lung_n")]
                         for i in (ACA, SCC))
            lines.append(f"| {fold} | {seed} | {r['n_tiles']} | {r['n_sources']} | "
                         f"{r['accuracy']:.4f} | {r['aca_scc_errors']} | {missed} | "
                         f"{r['val_accuracy']:.4f} | {r['wall_s'] / 60:.1f} | "
                         f"{r['cpu_s'] / 60:.1f} |")
        if not runs:
            lines.append("")
            continue
        counts = source_counts(list(runs.values()))
        correct, n = np.array(list(counts.values())).T
        acc, low, high = bootstrap(correct, n, resamples)
        tiles = sum(r["n_tiles"] for r in runs.values())
        lines += ["", (f"pooled accuracy {acc:.4f} (95% interval {low:.3f}-{high:.3f}, "
                       f"bootstrap over {len(counts)} test source tiles; {tiles} tile tests)")]
        by_seed = {s: [r for (_, s2), r in runs.items() if s2 == s] for s in seeds}
        full = {s: sum(r["per_source"][g]["correct"] for r in rs for g in r["per_source"])
                / sum(r["n_tiles"] for r in rs) for s, rs in by_seed.items() if len(rs) == k}
        if len(full) > 1:
            values = np.array(list(full.values()))
            each = ", ".join(f"{s}: {v:.4f}" for s, v in full.items())
            lines.append(f"over seeds (complete CVs): {each}; mean {values.mean():.4f}, "
                         f"sd {values.std(ddof=1):.4f}, range {values.min():.4f}-"
                         f"{values.max():.4f}")
        wall, cpu = (sum(r[key] for r in runs.values()) / 60 for key in ("wall_s", "cpu_s"))
        lines += [f"time: {wall:.1f} min wall, {cpu:.1f} min CPU", ""]
    if len(arms) == 2:
        (_, _, a), (_, _, b) = arms
        both = sorted(set(a) & set(b))
        lines.append(f"## paired: second minus first, over the {len(both)} fold runs both have")
        if both:
            pick = [(a[u], b[u]) for u in both]
            first, second = ([p[i] for p in pick] for i in (0, 1))
            d, low, high = paired_bootstrap(source_counts(first), source_counts(second),
                                            resamples=resamples)
            lines.append(f"accuracy difference {d:+.4f} (95% interval {low:+.4f} to {high:+.4f}; "
                         f"paired bootstrap over {len(source_counts(first))} source tiles)")
            e, low, high = paired_bootstrap(source_counts(first, "aca_scc"),
                                            source_counts(second, "aca_scc"), per_tile=False,
                                            resamples=resamples)
            n_seeds = len({s for _, s in both})
            lines.append(f"aca<->scc errors difference {e:+.0f} summed over the runs "
                         f"(95% interval {low:+.0f} to {high:+.0f}; {e / n_seeds:+.1f} per seed)")
            per_seed = []
            for s in seeds:
                units = [u for u in both if u[1] == s]
                if len(units) == k:
                    per_seed.append(sum(b[u]["accuracy"] * b[u]["n_tiles"]
                                        - a[u]["accuracy"] * a[u]["n_tiles"] for u in units)
                                    / sum(a[u]["n_tiles"] for u in units))
            if len(per_seed) > 1:
                lines.append("difference per seed (complete CVs): "
                             + ", ".join(f"{v:+.4f}" for v in per_seed))
        lines.append("")
    return "\n".join(lines)


def commit() -> str | None:
    """The checkout's git commit (with ``-dirty`` when changed), for the record."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Run the missing (recipe, fold, seed) units, then print the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED), help="tiles (class folders or CSV manifest)")
    p.add_argument("--groups", help="path,label,group CSV (default: groups.csv in --data)")
    p.add_argument("--results", default="cv-results", help="folder of result JSONs")
    p.add_argument("--recipe", default="--preset cpu", help="lungtf.train flags of the recipe")
    p.add_argument("--vs", help="lungtf.train flags of a second recipe, paired with the first")
    p.add_argument("--folds", type=int, default=5, help="K of the K-fold split")
    p.add_argument("--fold", type=int, help="run only this fold (0..K-1)")
    p.add_argument("--seeds", default="0", help="comma list of training seeds")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of each class's training source tiles held out for validation")
    p.add_argument("--report-only", action="store_true", help="train nothing, report")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.fold is not None and not 0 <= args.fold < args.folds:
        p.error(f"--fold must be in 0..{args.folds - 1}; got {args.fold}")
    data = Path(args.data).resolve()
    groups = Path(args.groups) if args.groups else data / "groups.csv"
    if not groups.is_file():
        p.error(f"no groups file {groups}: CV needs the true source groups")
    arms = []
    for flags in [args.recipe] + ([args.vs] if args.vs else []):
        try:
            tokens, rid = recipe_id(flags)
        except ValueError as err:
            p.error(str(err))
        arms.append((flags, tokens, rid))
    results = Path(args.results)
    records = load_grouped(data, groups)
    manifests = setup_folds(results, records, args.folds, args.fold_seed, args.val_fraction, data)
    folds = [args.fold] if args.fold is not None else range(args.folds)
    trained = 0
    for fold in [] if args.report_only else folds:
        for seed in seeds:
            for flags, tokens, rid in arms:
                path = results / rid / f"fold{fold}-seed{seed}.json"
                if path.is_file():
                    continue
                log.info("recipe %s (%s), fold %d, seed %d: training", rid, flags, fold, seed)
                out = run_unit(for_fold(tokens, fold), manifests[fold],
                               results / rid / path.stem, seed, args.verbose)
                if out is None:
                    continue
                from lungtf.train.rundir import write_text

                result = {"recipe": flags, "recipe_hash": rid, "fold": fold, "k": args.folds,
                          "seed": seed, "fold_seed": args.fold_seed, "data": str(data),
                          "commit": commit(), **out}
                write_text(path, json.dumps(result, indent=1))
                trained += 1
                log.info("fold %d seed %d: accuracy %.4f on %d tiles (%d sources), %.1f min",
                         fold, seed, out["accuracy"], out["n_tiles"], out["n_sources"],
                         out["wall_s"] / 60)
    print(f"data {data}: {len(records)} tiles, {len({r.group for r in records})} source tiles, "
          f"{args.folds} folds (fold seed {args.fold_seed}), seeds {seeds}; trained {trained} "
          f"fold runs now; results in {results}")
    names = ["first", "second"]
    print(report([(f"{names[i]} ({rid})", flags,
                   load_results(results / rid, args.folds, seeds))
                  for i, (flags, _, rid) in enumerate(arms)], args.folds, seeds, args.resamples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
