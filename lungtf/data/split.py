"""Leakage-safe splits: stratified grouped splitting, split manifests and the leak audit.

LC25000 holds ~20 rotated/flipped copies of every source tile. A random split puts copies of one
source in train and test, so a model is tested on what it has seen (the study's 0.999 accuracy).
``make_split`` keeps every group (source tile) in exactly one split, per class, so test tiles are
new tissue; ``random=True`` exists only to reproduce the leaky protocol and is labelled so in the
manifest. ``kfold`` gives grouped K-fold assignments (each with a source-level validation
carve) for cross-validation. ``audit`` measures what a split leaks twice: with the log-polar
near-duplicate detector that makes the groups, and with an independent keypoint lookup of every
validation and test tile among the training tiles (``keypoints.cross_matches``), which catches
copies the grouping missed.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lungtf.constants import (
    CLASS_NAMES,
    PROTOCOL_GROUPED,
    PROTOCOL_RANDOM,
    SPLIT_NAMES,
    SPLIT_PROTOCOLS,
)
from lungtf.data import grouping, ingest, keypoints
from lungtf.data.ingest import Record

MANIFEST_COLUMNS = ("path", "label", "group", "split", "protocol")


def make_split(
    records: list[Record],
    ratios: tuple[float, float, float] = (0.7, 0.2, 0.1),
    seed: int = 42,
    random: bool = False,
) -> list[Record]:
    """Assign every record to ``train``/``val``/``test``, stratified by label.

    Grouped (default): within each label, groups are visited in a seeded random order and each
    goes whole to the split furthest below its share of that label's images, so a group lives
    in exactly one split and the ratios are met as closely as group sizes allow.
    ``random=True``: images are shuffled and cut per label, ignoring groups (leaky).

    Args:
        records: images with ``group`` set (not needed when ``random``).
        ratios: train/val/test fractions; non-negative, summing to 1.
        seed: the same seed and input give the same split.
        random: reproduce the study's leaky random split.

    Returns:
        The records in input order, each with ``split`` set.

    Raises:
        ValueError: bad ratios, or (grouped) records without a group.
    """
    ratios = _check_ratios(ratios)
    missing = [r.path for r in records if r.group is None]
    if missing and not random:
        raise ValueError(f"{len(missing)} records have no group (e.g. {missing[0]}); give groups, "
                         f"detect them with lungtf.data.grouping.detect_groups, or use random=True")
    rng = np.random.default_rng(seed)
    target = np.array(ratios)
    split_of: dict[int, str] = {}
    for label in sorted({r.label for r in records}):
        index = [i for i, r in enumerate(records) if r.label == label]
        if random:
            order = rng.permutation(index)
            cuts = np.round(np.cumsum(target)[:-1] * len(order)).astype(int)
            for name, part in zip(SPLIT_NAMES, np.split(order, cuts)):
                split_of.update({int(i): name for i in part})
            continue
        members: dict[str, list[int]] = defaultdict(list)
        for i in index:
            members[records[i].group].append(i)
        counts = np.zeros(3)
        for group in rng.permutation(sorted(members)):
            deficit = np.where(target > 0, target * len(index) - counts, -np.inf)
            chosen = int(np.argmax(deficit))
            counts[chosen] += len(members[group])
            split_of.update({i: SPLIT_NAMES[chosen] for i in members[group]})
    return [replace(r, split=split_of[i]) for i, r in enumerate(records)]


def kfold(
    records: list[Record], k: int = 5, seed: int = 42, val_fraction: float = 0.15
) -> list[list[Record]]:
    """Grouped, stratified K-fold assignments with a source-level validation carve per fold.

    Within each label, groups are visited in a seeded random order and each goes whole to the
    fold with the fewest images of that label so far (ties: fewest images overall, then the
    lowest index), so every group is tested in exactly one fold and each fold's test part holds
    about ``1/k`` of every class. For fold ``i``, the groups of the other folds are the training
    part; from it, per label, ``round(val_fraction * groups)`` whole source groups (at least one,
    never all) are held out as ``val`` for choosing the checkpoint. The carve never splits a
    group, so validation tiles are new source tiles, like the test tiles.

    Args:
        records: images with ``group`` set.
        k: number of folds, >= 2; every label needs at least ``k`` groups.
        seed: the same seed and input give the same folds and carves.
        val_fraction: share of each label's training groups held out for validation, in [0, 1).

    Returns:
        ``k`` lists (fold ``i`` at index ``i``), each the records in input order with ``split``
        set to ``train``, ``val`` or ``test`` (write one with ``write_manifest``).

    Raises:
        ValueError: ``k`` < 2, ``val_fraction`` outside [0, 1), records without a group, or a
            label with fewer than ``k`` groups (or, with a carve, fewer than ``k`` + 1).
    """
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2; got {k!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    missing = [r.path for r in records if r.group is None]
    if missing:
        raise ValueError(f"{len(missing)} records have no group (e.g. {missing[0]}); K-fold "
                         f"needs source groups (groups.csv or grouping.detect_groups)")
    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = defaultdict(list)
    label_of: dict[str, str] = {}
    for i, r in enumerate(records):
        members[r.group].append(i)
        if label_of.setdefault(r.group, r.label) != r.label:
            raise ValueError(f"group {r.group!r} holds labels {label_of[r.group]!r} and "
                             f"{r.label!r}; a source group has one label")
    fold_of: dict[str, int] = {}
    totals = np.zeros(k, dtype=int)
    by_label: dict[str, list[str]] = {}
    for label in sorted(set(label_of.values())):
        groups = sorted(g for g, lab in label_of.items() if lab == label)
        need = k + (val_fraction > 0)
        if len(groups) < need:
            raise ValueError(f"label {label!r} has {len(groups)} groups; {k}-fold CV"
                             f"{' with a validation carve' if val_fraction > 0 else ''} "
                             f"needs at least {need}")
        by_label[label] = groups
        counts = np.zeros(k, dtype=int)
        for group in rng.permutation(groups):
            fold = min(range(k), key=lambda f: (counts[f], totals[f], f))
            fold_of[group] = fold
            counts[fold] += len(members[group])
            totals[fold] += len(members[group])
    folds = []
    for fold in range(k):
        split_of = {}
        for groups in by_label.values():
            train = [g for g in groups if fold_of[g] != fold]
            n_val = min(max(1, round(val_fraction * len(train))), len(train) - 1)
            val = set(rng.permutation(train)[:n_val]) if val_fraction > 0 else set()
            for g in groups:
                split_of[g] = "test" if fold_of[g] == fold else "val" if g in val else "train"
        folds.append([replace(r, split=split_of[r.group]) for r in records])
    return folds


def _check_ratios(ratios) -> tuple[float, float, float]:
    """Return ``ratios`` as floats, or raise ``ValueError`` saying what is allowed."""
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6 or ratios[0] == 0:
        raise ValueError(f"ratios must be three non-negative fractions summing to 1 with a "
                         f"non-zero train part; got {ratios}")
    return ratios


def write_manifest(records: list[Record], path: str | os.PathLike, protocol: str) -> None:
    """Write a split manifest CSV ``path,label,group,split,protocol`` (absolute image paths).

    Raises:
        ValueError: ``protocol`` is not in ``SPLIT_PROTOCOLS`` or a record has no split.
    """
    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(f"protocol must be one of {SPLIT_PROTOCOLS}; got {protocol!r}")
    unsplit = [r.path for r in records if r.split not in SPLIT_NAMES]
    if unsplit:
        raise ValueError(f"{len(unsplit)} records have no split in {SPLIT_NAMES} "
                         f"(e.g. {unsplit[0]}); run make_split first")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows((r.path, r.label, r.group or "", r.split, protocol) for r in records)


def read_manifest(
    path: str | os.PathLike, root: str | os.PathLike | None = None, confine: bool = True
) -> tuple[list[Record], str]:
    """Read a split manifest written by ``write_manifest``: ``(records, protocol)``.

    ``root`` and ``confine`` are ``ingest.load_records``'s (the data root the rows must lie in).

    Raises:
        ValueError: a missing or mixed ``protocol`` column, or a row without a split.
    """
    records = ingest.load_records(path, root, confine)
    with open(path, newline="", encoding="utf-8") as fh:
        protocols = {(row.get("protocol") or "").strip() for row in csv.DictReader(fh)}
    if len(protocols) != 1 or not protocols <= set(SPLIT_PROTOCOLS):
        raise ValueError(f"{path}: every row needs one protocol from {SPLIT_PROTOCOLS}; "
                         f"found {sorted(protocols)}")
    unsplit = [r.path for r in records if r.split is None]
    if unsplit:
        raise ValueError(f"{path}: {len(unsplit)} rows have no split (e.g. {unsplit[0]})")
    return records, protocols.pop()


@dataclass(frozen=True)
class AuditReport:
    """What a split leaks, found by two independent methods.

    Attributes:
        pairs: cross-split near-duplicate pairs of the grouping's detector
            ``(path_a, split_a, path_b, split_b, ncc)``.
        copies: validation and test images with a keypoint-verified copy in train
            ``(path, split, train_path, inliers)`` (``keypoints.cross_matches``).
        n_test: test images.
        leaked: test images with a near-duplicate in train by either method (for the detector:
            its verified pairs joined transitively).
        group_leaked: test images whose manifest ``group`` also has a member in train.
        clean_test: test image paths with no near-duplicate in train by either method.
        flagged: validation and test image paths with a near-duplicate in train by either method.
    """

    pairs: list[tuple[str, str, str, str, float]]
    copies: list[tuple[str, str, str, int]]
    n_test: int
    leaked: int
    group_leaked: int
    clean_test: list[str]
    flagged: frozenset[str] = frozenset()

    @property
    def leak_rate(self) -> float:
        """Share of test images with a near-duplicate in train (0 when there is no test set)."""
        return self.leaked / self.n_test if self.n_test else 0.0

    @property
    def group_leak_rate(self) -> float:
        """Share of test images whose manifest group is also in train."""
        return self.group_leaked / self.n_test if self.n_test else 0.0


def audit(records: list[Record], workers: int | None = None, **options) -> AuditReport:
    """Find near-duplicates across splits and measure the leak, with two independent methods.

    1. ``grouping.near_duplicates`` (log-polar correlation, the grouping's own first stage) over
       all records; a test image leaks when its component of verified pairs reaches train.
    2. ``keypoints.cross_matches``: every validation and test image is looked up among the
       training images of its label by SIFT keypoints alone (no groups, no correlation) and a
       match with ``keypoints.COPY_INLIERS`` RANSAC inliers is a copy.

    Args:
        records: split records (``split`` set).
        workers: threads for decoding and matching (default: all CPUs).
        **options: tuning passed to ``grouping.near_duplicates``.
    """
    paths, labels = [r.path for r in records], [r.label for r in records]
    pairs, scores = grouping.near_duplicates(paths, labels, workers=workers, **options)
    split = np.array([r.split for r in records])
    cross = [(paths[a], split[a], paths[b], split[b], float(s))
             for (a, b), s in zip(pairs, scores) if split[a] != split[b]]
    component = grouping.components(pairs, len(records))
    train_components = set(component[split == "train"].tolist())
    sift = keypoints.SiftCache(paths, workers or os.cpu_count() or 1)
    copies = []
    for label in sorted(set(labels)):
        mine = np.array(labels) == label
        queries = np.flatnonzero(mine & np.isin(split, ["val", "test"]))
        database = np.flatnonzero(mine & (split == "train"))
        copies += [(paths[q], str(split[q]), paths[d], n)
                   for q, d, n in keypoints.cross_matches(sift, queries, database)]
    copied = {path for path, *_ in copies}
    train_groups = {r.group for r in records if r.split == "train" and r.group}
    test = np.flatnonzero(split == "test")
    flagged = {i for i in np.flatnonzero(np.isin(split, ["val", "test"]))
               if component[i] in train_components or paths[i] in copied}
    return AuditReport(
        pairs=cross,
        copies=copies,
        n_test=len(test),
        leaked=sum(i in flagged for i in test),
        group_leaked=sum(records[i].group in train_groups for i in test if records[i].group),
        clean_test=[paths[i] for i in test if i not in flagged],
        flagged=frozenset(paths[i] for i in flagged),
    )


def write_audit(report: AuditReport, path: str | Path) -> None:
    """Write the keypoint copies as CSV ``path,split,train_path,inliers`` (one row a copy)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "split", "train_path", "inliers"])
        writer.writerows(report.copies)


