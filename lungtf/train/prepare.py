"""Find the data, check every file and make (or read) the leakage-safe split of a run.

Data: ``--data``, else ``$LUNGTF_DATA``, else ``data/``, else ``../shared/data/lc25000-lung-224``
beside the checkout, else a kagglehub download. Groups (source tiles): the ``group`` column of a
CSV manifest, else ``DataConfig.groups``, else a ``groups.csv`` next to the data, else automatic
near-duplicate detection. Unreadable files go to ``bad_files.csv`` and are skipped.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

from lungtf.constants import PROTOCOL_GROUPED, SPLIT_NAMES
from lungtf.data.ingest import check_images, load_records, read_bad_report, write_bad_report
from lungtf.train.rundir import atomic_path

log = logging.getLogger("lungtf.train")

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "lc25000-lung-224"
"""The shared real tiles beside the checkout (``<checkout>/../shared/data/lc25000-lung-224``)."""


def find_data(data: str | None) -> str:
    """The data source to use, in the documented order; downloads as the last resort."""
    for source, where in (
        (data, "--data or the run's config.yaml"),
        (os.environ.get("LUNGTF_DATA"), "$LUNGTF_DATA"),
        ("data" if Path("data").is_dir() else None, "data/"),
        (str(SHARED_DATA) if SHARED_DATA.is_dir() else None, "shared tiles beside the checkout"),
    ):
        if source:
            log.info("data: %s (from %s)", source, where)
            return source
    from lungtf.data.download import download

    log.info("data: none given or found locally; downloading LC25000 with kagglehub")
    return str(download())


def read_groups(path: Path) -> dict[str, str]:
    """``absolute path -> group`` from a ``path,label,group`` CSV (paths relative to the CSV)."""
    with open(path, newline="") as fh:
        return {
            str((path.parent / row["path"]).resolve()): row["group"] for row in csv.DictReader(fh)
        }


def _groups_file(source: Path, explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    for folder in (source, source.parent):
        if folder.is_dir() and (folder / "groups.csv").is_file():
            return folder / "groups.csv"
    return None


def assign_groups(records: list, source: str, groups: str | None,
                  strictness: str = "safe") -> list:
    """Give every record its source-tile group (kept when the manifest already has one); groups
    are detected with ``strictness`` when no groups file covers the records."""
    if all(r.group for r in records):
        return records
    path = _groups_file(Path(source), groups)
    if path is not None:
        table = read_groups(path)
        missing = [r.path for r in records if str(Path(r.path).resolve()) not in table]
        if not missing:
            log.info("groups: %s", path)
            return [replace(r, group=table[str(Path(r.path).resolve())]) for r in records]
        log.info(
            "groups: %s lacks %d of the files (e.g. %s); detecting groups instead",
            path,
            len(missing),
            missing[0],
        )
    from lungtf.data.grouping import detect_groups

    log.info("groups: detecting near-duplicate groups of %d tiles (strictness %s)", len(records),
             strictness)
    stages: dict[str, int] = {}
    ids = detect_groups([r.path for r in records], [r.label for r in records],
                        strictness=strictness, stages=stages)
    log.info("groups: %s", "; ".join(f"{k} {v}" for k, v in stages.items()))
    return [replace(r, group=g) for r, g in zip(records, ids)]


def prepare_splits(data, run_dir: Path) -> tuple[dict[str, list], str]:
    """Read ``data.splits`` or make a grouped split; write ``splits.csv`` and ``bad_files.csv``.

    Args:
        data: the run's ``DataConfig``.
        run_dir: the run directory.

    Every image must lie inside the data root (``data.data_root``, else the dataset's own
    folder) unless ``data.allow_outside_root``; the run's own ``splits.csv`` is read under the
    same rule when it resumes. A resumed run keeps its ``bad_files.csv`` (the files its ingest
    skipped) and adds only split files that have become unreadable since.

    Returns:
        ``({"train": [...], "val": [...], "test": [...]}, protocol)``.

    Raises:
        ValueError: when the train or validation split is empty.
    """
    from lungtf.data.split import make_split, read_manifest, write_manifest

    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = run_dir / "splits.csv"
    inside = {"root": data.data_root, "confine": not data.allow_outside_root}
    if manifest.is_file():  # a resumed run keeps its split
        records, protocol = read_manifest(manifest, **inside)
    elif data.splits:
        records, protocol = read_manifest(data.splits, **inside)
    else:
        source = find_data(data.data)
        records, protocol = load_records(source, **inside), PROTOCOL_GROUPED
    good, bad = check_images(records)
    report = run_dir / "bad_files.csv"
    stored = read_bad_report(report) if manifest.is_file() and report.is_file() else None
    if stored is not None:  # resumed: splits.csv lists only readable files; the ingest's stays
        known = {b.path for b in stored}
        bad = stored + [b for b in bad if b.path not in known]
    if stored is None or len(bad) > len(stored):  # a fresh ingest, or tiles broken since
        with atomic_path(report) as tmp:
            write_bad_report(bad, tmp)
    if bad:
        log.info("%d unreadable files skipped (see %s)", len(bad), report)
    if not (manifest.is_file() or data.splits):
        good = make_split(assign_groups(good, source, data.groups, data.grouping_strictness),
                          data.ratios, seed=data.seed)
    if not manifest.is_file():  # atomic: a resume never reads half a split
        with atomic_path(manifest) as tmp:
            write_manifest(good, tmp, protocol)
    splits = {name: [r for r in good if r.split == name] for name in SPLIT_NAMES}
    counts = {name: dict(Counter(r.label for r in rs)) for name, rs in splits.items()}
    log.info("split (%s): %s", protocol, counts)
    if not splits["train"] or not splits["val"]:
        raise ValueError(
            f"the train and val splits must both hold images; got {counts} ({protocol} split)"
        )
    return splits, protocol