def draw_copies(report: AuditReport, png: str | Path, limit: int = 24) -> None:
    """PNG of up to ``limit`` keypoint copies: each validation/test tile beside its train copy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = report.copies[:limit]
    rows = max(1, len(shown))
    fig, axes = plt.subplots(rows, 2, figsize=(4.4, 2.3 * rows), squeeze=False)
    for (path, split, train_path, inliers), (left, right) in zip(shown, axes):
        for ax, file, title in ((left, path, f"{split}: {Path(path).name}"),
                                (right, train_path, f"train: {Path(train_path).name}")):
            with Image.open(file) as im:
                im.thumbnail((160, 160))
                ax.imshow(im.convert("RGB"))
            ax.set_title(title, fontsize=7)
        right.text(0.02, 0.04, f"{inliers} inliers", transform=right.transAxes, fontsize=7,
                   color="white", backgroundcolor="black")
    for ax in axes.ravel():
        ax.axis("off")
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no copies found", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _read_groups(path: str, root: Path) -> dict[str, str]:
    """``absolute path -> group`` from a ``path,label,group`` CSV (paths relative to ``root``)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"path", "group"} <= set(reader.fieldnames or []):
            raise ValueError(f"groups file {path} has columns {reader.fieldnames}; "
                             f"it needs path,label,group")
        rows = list(reader)
    return {str((root / row["path"].strip()).resolve()): row["group"].strip() for row in rows}


def _ratios(text: str) -> tuple[float, ...]:
    """Parse ``--ratios`` (``0.7,0.2,0.1``) for argparse."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ratios must be three comma-separated fractions like 0.7,0.2,0.1; got {text!r}"
        ) from None


def _split_command(args: argparse.Namespace) -> int:
    _check_ratios(args.ratios)
    records, bad = ingest.check_images(ingest.load_records(args.data))
    for b in bad:
        print(f"skipped bad file {b.path}: {b.reason}")
    if args.random:
        print("WARNING: random (leaky) split: copies of one source tile land in train and test; "
              "use it only to reproduce the study's protocol")
    elif args.groups:
        root = Path(args.data) if Path(args.data).is_dir() else Path(args.data).parent
        groups = _read_groups(args.groups, root)
        missing = [r.path for r in records if r.path not in groups]
        if missing:
            print(f"{len(missing)} images are not in {args.groups} (e.g. {missing[0]})")
            return 2
        records = [replace(r, group=groups[r.path]) for r in records]
    elif any(r.group is None for r in records):
        print(f"detecting near-duplicate groups in {len(records)} images "
              f"(strictness {args.grouping_strictness}) ...")
        stages: dict[str, int] = {}
        found = grouping.detect_groups([r.path for r in records], [r.label for r in records],
                                       strictness=args.grouping_strictness, stages=stages)
        print("grouping stages: " + "; ".join(f"{k} {v}" for k, v in stages.items()))
        records = [replace(r, group=g) for r, g in zip(records, found)]
    protocol = PROTOCOL_RANDOM if args.random else PROTOCOL_GROUPED
    records = make_split(records, args.ratios, args.seed, random=args.random)
    write_manifest(records, args.out, protocol)
    count = Counter((r.label, r.split) for r in records)
    groups = "" if args.random else f"; {len({r.group for r in records})} groups"
    print(f"protocol: {protocol}{groups}; wrote {args.out}")
    print(f"{'class':<10}" + "".join(f"{s:>7}" for s in SPLIT_NAMES))
    for label in CLASS_NAMES:
        print(f"{label:<10}" + "".join(f"{count[label, s]:>7}" for s in SPLIT_NAMES))
    return 0


def _audit_command(args: argparse.Namespace) -> int:
    records, protocol = read_manifest(args.manifest)
    report = audit(records)
    print(f"protocol: {protocol}")
    print(f"cross-split near-duplicate pairs (log-polar detector): {len(report.pairs)}")
    for a, split_a, b, split_b, score in report.pairs[: args.show]:
        print(f"  {split_a}:{a}  {split_b}:{b}  ncc={score:.2f}")
    print(f"val/test tiles with a keypoint-verified copy in train (independent method): "
          f"{len(report.copies)}")
    for path, split, train_path, inliers in report.copies[: args.show]:
        print(f"  {split}:{path}  train:{train_path}  inliers={inliers}")
    print(f"leak rate (test images with a near-duplicate in train, either method): "
          f"{report.leak_rate:.2%} ({report.leaked}/{report.n_test}); clean test images: "
          f"{len(report.clean_test)}")
    if any(r.group for r in records):
        print(f"group leak rate (test images whose group is in train): "
              f"{report.group_leak_rate:.2%} ({report.group_leaked}/{report.n_test})")
    if args.copies:
        write_audit(report, args.copies)
        print(f"wrote {args.copies}")
    if args.png:
        draw_copies(report, args.png)
        print(f"wrote {args.png}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``split`` (write a split manifest) and ``audit`` (measure a manifest's leak)."""
    p = subparsers.add_parser("split", help="write a stratified, grouped train/val/test manifest")
    p.add_argument("--data", required=True, help="class-folder dataset, LC25000 root or CSV")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--ratios", type=_ratios, default=(0.7, 0.2, 0.1),
                   help="train,val,test fractions (default 0.7,0.2,0.1)")
    p.add_argument("--seed", type=int, default=42)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--groups", help="path,label,group CSV, paths relative to --data")
    source.add_argument("--random", action="store_true",
                        help="leaky random split, only to reproduce the study")
    p.add_argument("--grouping-strictness", choices=sorted(grouping.STRICTNESS), default="safe",
                   help="when groups are detected: how readily a small group still unmatched "
                   "after the keypoint stages is merged by stain colour (safe: merge when unsure, "
                   "the default; strict: never)")
    p.set_defaults(func=_split_command)
    p = subparsers.add_parser("audit", help="near-duplicates across splits and the leak rate")
    p.add_argument("manifest", help="split manifest CSV")
    p.add_argument("--show", type=int, default=20, help="cross-split pairs to print")
    p.add_argument("--copies", help="write the keypoint copies here (CSV path,split,train_path,inliers)")
    p.add_argument("--png", help="write thumbnails of the copies (each beside its train twin) here")
    p.set_defaults(func=_audit_command)
